"""The ledger process's memory stays flat as the ledger grows: DuckDB's cache of the file's
blocks is given back after each insert and query (benchmarks/soak.py measures the process
over 10 minutes)."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from runtime.ledger.store import CallRecord, Ledger

ROOT = Path(__file__).resolve().parent.parent
ROWS = 200_000  # ~5 MB of checkpointed blocks (~26 bytes a row)


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "child-process"])
def test_the_files_blocks_are_not_kept_after_a_query_reads_them_all(tmp_path, in_process):
    ledger = Ledger(tmp_path / "l.duckdb", flush_interval=0.05, in_process=in_process)
    try:
        for i in range(ROWS):
            ledger.record(CallRecord(model=f"m{i % 7}", provider="openai",
                                     served_model="gpt-4o-mini", success=True,
                                     latency_ms=float(i % 1000), prompt_tokens=i,
                                     completion_tokens=5, cost_usd=Decimal("0.000004500")))
        ledger.flush()
        # A report reads every block of the file into DuckDB's buffer pool.
        totals = ledger.select("SELECT count(*), sum(cost_usd), count(DISTINCT model), "
                               "sum(prompt_tokens) FROM requests")[1]
        held = dict(ledger.select("SELECT tag, memory_usage_bytes FROM duckdb_memory()")[1])
        spilled = ledger.select("SELECT count(*) FROM duckdb_temporary_files()")[1]
        limit = ledger.select("SELECT current_setting('memory_limit')")[1]
    finally:
        ledger.close()
    assert totals == [(ROWS, Decimal("0.900000000"), 7, ROWS * (ROWS - 1) // 2)]
    assert held["BASE_TABLE"] <= 1 << 20, f"{held['BASE_TABLE'] / 2**20:.1f} MiB cached"
    assert spilled == [(0,)]  # rows waiting for a checkpoint were not pushed out to disk
    assert limit == [("953.6 MiB",)]  # lowered for a moment only


PROBE = """
import ctypes, sys
from runtime.ledger.store import _fixed_mmap_threshold
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    _fixed_mmap_threshold()
libc.free(libc.malloc(4 << 20))  # a checkpoint's temporary, mapped and freed
block = libc.malloc(1 << 20)  # the next one
print(libc.mallinfo2().hblkhd >= 1 << 20)
"""


@pytest.mark.parametrize("mode, mapped", [("fixed", "True"), ("glibc's default", "False")])
def test_large_blocks_stay_out_of_the_heap_in_the_ledger_process(mode, mapped):
    # glibc raises its mmap threshold to each mapped block freed, so later large blocks
    # came from the heap and fragmented it; the ledger process keeps the threshold fixed.
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == mapped
