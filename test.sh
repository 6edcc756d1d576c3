#!/usr/bin/env bash
# Install everything the tests need (see scripts/setup.sh), then run them all.
# Arguments go to pytest: ./test.sh tests/test_gateway.py -x
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
# The tests start the MCP servers installed into the environment (mcp-server-time).
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
