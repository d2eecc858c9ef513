"""
What a browser gets from a worker that runs funcnodes-numpy and
funcnodes-pandas nodes, over a real socket: every message parses with a
strict parser (the browser's C{JSON.parse} has no NaN or Infinity),
non-finite numbers are null, and node descriptions keep option lists
complete but defaults bounded (docs/deviations.md).
"""

import base64
import json

import pytest
import pytest_twisted

import wsclient
from inprocess import start  # noqa: F401 (fixture)
from test_wire import strict


@pytest.fixture
def received(monkeypatch):
    """
    Every text frame and every JSON binary payload clients get, as sent.
    """
    texts = []
    on_frame = wsclient.Client._on_frame

    def recording(self, payload, is_binary):
        if not is_binary:
            texts.append(payload)
        elif b"mime=application/json" in payload.partition(b"\r\n\r\n")[0]:
            texts.append(payload.partition(b"\r\n\r\n")[2])
        on_frame(self, payload, is_binary)

    monkeypatch.setattr(wsclient.Client, "_on_frame", recording)
    return texts


def io_value(nid, ioid):
    def match(message):
        header = message.get("header", {}) if message.get("binary") else {}
        return header.get("type") == "io_value" and (header["node"], header["io"]) == (nid, ioid)

    return match


@pytest_twisted.inlineCallbacks
def run(client, nid, out, **values):
    """
    Set C{values} on node C{nid}; the io_value frame of its output C{out}.
    """
    mark = len(client.transcript)
    for ioid, value in values.items():
        yield client.call("set_io_value", nid=nid, ioid=ioid, value=value)
    frame = yield client.wait_for(io_value(nid, out), start=mark)
    return frame


def decoded(full_value):
    """
    The JSON a C{get_io_full_value} result carries, parsed strictly.
    """
    assert full_value["mime"] == "application/json"
    return strict(base64.b64decode(full_value["data"]))


@pytest_twisted.inlineCallbacks
def test_non_finite_numpy_numbers_are_null_in_every_message(start, received):
    worker = yield start(name="numbers")
    client = yield worker.connect()
    yield client.call("add_shelf", src="funcnodes_numpy")
    log = (yield client.call("add_node", id="np.log"))["id"]
    divide = (yield client.call("add_node", id="np.divide"))["id"]

    for dtype in ("float16", "float32", "float64"):
        # Scalars: log(0) is -inf, log(-1) nan, 1/0 inf, each a numpy scalar.
        for nid, out, values in [(log, "y", {"x": 0}), (log, "y", {"x": -1}),
                                 (divide, "y", {"x1": 1, "x2": 0})]:
            frame = yield run(client, nid, out, dtype=dtype, **values)
            if dtype == "float64":  # a Python float: packed, as in the reference
                assert frame["header"]["mime"] == "application/fn.struct.!d"
            else:
                assert (frame["header"]["mime"], frame["payload"]) == ("application/json", b"null")
            assert (yield client.call("get_io_value", nid=nid, ioid=out)) is None
            assert (yield client.call("get_ios_values", nid=nid))[out] is None
        # Arrays: their full values, as JSON and as bytes.
        yield run(client, log, "y", dtype=dtype, x=[0, -1, 1])
        full = yield client.call("get_io_full_value", nid=log, ioid="y")
        assert decoded(full) == [None, None, 0.0]
        frame = yield client.call("get_io_full_value", nid=log, ioid="y", as_bytes=True)
        assert strict(frame["payload"]) == [None, None, 0.0]

    # pandas objects from funcnodes-pandas nodes, through numpy's log.
    yield client.call("add_shelf", src="funcnodes_pandas")
    for source, out, data, expected in [
        ("pd.df_from_dict", "df", {"a": [0, 1, -1]},
         {"index": [0, 1, 2], "columns": ["a"], "data": [[None], [0.0], [None]]}),
        ("pd.ser_from_list", "series", [0, 1, -1], [None, 0.0, None]),
    ]:
        src = (yield client.call("add_node", id=source))["id"]
        trg = (yield client.call("add_node", id="np.log"))["id"]
        yield client.call("add_edge", src_nid=src, src_ioid=out, trg_nid=trg, trg_ioid="x")
        mark = len(client.transcript)
        yield client.call("set_io_value", nid=src, ioid="data", value=data)
        frame = yield client.wait_for(io_value(trg, "y"), start=mark)
        if source == "pd.df_from_dict":  # a Series' preview is numpy's text
            assert strict(frame["payload"]) == expected
            assert (yield client.call("get_io_value", nid=trg, ioid="y")) == expected
        assert decoded((yield client.call("get_io_full_value", nid=trg, ioid="y"))) == expected

    # An array too big for one message goes out as a large message.
    full = (yield client.call("add_node", id="np.full"))["id"]
    yield client.call("add_edge", src_nid=full, src_ioid="out", trg_nid=log, trg_ioid="x")
    yield run(client, full, "out", shape=200_000, fill_value=0)
    yield client.wait_quiet(0.3)
    client.send_json({"type": "cmd", "cmd": "get_io_full_value", "id": "big",
                      "kwargs": {"nid": log, "ioid": "y"}})
    hint = yield client.wait_for(lambda m: m.get("type") == "large_message")
    response = yield worker.http.get(hint["url"])
    reply = strict((yield response.content()))
    assert reply["id"] == "big" and decoded(reply["result"]) == [None] * 200_000

    yield client.call("full_state")
    yield client.call("get_nodes")
    yield client.call("save")
    yield client.wait_quiet(0.3)
    assert len(received) > 50
    for text in received:
        strict(text)
    strict((worker.data / "nodespace.json").read_bytes())


def large_reply(client, cmd, **kwargs):
    """
    Send a command whose reply (the value set, the state saved) is too big
    for one message: the Deferred fires with the C{large_message} pointer.
    """
    mark = len(client.transcript)
    client.send_json({"type": "cmd", "cmd": cmd, "id": cmd, "kwargs": kwargs})
    # funcnodes-core's saving walks the state in Python: seconds for 1,000,000 items.
    return client.wait_for(lambda m: m.get("type") == "large_message", timeout=60, start=mark)


@pytest_twisted.inlineCallbacks
def test_descriptions_have_complete_options_and_bounded_defaults(start):
    worker = yield start(name="descriptions")
    client = yield worker.connect()
    yield client.call("add_shelf", src="funcnodes_numpy")
    added = yield client.call("add_node", id="np.log")
    nid = added["id"]
    state = yield client.call("full_state")
    empty_size = len(json.dumps(state))

    def described(node):
        return {io["id"]: io for io in node["io"]}

    @pytest_twisted.inlineCallbacks
    def descriptions():
        """
        full_state, and the inputs as get_node describes them, which
        full_state and get_nodes describe the same way (status aside).
        """
        yield client.wait_quiet(0.2)
        state = yield client.call("full_state")
        [in_state] = state["backend"]["nodes"]
        [in_list] = yield client.call("get_nodes")
        node = yield client.call("get_node", id=nid)
        for other in (in_state, in_list):
            assert {**other, "status": None, "frontend": None} == {
                **node, "status": None, "frontend": None}
        return state, described(node)

    # Option lists stay complete: 21 dtypes (the reference shows 10).
    state, ios = yield descriptions()
    for io in (described(added)["dtype"], ios["dtype"]):
        options = io["value_options"]["options"]
        assert len(options["keys"]) == len(options["values"]) == 21

    # A 15-item default shows 10 items, as in the reference.
    yield client.call("set_io_value", nid=nid, ioid="x", value=list(range(15)), set_default=True)
    state, ios = yield descriptions()
    assert ios["x"]["default"] == list(range(10))
    # Only the default changed.
    assert {**ios["x"], "default": None} == {**described(added)["x"], "default": None}

    # A 1,000,000-item default leaves full_state as small as it was; the
    # saved state keeps all of it.
    big = list(range(1_000_000))
    yield large_reply(client, "set_io_value", nid=nid, ioid="x", value=big, set_default=True)
    state, ios = yield descriptions()
    assert ios["x"]["default"] == list(range(10))
    assert len(json.dumps(state)) < empty_size + 1000
    yield large_reply(client, "save")
    [saved] = json.loads((worker.data / "nodespace.json").read_bytes())["backend"]["nodes"]
    assert saved["io"]["x"]["default"] == big
