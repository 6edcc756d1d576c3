"""`flowc lsp`: the compiler's findings, types and names in any editor that speaks LSP.

``analysis`` holds what the server answers (pure, in offsets), ``positions`` converts
offsets to LSP positions, ``server`` speaks the protocol (pygls). Run with ``flowc lsp``
or ``python -m flowc.lsp``.
"""
