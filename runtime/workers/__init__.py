"""`flowc serve --workers N`: N server processes on one port, one ledger writer (see
supervisor.py for the design)."""
