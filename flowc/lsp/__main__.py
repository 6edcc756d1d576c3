"""``python -m flowc.lsp [--stdio]``: the language server over stdio (what `flowc lsp`
runs). ``--stdio`` is accepted because some clients add it; it is the only transport."""

import sys

from flowc.lsp.server import main

if any(arg != "--stdio" for arg in sys.argv[1:]):
    sys.exit("usage: python -m flowc.lsp [--stdio]")
main()
