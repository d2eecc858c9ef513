"""
The worker's state object, without sockets.
"""

import json

import pytest

from funcnodes_tw import libraries, wire
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


class Outlet:
    def __init__(self):
        self.messages = []

    def broadcast(self, message, hold=False):
        self.messages.append(wire.dumps(message))

    def broadcast_binary(self, payload, header, hold=False):
        pass


def test_a_library_event_shares_its_encoding_with_get_library(worker, monkeypatch):
    worker.outlet = outlet = Outlet()
    encodings = []
    full_serialize = worker.nodespace.lib.full_serialize
    monkeypatch.setattr(
        worker.nodespace.lib, "full_serialize", lambda: encodings.append(1) or full_serialize()
    )
    worker.nodespace.add_shelf(libraries.shelf_of(libraries.find_module("funcnodes_tw.processes")))
    worker._flush()
    (event,) = [json.loads(m) for m in outlet.messages if b'"after_add_shelf"' in m]
    assert event["data"]["result"] == json.loads(wire.dumps(full_serialize()))
    assert wire.dumps(worker.library_json()) == wire.dumps(full_serialize())
    assert encodings == [1], "the library was encoded again for get_library"
