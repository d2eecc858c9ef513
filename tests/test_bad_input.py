"""
Bad input over real sockets: a worker listening on 127.0.0.1 (production
settings: 16 MiB cap on a client's message, 1 MiB threshold for replies to
go out as C{large_message}) and Autobahn clients sending what a broken or
hostile client would.

Every bad message gets a clear C{error} reply (its C{id} echoed when the
message could be parsed) or, where the WebSocket protocol itself is broken,
a defined close code (1007 invalid UTF-8, 1009 too big); the connection
stays open wherever the protocol allows; messages of other types are
ignored, as by the reference. After each test the worker still answers
C{uuid} on a new connection and the saved C{nodespace.json} is unchanged
byte for byte.

To tell "one reply" from "no reply", each bad message is followed by a
sentinel command on the same connection: commands run in order and parse
errors are answered at once, so every reply to the bad message arrives
before the sentinel's result.
"""

import json

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from funcnodes_tw import persistence
from funcnodes_tw.settings import Settings
from inprocess import start  # noqa: F401  (the fixture)

MiB = 1024 * 1024
INCOMING = Settings().max_incoming_size


# region helpers


def is_reply(message):
    """
    A reply to a command (as opposed to a broadcast or a pong).
    """
    if message.get("binary"):
        return message["header"].get("type") == "result"
    return message.get("type") in ("result", "error", "large_message")


class Probe:
    """
    One worker with a saved graph, and a client that sends bad input.
    """

    def __init__(self, worker, client, nid, saved):
        self.worker = worker
        self.client = client
        self.nid = nid
        self.saved = saved
        self._sentinels = 0
        #: Failures the worker logged (an exception nothing handled).
        self.failures = []

    def observe(self, event):
        if event.get("log_failure") is not None:
            self.failures.append(event["log_failure"])

    @property
    def state_file(self):
        return self.worker.service.worker.files.state

    def send_raw(self, payload, binary=False):
        self.client._proto.sendMessage(payload, isBinary=binary)

    def send(self, message):
        self.send_raw(json.dumps(message).encode())

    @defer.inlineCallbacks
    def replies_to(self, payload, binary=False):
        """
        Send one message and return every reply it got (normally one).
        """
        start_at = len(self.client.transcript)
        self.send_raw(payload, binary)
        self._sentinels += 1
        sentinel = f"sentinel-{self._sentinels}"
        self.send({"type": "cmd", "cmd": "uuid", "id": sentinel})
        yield self.client.wait_for(
            lambda m: m.get("type") == "result" and m.get("id") == sentinel, start=start_at
        )
        received = self.client.transcript[start_at:]
        end = next(i for i, m in enumerate(received) if m.get("id") == sentinel)
        return [m for m in received[:end] if is_reply(m)]

    @defer.inlineCallbacks
    def error_for(self, message):
        """
        Send C{message} (a dict, or raw bytes) and return its one error reply.
        """
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        replies = yield self.replies_to(payload)
        assert len(replies) == 1, replies
        (reply,) = replies
        assert reply["type"] == "error", reply
        assert set(reply) == {"type", "error", "tb", "id"}
        assert isinstance(reply["error"], str) and reply["error"].strip()
        assert reply["tb"] == []  # no tracebacks (paths) outside debug mode
        return reply

    @defer.inlineCallbacks
    def check_alive(self):
        """
        The worker still serves (a new connection answers C{uuid}) and what
        it saved is untouched.
        """
        assert not self.failures, self.failures
        assert self.worker.service.running
        fresh = yield self.worker.connect(listening=False)
        assert (yield fresh.call("uuid")) == "http_bad"
        yield fresh.close()
        # No save is due (the save loop would write within 1 s), none was made.
        assert not self.worker.service.worker.save_requested
        assert self.state_file.read_bytes() == self.saved


@pytest.fixture
def probe(start):
    """
    C{yield probe()} gives a L{Probe} whose worker saved a graph of one node.
    """
    probes = []

    @defer.inlineCallbacks
    def _probe():
        worker = yield start(name="bad")
        client = yield worker.connect()
        node = yield client.call("add_node", id="add_node")
        yield client.call("save")  # writes now, and answers once it is written
        assert not worker.service.worker.save_requested  # add_node's request is done too
        saved = worker.service.worker.files.state.read_bytes()
        assert node["id"].encode() in saved
        probe = Probe(worker, client, node["id"], saved)
        globalLogPublisher.addObserver(probe.observe)
        probes.append(probe)
        return probe

    yield _probe
    for probe in probes:
        globalLogPublisher.removeObserver(probe.observe)


# endregion
# region frames that are not JSON objects


@pytest_twisted.inlineCallbacks
def test_invalid_json(probe):
    p = yield probe()
    for payload in (b"{", b"not json", b'{"type": "cmd", "cmd": "uuid",}', b"{'a': 1}",
                    b"", b" ", b'{"id": NaN}', b'{"id": 1e400}', b"\xef\xbb\xbf{}",
                    b'{"type": "cmd", "cmd": "uuid", "id": "\\ud800"}'):
        reply = yield p.error_for(payload)
        assert reply["id"] is None
        assert reply["error"].startswith("Invalid JSON: ")
    assert not p.client.is_closed
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_json_that_is_not_an_object(probe):
    p = yield probe()
    for value in ([], [{"type": "cmd", "cmd": "uuid", "id": 1}], 0, 3.5, -1, "uuid",
                  None, True, False):
        reply = yield p.error_for(json.dumps(value).encode())
        assert reply == {"type": "error", "error": "A message must be a JSON object",
                         "tb": [], "id": None}
    assert not p.client.is_closed
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_other_message_types_are_ignored(probe):
    """
    Like the reference: objects without C{type}, or of another type than
    C{cmd}/C{ping}, get no reply (clients send e.g. C{pong}); nothing breaks.
    """
    p = yield probe()
    for message in ({}, {"id": 7}, {"cmd": "uuid", "id": 8}, {"type": "pong"},
                    {"type": "result", "id": 9}, {"type": "CMD", "cmd": "uuid"},
                    {"type": 5}, {"type": None}, {"type": ["cmd"]}, {"type": {"a": 1}}):
        assert (yield p.replies_to(json.dumps(message).encode())) == []
    # ping is answered with a pong (not a reply to a command).
    start_at = len(p.client.transcript)
    assert (yield p.replies_to(b'{"type": "ping", "id": 1}')) == []
    assert {"type": "pong"} in p.client.transcript[start_at:]
    assert not p.client.is_closed
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_binary_frames_are_refused_with_an_error(probe):
    p = yield probe()
    for payload in (b"", b"\x00\xff" * 100, json.dumps({"type": "cmd", "cmd": "uuid"}).encode(),
                    b"chunk=1/1;msgid=x;id=1; type=result\r\n\r\n\x01"):
        replies = yield p.replies_to(payload, binary=True)
        assert replies == [{"type": "error", "tb": [], "id": None,
                            "error": "Binary frames are not accepted; send JSON text"}]
    assert not p.client.is_closed
    yield p.check_alive()


# endregion
# region malformed commands


@pytest_twisted.inlineCallbacks
def test_missing_cmd(probe):
    p = yield probe()
    for msgid in ("m-1", None, 5):
        message = {"type": "cmd", "kwargs": {}}
        if msgid is not None:
            message["id"] = msgid
        reply = yield p.error_for(message)
        assert reply["id"] == msgid
        assert reply["error"] == "A command message needs 'cmd'"
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_cmd_that_is_not_a_known_name(probe):
    p = yield probe()
    for cmd in (5, 1.5, None, True, {"name": "uuid"}, ["uuid"], "", "UUID", "uuid ",
                "__init__", "run", "_saved", "COMMANDS", "no_such_command"):
        reply = yield p.error_for({"type": "cmd", "cmd": cmd, "id": "c-1"})
        assert reply["id"] == "c-1"
        assert reply["error"] == f"Unknown command {cmd!r}"
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_kwargs_that_are_not_an_object(probe):
    p = yield probe()
    for kwargs in ([], ["x"], "x", "", 5, True):
        reply = yield p.error_for({"type": "cmd", "cmd": "uuid", "kwargs": kwargs, "id": "k"})
        assert reply == {"type": "error", "error": "kwargs of 'uuid' must be an object",
                         "tb": [], "id": "k"}
    # null counts as no kwargs, as in the reference.
    assert (yield p.replies_to(b'{"type": "cmd", "cmd": "uuid", "kwargs": null, "id": 1}')) == [
        {"type": "result", "result": "http_bad", "id": 1}
    ]
    yield p.check_alive()


#: (command, kwargs, text the error must contain)
WRONG_ARGUMENTS = [
    ("uuid", {"bogus": 1},
     "Invalid arguments for 'uuid': got an unexpected keyword argument 'bogus'"),
    ("get_node", {}, "Invalid arguments for 'get_node': missing a required argument: 'id'"),
    ("add_edge", {"src_nid": "a"}, "missing a required argument: 'src_ioid'"),
    ("set_io_value", {"nid": "x", "ioid": "a"}, "missing a required argument: 'value'"),
    ("upload", {"data": 5, "filename": "a.txt"}, "data must be a base64 string"),
    ("upload", {"data": "***", "filename": "a.txt"}, "data must be base64"),
    ("load_data", {"data": []}, "data must be a worker state object"),
    ("update_worker_config", {"autostart": 5}, "Invalid autostart policy 5"),
    ("update_worker_config", {"update_on_startup": "yes"}, "update_on_startup must be an object"),
    ("add_shelf", {"src": 5}, "src must be a module name"),
    ("add_package_dependency", {"name": "a b; rm -rf /"}, ""),
    ("get_plugin_keys", {"type": "vue"}, "Plugin type vue not found"),
    ("call_external_worker", {"worker_id": "1", "class_id": "2", "method": "m", "kwargs": []},
     "kwargs must be an object"),
    ("update_external_worker", {"worker_id": "1", "class_id": "2", "config": 3},
     "config must be an object"),
    ("reload_local_scripts", {}, "Local scripts are disabled"),
]


@pytest.mark.parametrize("cmd,kwargs,text", WRONG_ARGUMENTS, ids=lambda v: str(v)[:30])
@pytest_twisted.inlineCallbacks
def test_wrong_arguments(probe, cmd, kwargs, text):
    p = yield probe()
    reply = yield p.error_for({"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": cmd})
    assert reply["id"] == cmd
    assert text in reply["error"]
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_wrongly_typed_ids_of_nodes_and_ios(probe):
    """
    Node, IO and group ids of the wrong JSON type, or unknown: an error that
    names the problem (not "unhashable type: 'list'" from funcnodes-core),
    never a crash, and the graph stays as it was.
    """
    p = yield probe()
    nid = p.nid
    before = yield p.client.call("get_nodes")
    cases = [
        ("get_node", {"id": 5}, "id of 'get_node' must be a string, not a number"),
        ("get_node", {"id": None}, "id of 'get_node' must be a string, not null"),
        ("get_node", {"id": {"a": 1}}, "id of 'get_node' must be a string, not an object"),
        ("get_node", {"id": "nope"}, "not found"),
        ("remove_node", {"id": ["x"]}, "id of 'remove_node' must be a string, not an array"),
        ("get_io_value", {"nid": nid, "ioid": 5}, "ioid of 'get_io_value' must be a string"),
        ("get_io_value", {"nid": nid, "ioid": "nope"}, "nope not found"),
        ("set_io_value", {"nid": [nid], "ioid": "a", "value": 1},
         "nid of 'set_io_value' must be a string"),
        ("set_default_value", {"nid": nid, "ioid": {"x": 1}, "value": 1},
         "ioid of 'set_default_value' must be"),
        ("add_edge", {"src_nid": nid, "src_ioid": "out", "trg_nid": 1.5, "trg_ioid": "a"},
         "trg_nid of 'add_edge' must be a string, not a number"),
        ("remove_edge", {"src_nid": nid, "src_ioid": "out", "trg_nid": nid, "trg_ioid": "zz"},
         "zz"),
        ("update_node", {"nid": nid, "data": "name"},
         "data of 'update_node' must be an object, not a string"),
        ("update_node_view", {"nid": nid, "data": 5},
         "data of 'update_node_view' must be an object"),
        ("update_io_value_options", {"nid": nid, "ioid": "a", "options": [1]},
         "options of 'update_io_value_options' must be an object, not an array"),
        ("update_group", {"gid": "nope", "data": {}}, "Group with id nope not found"),
        ("update_group", {"gid": ["x"], "data": {}}, "gid of 'update_group' must be a string"),
        ("remove_group", {"gid": {}}, "gid of 'remove_group' must be a string, not an object"),
        ("group_nodes", {"node_ids": [[nid]], "group_ids": []},
         "node_ids of 'group_nodes' must be an array of strings"),
        ("group_nodes", {"node_ids": [nid], "group_ids": 5},
         "group_ids of 'group_nodes' must be an array"),
        ("add_node", {"id": 5}, "id of 'add_node' must be a string"),
        ("add_node", {"id": ["add_node"]}, "must be a string, not an array"),
        ("add_node", {"id": "no.such.node"}, "no.such.node"),
        ("get_io_full_value", {"nid": nid, "ioid": None},
         "ioid of 'get_io_full_value' must be a string, not null"),
        ("get_external_worker_config", {"worker_id": {}, "class_id": []}, "worker_id of"),
        ("call_external_worker", {"worker_id": "w", "class_id": "c", "method": True},
         "method of 'call_external_worker' must be a string, not a boolean"),
    ]
    for cmd, kwargs, text in cases:
        reply = yield p.error_for({"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": cmd})
        assert reply["id"] == cmd
        assert text in reply["error"], (cmd, kwargs, reply["error"])
    assert (yield p.client.call("get_nodes")) == before
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_state_with_missing_node_classes(probe):
    """
    C{load_data} of a state whose nodes' package is not loaded: the nodes
    become placeholders that keep their IO ids and edges (as at startup),
    so that saving does not lose them. Before, their IOs got random ids
    and the edges were dropped.
    """
    p = yield probe()
    other = yield p.client.call("add_node", id="add_node")
    yield p.client.call(
        "add_edge", src_nid=p.nid, src_ioid="out", trg_nid=other["id"], trg_ioid="a"
    )
    state = yield p.client.call("get_save_state")
    yield p.client.call("remove_shelf", src="funcnodes_basic")
    yield p.client.call("load_data", data=state)
    again = yield p.client.call("get_save_state")
    assert again["backend"]["edges"] == state["backend"]["edges"]
    assert [sorted(n["io"]) for n in again["backend"]["nodes"]] == [
        sorted(n["io"]) for n in state["backend"]["nodes"]
    ]


# endregion
# region ids


def nested(depth, leaf=1):
    return "[" * depth + json.dumps(leaf) + "]" * depth


#: Odd but valid JSON ids, echoed verbatim.
ODD_IDS = [
    0, -1, -(2**63), 2**64 - 1, 3.25, -0.5, 1e300, 1e-300, True, False, None,
    "", " ", "ü€😀\u0000\u2028", "a;b=c\r\n\r\nd", "x" * 1000,
    [], [1, "2", None], {}, {"a": {"b": [{"c": {}}]}}, {"": 1, "💥": [1.5]},
    json.loads(nested(30)),
]


@pytest_twisted.inlineCallbacks
def test_odd_ids_are_echoed(probe):
    p = yield probe()
    for msgid in ODD_IDS:
        message = {"type": "cmd", "cmd": "uuid", "id": msgid}
        replies = yield p.replies_to(json.dumps(message).encode())
        assert replies == [{"type": "result", "result": "http_bad", "id": msgid}], msgid
        reply = yield p.error_for({"type": "cmd", "cmd": "nope", "id": msgid})
        assert reply["id"] == msgid
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_odd_ids_in_binary_results(probe):
    """
    A binary result's header holds C{str(id)}; C{;} and CR/LF in it must not
    break the header apart.
    """
    p = yield probe()
    for msgid in ("a;b=c\r\n\r\nd", {"a": [1, 2]}, 1.5, "ü€😀"):
        message = {"type": "cmd", "cmd": "uuid", "id": msgid, "as_bytes": True}
        (reply,) = yield p.replies_to(json.dumps(message).encode())
        assert reply["binary"]
        assert reply["header"]["type"] == "result"
        assert reply["payload"] == b"http_bad"
        assert ";" not in reply["header"]["id"] and "\r" not in reply["header"]["id"]
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_integer_ids_beyond_64_bits_come_back_as_floats(probe):
    """
    A known difference from the reference (which echoes any integer):
    orjson reads integers beyond 64 bits as floats, so such an id comes back
    rounded. The real clients use UUID strings.
    """
    p = yield probe()
    payload = b'{"type": "cmd", "cmd": "uuid", "id": 123456789012345678901234567890}'
    (reply,) = yield p.replies_to(payload)
    assert reply["id"] == pytest.approx(1.2345678901234568e29)
    assert isinstance(reply["id"], float)
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_huge_id(probe):
    """
    A 1 MB string id: echoed in full; the reply is over the 1 MiB threshold,
    so it is parked and served by C{GET /message/}.
    """
    p = yield probe()
    msgid = "i" * 1_000_000
    payload = json.dumps({"type": "cmd", "cmd": "uuid", "id": msgid}).encode()
    assert len(payload) < MiB
    (hint,) = yield p.replies_to(payload)
    assert hint["type"] == "large_message"
    response = yield p.worker.http.get(p.worker.url(f"/message/{hint['msg_id']}"))
    assert response.code == 200
    parked = json.loads((yield response.content()))
    assert parked == {"type": "result", "result": "http_bad", "id": msgid}
    # And as the id of an error.
    (hint,) = yield p.replies_to(json.dumps({"type": "cmd", "cmd": "nope", "id": msgid}).encode())
    response = yield p.worker.http.get(p.worker.url(f"/message/{hint['msg_id']}"))
    error = json.loads((yield response.content()))
    assert error["type"] == "error" and error["id"] == msgid
    assert error["error"] == "Unknown command 'nope'"
    assert not p.client.is_closed
    yield p.check_alive()


# endregion
# region deep nesting


@pytest_twisted.inlineCallbacks
def test_deep_nesting_is_refused_clearly(probe):
    """
    10 000 nested arrays (orjson reads at most 1024 levels): one clear
    error, no crash, no recursion anywhere.
    """
    p = yield probe()
    for where in ("kwargs", "id"):
        if where == "kwargs":
            text = ('{"type": "cmd", "cmd": "set_io_value", "id": "deep", '
                    '"kwargs": {"nid": "%s", "ioid": "a", "value": %s}}')
            payload = (text % (p.nid, nested(10_000))).encode()
        else:
            payload = ('{"type": "cmd", "cmd": "uuid", "id": %s}' % nested(10_000)).encode()
        reply = yield p.error_for(payload)
        assert reply["id"] is None  # the message could not be read at all
        assert reply["error"].startswith("Invalid JSON: depth limit exceeded")
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_nesting_beyond_what_the_worker_writes_back(probe):
    """
    orjson reads 1024 levels but writes 254; funcnodes-core's encoders
    recurse. Messages nested deeper than 254 levels are refused as they
    arrive, like the 10 000 levels: before the limit, a default nested ~600
    deep was accepted, and every later save failed.
    """
    p = yield probe()
    for depth in (255, 600, 1020):
        for template in ('{"type": "cmd", "cmd": "uuid", "id": %s}',
                         '{"type": "cmd", "cmd": "set_default_value", "id": "v", "kwargs": '
                         '{"nid": "%s", "ioid": "a", "value": %%s}}' % p.nid):
            payload = (template % nested(depth - 1)).encode()  # the message is 1 level
            reply = yield p.error_for(payload)
            assert reply["id"] is None
            assert reply["error"] == "Invalid JSON: nested deeper than 254 levels"
    # 254 levels are fine, and come back as they went.
    deep_id = nested(253)
    replies = yield p.replies_to(('{"type": "cmd", "cmd": "uuid", "id": %s}' % deep_id).encode())
    assert replies == [{"type": "result", "result": "http_bad", "id": json.loads(deep_id)}]
    # A list nested wide but shallow is not refused for its many brackets.
    wide = json.dumps([[[1]]] * 5000)
    replies = yield p.replies_to(('{"type": "cmd", "cmd": "uuid", "id": %s}' % wide).encode())
    assert replies[0]["type"] == "result"
    assert not p.client.is_closed
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_deepest_default_allowed_is_saved(probe):
    """
    A default nested as deep as a message may be is saved, and saving goes
    on working afterwards.
    """
    p = yield probe()
    value = nested(251)  # message, kwargs, value: 254 levels
    payload = ('{"type": "cmd", "cmd": "set_default_value", "id": "v", "kwargs": '
               '{"nid": "%s", "ioid": "a", "value": %s}}' % (p.nid, value)).encode()
    assert (yield p.replies_to(payload)) == [{"type": "result", "result": True, "id": "v"}]
    yield p.client.call("save")
    state = persistence.load_state(p.state_file)
    (node,) = state["backend"]["nodes"]
    assert node["io"]["a"]["default"] == json.loads(value)
    yield p.client.call("update_node", nid=p.nid, data={"name": "renamed"})
    yield p.client.call("save")
    assert persistence.load_state(p.state_file)["backend"]["nodes"][0]["name"] == "renamed"


# endregion
# region broken WebSocket frames


@pytest_twisted.inlineCallbacks
def test_invalid_utf8_closes_with_1007(probe):
    p = yield probe()
    for payload in (b'{"type": "cmd", "cmd": "uuid", "id": "\xff"}', b"\xc3\x28", b"\xed\xa0\x80"):
        client = yield p.worker.connect()
        client._proto.sendMessage(payload, isBinary=False)
        yield client.when_closed()
        assert client.close_code == 1007
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_oversized_message_closes_with_1009(probe):
    p = yield probe()
    client = yield p.worker.connect()
    # Just at the limit is fine (and gets an error: it is not JSON)...
    client._proto.sendMessage(b" " * INCOMING, isBinary=False)
    reply = yield client.wait_for(lambda m: m.get("type") == "error")
    assert reply["error"].startswith("Invalid JSON")
    # ...one byte more is not.
    message = json.dumps({"type": "cmd", "cmd": "uuid", "id": "x" * INCOMING}).encode()
    client._proto.sendMessage(message, isBinary=False)
    yield client.when_closed()
    assert client.close_code == 1009
    # The cap is on the whole message, also when it comes in small fragments.
    client = yield p.worker.connect()
    proto = client._proto
    proto.beginMessage(isBinary=False)
    for _ in range(INCOMING // (256 * 1024) + 1):
        proto.sendMessageFrame(b" " * (256 * 1024))
    proto.endMessage()
    yield client.when_closed()
    assert client.close_code == 1009
    yield p.check_alive()


@pytest_twisted.inlineCallbacks
def test_oversized_binary_frame_closes_with_1009(probe):
    p = yield probe()
    client = yield p.worker.connect()
    client._proto.sendMessage(b"\0" * (INCOMING + 1), isBinary=True)
    yield client.when_closed()
    assert client.close_code == 1009
    yield p.check_alive()


# endregion


@pytest_twisted.inlineCallbacks
def test_everything_on_one_connection(probe):
    """
    All of the recoverable bad input in a row on one connection, which
    keeps working throughout.
    """
    p = yield probe()
    deep = ('{"type": "cmd", "cmd": "uuid", "kwargs": {"x": %s}}' % nested(10_000)).encode()
    for payload in (b"{", b"[]", b"null", b'{"type": "cmd"}', b'{"type": "cmd", "cmd": 1}',
                    b'{"type": "cmd", "cmd": "uuid", "kwargs": []}', deep):
        assert len((yield p.replies_to(payload))) == 1
        assert (yield p.client.call("uuid")) == "http_bad"
    assert not p.client.is_closed
    yield p.check_alive()
