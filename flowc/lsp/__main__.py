"""``python -m flowc.lsp``: the language server over stdio (what `flowc lsp` runs)."""

from flowc.lsp.server import main

main()
