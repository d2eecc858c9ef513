"""Nodes for tests/test_isolation.py: work in a separate process or thread.

Workers load them with ``add_shelf`` (module ``isolation_nodes``; subprocess workers get
the tests folder on ``PYTHONPATH``). Each node returns where and when it ran, so tests can
check isolation and concurrency from the node's own timestamps. Inputs have no
defaults, so a node runs when the test sets its input, not when it is added. Only funcnodes-core is
imported: the reference worker may load this module too.
"""

import os
import threading
import time

import funcnodes_core as fn


def _ran(start):
    return {
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "start": start,
        "end": time.time(),
    }


@fn.NodeDecorator("isolation.burn", name="Burn CPU", separate_process=True)
def burn(seconds: float) -> dict:
    """Keep one CPU busy in pure Python (holding the GIL of its process)."""
    start = time.time()
    n = 0
    while time.time() - start < seconds:
        n += 1
    return _ran(start)


@fn.NodeDecorator("isolation.nap", name="Sleep in a thread", separate_thread=True)
def nap(seconds: float) -> dict:
    start = time.time()
    time.sleep(seconds)
    return _ran(start)


@fn.NodeDecorator("isolation.fail", name="Fail in a process", separate_process=True)
def fail(message: str) -> int:
    raise ValueError(message)


# Plain functions for the process pool itself.


def where():
    return os.getpid()


def add(a, b):
    return a + b


def crash():
    os._exit(3)


def ignore_sigterm():
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return os.getpid()


def spin(seconds):
    start = time.time()
    while time.time() - start < seconds:
        pass
    return os.getpid()


def first(items):
    return os.getpid(), next(items)


async def coroutine(x):
    return x * 2


NODE_SHELF = fn.Shelf(
    name="isolation tests",
    description="separate_process / separate_thread nodes",
    nodes=[burn, nap, fail],
    subshelves=[],
)
