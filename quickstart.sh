#!/usr/bin/env bash
# Set up flowc in .venv and run the main job on the bundled example pipelines: check every
# pipeline like CI would, draw the research pipeline's DAG, and run it in dry-run mode
# (deterministic stand-ins for model and tool calls: no keys, no network, $0).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
flowc check pipelines/
flowc graph pipelines/research.yaml -o research.svg
flowc run --dry-run pipelines/research.yaml --input topic="AI middleware patterns"
echo
echo "flowc is installed in .venv: run '. .venv/bin/activate' to put it on your PATH."
