"""
Tests for L{funcnodes_tw.corefixes}: funcnodes-core's data paths stay bounded
on a long-lived graph, and what reads them still works.
"""

import funcnodes_core as fn
import pytest
import pytest_twisted
from funcnodes_basic.logic import ForNode
from funcnodes_basic.math_nodes import add_node
from funcnodes_core.datapath import DataPath

from funcnodes_tw import aio, corefixes

ROUNDS = 50


@pytest.fixture
def fixed(monkeypatch):
    """
    The workarounds applied for one test (funcnodes-core restored after).
    """
    monkeypatch.setattr(DataPath, "__init__", DataPath.__init__)
    corefixes.apply()
    corefixes.apply()  # a second call changes nothing


def chain(nodespace, length):
    """
    C{length} add nodes, C{out -> a}, each C{b} set once (a default).
    """
    nodes = [add_node() for _ in range(length)]
    for node in nodes:
        nodespace.add_node_instance(node)
        node.inputs["b"].set_default(1)
    for upstream, downstream in zip(nodes, nodes[1:]):
        upstream.outputs["out"].connect(downstream.inputs["a"])
    return nodes


@pytest_twisted.ensureDeferred
async def test_paths_of_a_default_input_stay_bounded(fixed):
    """
    Without the workaround each trigger adds two paths to every C{b} input's
    C{dst_paths}: 100 after 50 rounds.
    """
    nodes = chain(fn.NodeSpace(), 5)
    for value in range(ROUNDS):
        nodes[0].inputs["a"].value = value
        await aio.as_deferred(fn.run_until_complete(*nodes))
    assert nodes[-1].outputs["out"].value == ROUNDS - 1 + 5
    lengths = [len(node.inputs["b"].datapath.dst_paths) for node in nodes]
    assert max(lengths) <= 2, lengths
    # What is kept is what the current values derive from.
    assert [len(node.inputs["a"].datapath.dst_paths) for node in nodes[:-1]] == [1] * 4


@pytest_twisted.ensureDeferred
async def test_a_for_node_still_waits_for_its_loop_body(fixed):
    """
    C{ForNode} reads the data paths (C{DataPath.done}) to wait until each
    item has gone through its loop body before collecting the result.
    """
    nodespace = fn.NodeSpace()
    loop = ForNode()
    nodespace.add_node_instance(loop)
    body = chain(nodespace, 3)
    loop.outputs["do"].connect(body[0].inputs["a"])
    body[-1].outputs["out"].connect(loop.inputs["collector"])
    for _ in range(3):  # the same graph, again and again
        loop.inputs["input"].value = [1, 2, 3]
        await aio.as_deferred(fn.run_until_complete(loop, *body))
        assert loop.outputs["done"].value == [4, 5, 6]
