"""Nodes for tests/test_cluster.py: heavy nodes that run on a Dask cluster.

The test's dask workers import this module (they get the tests folder on
``PYTHONPATH``), so the node functions travel by reference. Each node says
where it ran: the process and, on a dask worker, that worker's address. Inputs
have no defaults, so a node runs when the test sets its input.
"""

import os
import time
from typing import Any

import funcnodes_core as fn


def _dask_worker():
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def _ran(value):
    # The value first: the UI shows the start of a long preview.
    return {"value": value, "worker": _dask_worker(), "pid": os.getpid()}


@fn.NodeDecorator("cluster_test.double", name="Double remotely", separate_process=True)
def double(x: int) -> dict:
    return _ran(2 * x)


@fn.NodeDecorator("cluster_test.slow", name="Slow remotely", separate_process=True)
def slow(seconds: float, marker: str, x: int) -> dict:
    """Append this process's pid to the file C{marker}, then sleep."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return _ran(x + 1)


@fn.NodeDecorator("cluster_test.local", name="In the worker unless routed")
def local(x: int) -> dict:
    return _ran(x)


@fn.NodeDecorator("cluster_test.make_array", name="Make an array", separate_process=True)
def make_array(megabytes: int) -> Any:
    return big(megabytes)


@fn.NodeDecorator("cluster_test.echo", name="Echo an array", separate_process=True)
def echo(array: Any) -> Any:
    return array


def big(megabytes):
    """C{megabytes} MiB of 7s ending in a 9, as a numpy array."""
    import numpy

    array = numpy.full(megabytes * 1024 * 1024, 7, dtype=numpy.uint8)
    array[-1] = 9
    return array


NODE_SHELF = fn.Shelf(
    name="cluster tests",
    description="separate_process nodes for a Dask cluster",
    nodes=[double, slow, local, make_array, echo],
    subshelves=[],
)
