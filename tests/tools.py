"""What the tests need installed (./test.sh installs all of it): a missing tool fails the
test that needs it with the fix, never skips it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVERYTHING = ROOT / "tests" / "mcp" / "node_modules" / "@modelcontextprotocol" / \
    "server-everything" / "dist" / "index.js"


def require(*commands: str, files: tuple[Path, ...] = ()) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    missing += [str(f.relative_to(ROOT)) for f in files if not f.exists()]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (./test.sh installs what the "
                    "tests need, then runs them)", pytrace=False)
