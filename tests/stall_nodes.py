"""A node that computes in the reactor's thread for a while (tests/test_watchdog.py).

Workers load it with ``add_shelf`` (module ``stall_nodes``). Its input has no
default, so it runs when the test sets it, not when it is added.
"""

import time

import funcnodes_core as fn


@fn.NodeDecorator("stall.busy", name="Busy loop")
def busy(seconds: float) -> float:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


NODE_SHELF = fn.Shelf(
    name="stall tests", description="a node that holds the reactor", nodes=[busy], subshelves=[]
)
