"""Misbehaving nodes for tests/test_faults.py: one raises, one never finishes, one
keeps memory.

Workers load them with ``add_shelf`` (module ``fault_nodes``; subprocess workers get
the tests folder on ``PYTHONPATH``). Inputs have no defaults, so a node runs when the
test sets its input, not when it is added.
"""

import asyncio

import funcnodes_core as fn

#: What ``faults.leak`` keeps alive (the test process's own copy when in-process).
KEPT = []


@fn.NodeDecorator("faults.raise", name="Raise")
def fail(message: str) -> int:
    raise ValueError(message)


@fn.NodeDecorator("faults.hang", name="Never finish")
async def hang(tag: str) -> str:
    await asyncio.get_running_loop().create_future()  # nobody ever sets it
    return tag


@fn.NodeDecorator("faults.leak", name="Keep memory")
def leak(mb: int) -> int:
    """Allocate ``mb`` MiB of touched memory and keep it; the number of MiB kept."""
    KEPT.append(b"x" * (mb * 1024 * 1024))
    return sum(len(block) for block in KEPT) // (1024 * 1024)


NODE_SHELF = fn.Shelf(
    name="fault tests",
    description="nodes that raise, hang and leak",
    nodes=[fail, hang, leak],
    subshelves=[],
)
