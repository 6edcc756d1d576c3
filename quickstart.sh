#!/usr/bin/env bash
# Set up flowc on this machine and run the main job on the bundled example pipelines:
# check every pipeline like CI would, draw the research pipeline's DAG, and run it in
# dry-run mode (deterministic stand-ins for model and tool calls: no keys, no network, $0).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq graphviz >/dev/null
  else
    echo "note: install Graphviz (apt-get install graphviz / brew install graphviz) to render SVG" >&2
  fi
fi
python3 -m pip install -q -e '.[dev]'
flowc check pipelines/
if command -v dot >/dev/null 2>&1; then
  flowc graph pipelines/research.yaml -o research.svg
else
  flowc graph pipelines/research.yaml -o research.dot
fi
flowc run --dry-run pipelines/research.yaml --input topic="AI middleware patterns"
