"""
A restored graph computes: after a restart on the saved files, C{load_data},
C{update} (the import of an exported config and state) and
C{update_from_export}, every node whose inputs are ready runs, as in the
reference, and no other node does. No client sets a value after the graph
comes back: the values are polled, with a bound.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from inprocess import sleep, start  # noqa: F401 (fixture)
from workers import start_ours, start_reference
from wsclient import connect

#: Bounds only, so that a graph that never computes fails instead of hanging.
COMPUTE_TIMEOUT = 10.0
POLL = 0.1

VALUE, DEFAULT_B = 2, 3
SUM = float(VALUE + DEFAULT_B)
NO_VALUE = "<NoValue>"
#: A saved node whose package is missing, with an input without a value: a
#: placeholder that must not run at start (docs/deviations.md).
MISSING = {
    "id": "f" * 32,
    "node_id": "restore_test_missing.node",
    "node_name": "Missing",
    "io": {"x": {"id": "x", "is_input": True}, "out": {"id": "out", "is_input": False}},
}


@defer.inlineCallbacks
def build_graph(client):
    """
    A value node with a saved default feeding an add node whose other input
    has one, and an add node that misses an input; fires with their ids
    once the sum is there.
    """
    value = (yield client.call("add_node", id="input.any", timeout=20))["id"]
    add = (yield client.call("add_node", id="add_node"))["id"]
    idle = (yield client.call("add_node", id="add_node"))["id"]
    yield client.call("set_io_value", nid=value, ioid="input", value=VALUE, set_default=True)
    yield client.call("set_io_value", nid=add, ioid="b", value=DEFAULT_B, set_default=True)
    yield client.call("set_io_value", nid=idle, ioid="b", value=DEFAULT_B, set_default=True)
    yield client.call("add_edge", src_nid=value, src_ioid="out", trg_nid=add, trg_ioid="a")
    yield wait_value(client, add, "out", SUM)
    return {"value": value, "add": add, "idle": idle}


@defer.inlineCallbacks
def wait_value(client, nid, ioid, expected, timeout=COMPUTE_TIMEOUT):
    """
    Poll C{get_io_value} until it is C{expected}; fail after C{timeout} s.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = yield client.call("get_io_value", nid=nid, ioid=ioid)
        if value == expected:
            return value
        if reactor.seconds() > deadline:
            pytest.fail(f"{nid}.{ioid} is {value!r}, not {expected!r}, after {timeout} s")
        yield sleep(POLL)


@defer.inlineCallbacks
def assert_not_run(client, ids):
    """
    The node that misses an input has run neither before nor after the
    computed ones, nor asks to.
    """
    assert (yield client.call("get_io_value", nid=ids["idle"], ioid="out")) == NO_VALUE
    status = yield client.call("get_node_status", nid=ids["idle"])
    assert not status["ready"] and not status["in_trigger"] and not status["requests_trigger"]


def node_errors(transcript):
    return [m for m in transcript if m.get("event") in ("node_error", "node_trigger_error")]


# region a restarted worker process


WORKERS = {
    "ours": start_ours,
    "reference": pytest.param(start_reference, marks=pytest.mark.reference),
}


@pytest.mark.slow
@pytest.mark.parametrize("starter", list(WORKERS.values()), ids=list(WORKERS))
@pytest_twisted.inlineCallbacks
def test_a_restarted_worker_computes_its_graph(tmp_path, clean_reactor, starter):
    worker = yield starter(tmp_path)
    try:
        client = yield connect(reactor, worker.url)
        if starter is start_reference:  # it starts with an empty library
            yield client.call("add_package_dependency", name="funcnodes-basic", timeout=60)
        ids = yield build_graph(client)
        state = yield client.call("get_save_state")
        state["backend"]["nodes"].append(MISSING)
        yield client.call("load_data", data=state)
        yield wait_value(client, ids["add"], "out", SUM)
        yield client.wait_quiet()
        log = worker.data_path / "worker.log"
        logged = log.stat().st_size if log.exists() else 0
        # The reference closes without replying: the worker's end is what counts.
        client.call("stop_worker").addErrback(lambda _: None)
        yield worker.when_ended()
        yield client.when_closed()
    finally:
        yield worker.stop()

    worker = yield starter(tmp_path, worker_uuid=worker.uuid)
    try:
        client = yield connect(reactor, worker.url)
        yield wait_value(client, ids["add"], "out", SUM)
        assert (yield client.call("get_io_value", nid=ids["value"], ioid="out")) == VALUE
        yield assert_not_run(client, ids)
        nodes = yield client.call("get_nodes")
        assert {n["id"] for n in nodes} == {*ids.values(), MISSING["id"]}
        if starter is start_ours:  # neither the idle node nor the placeholder ran
            restarted = log.read_bytes()[logged:].decode(errors="replace")
            assert "Worker " in restarted and "failed" not in restarted, restarted
        yield client.close()
    finally:
        yield worker.stop()


# endregion
# region loading into a running worker


@defer.inlineCallbacks
def cleared_graph(start):
    """
    A worker with the graph built, its saved state and its export, then
    cleared: whatever computes next comes from loading.
    """
    served = yield start()
    client = yield served.connect()
    ids = yield build_graph(client)
    state = yield client.call("get_save_state")
    exported = yield client.call("export_worker")
    yield client.call("clear")
    assert (yield client.call("get_nodes")) == []
    return client, ids, state, exported


@pytest.mark.parametrize(
    "command",
    [
        lambda state, exported: ("load_data", {"data": state}),
        lambda state, exported: ("update", {"config": {}, "state": state}),
        lambda state, exported: ("update_from_export", {"data": exported}),
    ],
    ids=["load_data", "update", "update_from_export"],
)
@pytest_twisted.inlineCallbacks
def test_a_loaded_graph_computes(start, command):
    client, ids, state, exported = yield cleared_graph(start)
    since = len(client.transcript)
    name, kwargs = command(state, exported)
    yield client.call(name, kwargs=kwargs, timeout=20)
    yield wait_value(client, ids["add"], "out", SUM)
    yield assert_not_run(client, ids)
    events = client.transcript[since:]
    started = [m["data"]["node"] for m in events if m.get("event") == "triggerstart"]
    assert sorted(started) == sorted([ids["value"], ids["add"]])
    assert node_errors(events) == []


# endregion
