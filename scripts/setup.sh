#!/usr/bin/env bash
# Install flowc into the project's virtual environment (.venv), creating it if needed.
#   scripts/setup.sh          flowc, plus Graphviz for `flowc graph`
#   scripts/setup.sh --test   also what the tests need: Chromium, Node.js and npm, the
#                             Python test dependencies, the npm MCP servers and the real
#                             clients of the gateway (tests/clients: Claude Code, Codex,
#                             OpenClaw, the AI SDK; Node 24 for OpenClaw), Postgres
# A virtual environment, because Debian's and Ubuntu's system Python refuse `pip install`
# (PEP 668, "externally managed environment"). Set PYTHON to choose the interpreter
# (3.11 or newer; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
test_deps=0
[ "${1:-}" = "--test" ] && test_deps=1
python=${PYTHON:-python3}

# System packages, from the distribution's package manager.
need=()
command -v dot >/dev/null 2>&1 || need+=(graphviz)
"$python" -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
if [ "$test_deps" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  # Postgres server binaries: tests start throwaway clusters for the shared store
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: install these with your package manager, then run this again: ${need[*]}" >&2
    exit 1
  fi
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
      echo "setup: as root, run: apt-get install ${need[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "setup: installing ${need[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=""
[ "$test_deps" = 1 ] && extras="[dev]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
if [ "$test_deps" = 1 ]; then
  # Third-party MCP servers the tests start (@modelcontextprotocol/server-everything).
  npm install --prefix tests/mcp --no-audit --no-fund --loglevel=error
  # Node 24 from npm's `node` package first: OpenClaw needs Node >= 24.16 and its install
  # script refuses an older one (Debian's nodejs is 20), so the clients install under it.
  npm install --prefix tests/clients/node --no-audit --no-fund --loglevel=error
  PATH="$PWD/tests/clients/node/node_modules/.bin:$PATH" \
    npm install --prefix tests/clients --no-audit --no-fund --loglevel=error
fi
