"""Nodes for the ``isolation`` figure, loaded by both workers with ``add_shelf``.

Only funcnodes-core is imported, so the reference worker can load this module as it is.
Each node returns where and when it ran (pid, start, end: ``time.time()``).
"""

import os
import time

import funcnodes_core as fn


def _ran(start):
    return {"pid": os.getpid(), "start": start, "end": time.time()}


@fn.NodeDecorator("bench_isolation.burn", name="Burn CPU", separate_process=True)
def burn(seconds: float) -> dict:
    """Keep one CPU busy in pure Python for ``seconds``."""
    start = time.time()
    n = 0
    while time.time() - start < seconds:
        n += 1
    return _ran(start)


@fn.NodeDecorator("bench_isolation.nap", name="Sleep", separate_thread=True)
def nap(seconds: float) -> dict:
    """Sleep for ``seconds`` (releases the GIL)."""
    start = time.time()
    time.sleep(seconds)
    return _ran(start)


NODE_SHELF = fn.Shelf(
    name="bench isolation",
    description="separate_process / separate_thread nodes for the benchmark",
    nodes=[burn, nap],
    subshelves=[],
)
