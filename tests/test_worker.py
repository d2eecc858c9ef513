"""
The worker's state object, without sockets.
"""

import pytest

from funcnodes_tw import libraries
from funcnodes_tw.persistence import WorkerFiles
from funcnodes_tw.worker import Worker


@pytest.fixture
def worker(tmp_path):
    from twisted.internet import reactor

    worker = Worker(WorkerFiles("w", root=tmp_path), "w", clock=reactor)
    worker.nodespace.add_shelf(libraries.shelf_of(libraries.find_module("funcnodes_basic")))
    return worker


@pytest.mark.parametrize(
    "broken", [{"backend": {"nodes": 5}}, {"backend": {"nodes": [{"no": "node_id"}]}}]
)
def test_a_state_that_fails_halfway_leaves_the_graph_as_it_was(worker, broken):
    node = worker.nodespace.add_node_by_id("add_node")
    node.inputs["b"].set_default(2.5)
    before = worker.save_state()
    with pytest.raises(Exception):
        worker.load(broken)
    assert [n.uuid for n in worker.nodespace.nodes] == [node.uuid]
    assert worker.save_state()["backend"] == before["backend"]
