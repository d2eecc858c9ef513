"""
The WebSocket protocol in memory: Autobahn server and client over iosim.

No sockets: the worker's real factory (built by L{WorkerService}) talks to an
Autobahn client through L{twisted.test.iosim}, and Autobahn's timers run on a
L{MemoryReactorClock}. funcnodes-core still needs the running asyncio loop
(it schedules triggers with C{asyncio.create_task}, and events are flushed
with the loop's C{call_soon}), so L{Session.settle} lets the real reactor
run until it is idle between pumps.
"""

import asyncio
import json

import pytest
import pytest_twisted
import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

import funcnodes_core as fn
from funcnodes_tw import aio, commands
from funcnodes_tw.persistence import WorkerFiles
from funcnodes_tw.settings import Settings
from funcnodes_tw.service import WorkerService
from funcnodes_tw.worker import Worker

MAX_SIZE = 1024 * 1024
HEADER_END = b"\r\n\r\n"


@pytest.fixture(autouse=True)
def _clean(clean_reactor):
    yield


@fn.NodeDecorator("tw_test_add", name="Add")
def _add(a: int = 1, b: int = 2) -> int:
    return a + b


_SHELF = fn.Shelf(name="tw test", nodes=[_add])


class RecordingClient(WebSocketClientProtocol):
    """
    Keeps every frame it receives: JSON text as a dict, binary frames as
    C{{"binary": (header bytes, payload)}}.
    """

    def onConnect(self, response):
        self.frames = []
        self.texts = []
        self.closed = None

    def onMessage(self, payload, isBinary):
        if not isBinary:
            self.texts.append(payload)
        if isBinary:
            head, _, body = payload.partition(HEADER_END)
            self.frames.append({"binary": (head, body)})
        else:
            self.frames.append(json.loads(payload))

    def onClose(self, wasClean, code, reason):
        self.closed = (wasClean, code)

    def onPing(self, payload):
        self.pings = getattr(self, "pings", 0) + 1
        super().onPing(payload)

    def send_json(self, message):
        self.sendMessage(json.dumps(message).encode(), isBinary=False)

    def results(self):
        return [f for f in self.frames if f.get("type") == "result"]


class Session:
    """
    One worker and any number of in-memory clients connected to it.
    """

    def __init__(self, tmp_path, clock):
        self.clock = clock
        files = WorkerFiles("memworker", root=tmp_path / "workers")
        files.create()
        self.worker = Worker(files, "memworker", clock=clock)
        self.worker.nodespace.add_shelf(_SHELF)
        self.service = WorkerService(self.worker, clock, Settings(max_message_size=MAX_SIZE))
        self.stops = []
        self.worker.stop = lambda: self.stops.append(clock.seconds())
        self.factory = self.service.factory
        self.pumps = []
        self._port = 40000

    def connect(self):
        self._port += 1
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", self._port))
        client_factory = WebSocketClientFactory("ws://127.0.0.1:9382", reactor=self.clock)
        client_factory.protocol = RecordingClient
        client_factory.setProtocolOptions(autoPingInterval=0)
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9382))
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True),
            client,
            iosim.FakeTransport(client, isServer=False),
        )
        self.pumps.append(pump)
        self.flush()
        assert client.state == client.STATE_OPEN
        return client

    def flush(self):
        for _ in range(10):
            if not any([pump.flush() for pump in self.pumps]):
                break

    @pytest_twisted.inlineCallbacks
    def settle(self, turns=3):
        """
        Pump, and let the real loop run queued events and asyncio tasks
        until it is idle, when the hub sends the node events it held.
        """
        for _ in range(turns):
            self.flush()
            idle = Deferred()
            aio.call_when_idle(lambda: idle.callback(None), 1.0)
            yield idle
        self.flush()

    def close_all(self):
        for client in list(self.clients()):
            if client.state == client.STATE_OPEN:
                client.sendClose()
        self.flush()
        self.clock.advance(5)
        self.flush()

    def clients(self):
        return [pump.client for pump in self.pumps]


@pytest.fixture
def session(tmp_path, monkeypatch):
    clock = MemoryReactorClock()
    monkeypatch.setattr(txaio.tx.config, "loop", clock)
    s = Session(tmp_path, clock)
    yield s
    s.close_all()
    assert s.service.hub.clients == set(), "a connection outlived the test"


@pytest.fixture
def slow(monkeypatch):
    """
    A test-only command that waits for an asyncio future the test resolves.
    """
    future = asyncio.get_event_loop().create_future()

    async def tw_test_slow(worker):
        return await future

    def tw_test_echo(worker, value):
        return value

    monkeypatch.setitem(commands.COMMANDS, "tw_test_slow", _command(tw_test_slow))
    monkeypatch.setitem(commands.COMMANDS, "tw_test_echo", _command(tw_test_echo))
    yield future
    if not future.done():
        future.cancel()


def _command(function):
    return commands.Command.of(function, False)


def cmd(name, msgid=None, **kwargs):
    message = {"type": "cmd", "cmd": name, "kwargs": kwargs}
    if msgid is not None:
        message["id"] = msgid
    return message


def of_type(client, kind):
    return [f for f in client.frames if f.get("type") == kind]


def listening_client(session):
    """
    A client that has sent a message, so it receives broadcasts.
    """
    client = session.connect()
    client.send_json({"type": "ping"})
    session.flush()
    assert client.texts == [b'{"type": "pong"}']
    client.frames.clear()
    client.texts.clear()
    return client


# region routing


@pytest_twisted.inlineCallbacks
def test_result_and_error_only_to_requester(session):
    a, b = listening_client(session), listening_client(session)
    a.send_json(cmd("uuid", "a1"))
    a.send_json(cmd("no_such_command", "a2"))
    yield session.settle()
    assert a.frames[0] == {"type": "result", "result": "memworker", "id": "a1"}
    assert a.frames[1]["type"] == "error" and a.frames[1]["id"] == "a2"
    assert b.frames == []


@pytest_twisted.inlineCallbacks
def test_nsevents_go_to_every_client_that_spoke(session):
    a, b = listening_client(session), listening_client(session)
    silent = session.connect()
    a.send_json(cmd("add_node", "a1", id="tw_test_add"))
    yield session.settle()
    nid = a.results()[0]["result"]["id"]
    for client in (a, b):
        added = [f for f in of_type(client, "nsevent") if f["event"] == "node_added"]
        assert [f["data"]["node"]["id"] for f in added] == [nid]
    # The manager's probe reads one frame after 'uuid': nothing may come first.
    assert silent.frames == []
    silent.send_json({"type": "cmd", "cmd": "uuid"})
    yield session.settle()
    assert silent.frames[0] == {"type": "result", "result": "memworker", "id": None}


@pytest_twisted.inlineCallbacks
def test_ping_answered_only_to_sender(session):
    a, b = listening_client(session), listening_client(session)
    a.send_json({"type": "ping"})
    yield session.settle()
    assert a.texts == [b'{"type": "pong"}']
    assert b.texts == [] and b.frames == []


@pytest_twisted.inlineCallbacks
def test_every_spelling_of_a_ping_gets_the_same_pong(session, monkeypatch):
    """
    The UI's and json.dumps' spellings skip the JSON parser; others take
    it. Both answer with the same bytes.
    """
    parsed = []
    parse = session.service.dispatcher.parse
    monkeypatch.setattr(
        session.service.dispatcher, "parse", lambda c, p: parsed.append(p) or parse(c, p)
    )
    a = session.connect()
    for text in (b'{"type":"ping"}', b'{"type": "ping"}', b'{ "type": "ping", "id": 7 }'):
        a.sendMessage(text)
    yield session.settle()
    assert a.texts == [b'{"type": "pong"}'] * 3
    assert parsed == [b'{ "type": "ping", "id": 7 }']


# endregion
# region auto-ping


def server_of(session, client):
    return next(p.server for p in session.pumps if p.client is client)


def test_a_client_that_talks_is_not_pinged(session):
    """
    Its own frames (the UI pings every 2 s) stand in for pongs.
    """
    a = session.connect()
    for _ in range(30):
        a.send_json({"type": "ping"})
        session.flush()
        session.clock.advance(2)
    session.flush()
    assert getattr(a, "pings", 0) == 0
    assert a.state == a.STATE_OPEN and len(a.texts) == 30


def test_a_client_that_went_silent_is_pinged_then_dropped(session):
    """
    Pinged an interval after its last frame; dropped within interval +
    timeout when the pong never comes (a half-open connection). Timers
    may fire up to a second early (protocol.TIMER_SLACK).
    """
    settings = session.service.settings
    a = session.connect()
    server = server_of(session, a)
    session.clock.advance(settings.ping_interval / 2)
    a.send_json({"type": "ping"})
    session.flush()
    sent = len(server.transport.stream)
    # From here on nothing is pumped: the client has vanished.
    for _ in range(int(settings.ping_interval - 2)):
        session.clock.advance(1)
    assert len(server.transport.stream) == sent, "pinged before an interval of silence"
    assert server.state == server.STATE_OPEN
    for _ in range(int(settings.ping_timeout + 2)):
        session.clock.advance(1)
    assert server.transport.stream[sent][:1] == b"\x89"  # a ping
    assert server.state == server.STATE_CLOSED
    session.flush()
    assert server not in session.service.hub.clients


# endregion
# region ordering


@pytest_twisted.inlineCallbacks
def test_ping_answered_while_a_slow_command_runs(session, slow):
    a = session.connect()
    a.send_json(cmd("tw_test_slow", 1))
    a.send_json({"type": "ping"})
    yield session.settle()
    assert a.frames == [{"type": "pong"}]
    slow.set_result("done")
    yield session.settle()
    assert a.frames == [{"type": "pong"}, {"type": "result", "result": "done", "id": 1}]


@pytest_twisted.inlineCallbacks
def test_commands_of_one_client_run_in_order(session, slow):
    a, b = session.connect(), session.connect()
    a.send_json(cmd("tw_test_slow", 1))
    a.send_json(cmd("uuid", 2))
    b.send_json(cmd("uuid", 3))
    yield session.settle()
    # A's second command waits for its first; B is not blocked by A.
    assert a.frames == []
    assert b.frames == [{"type": "result", "result": "memworker", "id": 3}]
    slow.set_result("first")
    yield session.settle()
    assert [(f["id"], f["result"]) for f in a.results()] == [(1, "first"), (2, "memworker")]


def test_replies_to_commands_read_together_leave_in_one_write(session):
    a = session.connect()
    server = session.pumps[-1].server
    writes = []
    write = server.transport.write
    server.transport.write = lambda data: writes.append(data) or write(data)
    for msgid in (1, 2, 3):
        a.send_json(cmd("uuid", msgid))
    session.flush()  # the three frames reach the worker in one read
    assert [f["id"] for f in a.results()] == [1, 2, 3]
    assert len(writes) == 1


@pytest_twisted.inlineCallbacks
def test_result_comes_before_the_events_it_caused(session):
    a = session.connect()
    a.send_json(cmd("add_node", "add", id="tw_test_add"))
    yield session.settle()
    kinds = [f.get("type") or "binary" for f in a.frames]
    events = [f.get("event") for f in a.frames]
    assert kinds[0] == "result" and a.frames[0]["id"] == "add"
    assert "node_added" in events
    assert kinds.index("result") < events.index("node_added")


# endregion
# region message ids and bad input


@pytest.mark.parametrize("msgid", [7, 0, "x", {"nested": [1, "two"]}, [1, 2], 1.5])
@pytest_twisted.inlineCallbacks
def test_id_is_echoed_verbatim(session, msgid):
    a = session.connect()
    a.send_json(cmd("uuid", msgid))
    a.send_json(cmd("nope", msgid))
    yield session.settle()
    assert [f["id"] for f in a.frames] == [msgid, msgid]
    assert [f["type"] for f in a.frames] == ["result", "error"]


@pytest_twisted.inlineCallbacks
def test_missing_id_is_echoed_as_null(session):
    a = session.connect()
    a.send_json({"type": "cmd", "cmd": "uuid"})
    yield session.settle()
    assert a.texts == [b'{"type":"result","result":"memworker","id":null}']


@pytest_twisted.inlineCallbacks
def test_invalid_json_gets_an_error_and_the_connection_stays(session):
    a = session.connect()
    a.sendMessage(b"{not json", isBinary=False)
    yield session.settle()
    assert len(a.frames) == 1
    error = a.frames[0]
    assert error["type"] == "error" and error["id"] is None
    assert "Invalid JSON" in error["error"]
    assert error["tb"] == []
    a.send_json(cmd("uuid", "after"))
    yield session.settle()
    assert a.frames[1] == {"type": "result", "result": "memworker", "id": "after"}
    assert a.closed is None


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"text"', b"42"])
@pytest_twisted.inlineCallbacks
def test_json_that_is_not_an_object_gets_an_error(session, payload):
    a = session.connect()
    a.sendMessage(payload, isBinary=False)
    yield session.settle()
    assert [f["type"] for f in a.frames] == ["error"]
    assert a.closed is None


@pytest_twisted.inlineCallbacks
def test_messages_of_other_types_are_ignored(session):
    a = session.connect()
    a.send_json({"type": "result", "result": 1})
    a.send_json({"no": "type"})
    yield session.settle()
    assert a.frames == []


@pytest_twisted.inlineCallbacks
def test_missing_cmd_is_an_error(session):
    a = session.connect()
    a.send_json({"type": "cmd", "id": "m"})
    yield session.settle()
    [error] = a.frames
    assert error["type"] == "error" and error["id"] == "m"
    assert "'cmd'" in error["error"]


@pytest_twisted.inlineCallbacks
def test_unknown_command_does_not_list_the_commands(session):
    a = session.connect()
    a.send_json(cmd("bogus_command", "u"))
    yield session.settle()
    [error] = a.frames
    assert error["type"] == "error" and error["id"] == "u"
    assert "bogus_command" in error["error"]
    for name in ("add_node", "stop_worker", "get_library"):
        assert name not in error["error"]


@pytest.mark.parametrize(
    "message, words",
    [
        (cmd("uuid", "k", bogus=1), ["uuid", "bogus"]),
        (cmd("add_node", "k"), ["add_node", "id"]),
        ({"type": "cmd", "cmd": "uuid", "id": "k", "kwargs": [1]}, ["uuid", "kwargs"]),
    ],
)
@pytest_twisted.inlineCallbacks
def test_wrong_kwargs_give_a_clear_error(session, message, words):
    a = session.connect()
    a.send_json(message)
    yield session.settle()
    [error] = a.frames
    assert error["type"] == "error" and error["id"] == "k"
    for word in words:
        assert word in error["error"]


@pytest_twisted.inlineCallbacks
def test_binary_frame_from_client_is_an_error(session):
    a = session.connect()
    a.sendMessage(b"\x00\x01binary", isBinary=True)
    yield session.settle()
    [error] = a.frames
    assert error["type"] == "error" and error["id"] is None
    assert "Binary" in error["error"]
    assert a.closed is None


# endregion
# region replies


@pytest.mark.parametrize(
    "value, mime, payload",
    [
        ("memworker", "text/plain", b"memworker"),
        (7, "application/fn.struct.!q", (7).to_bytes(8, "big", signed=True)),
        (b"\x00\xff", "application/octet-stream", b"\x00\xff"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_as_bytes_result_is_one_binary_frame(session, slow, value, mime, payload):
    a, b = listening_client(session), listening_client(session)
    if isinstance(value, bytes):
        # JSON cannot carry bytes; let the slow command return them.
        slow.set_result(value)
        a.send_json({**cmd("tw_test_slow", "bin"), "as_bytes": True})
    else:
        a.send_json({**cmd("tw_test_echo", "bin", value=value), "as_bytes": True})
    yield session.settle()
    [frame] = a.frames
    head, body = frame["binary"]
    assert head.startswith(b"chunk=1/1;msgid=")
    assert head.split(b";", 2)[2] == f"id=bin; mime={mime}; type=result".encode()
    assert body == payload
    assert b.frames == []


@pytest_twisted.inlineCallbacks
def test_binary_frames_may_exceed_the_inbound_limit(session, slow):
    """
    The message size limit is for what clients send. Binary frames have no
    large-message fallback, so a value bigger than the limit must still go out
    (the reference's aiohttp limit is inbound only); Autobahn's own cap would
    refuse to send it.
    """
    a = listening_client(session)
    big = bytes(range(256)) * (MAX_SIZE // 256 + 1)
    slow.set_result(big)
    a.send_json({**cmd("tw_test_slow", "big"), "as_bytes": True})
    yield session.settle()
    [frame] = a.frames
    head, body = frame["binary"]
    assert head.split(b";", 2)[2] == b"id=big; mime=application/octet-stream; type=result"
    assert body == big
    assert a.closed is None


@pytest_twisted.inlineCallbacks
def test_as_bytes_false_or_absent_gives_json(session):
    a = session.connect()
    a.send_json({**cmd("uuid", 1), "as_bytes": False})
    a.send_json(cmd("uuid", 2))
    yield session.settle()
    assert [f["result"] for f in a.frames] == ["memworker", "memworker"]


@pytest_twisted.inlineCallbacks
def test_stop_worker_answers_true_before_stopping(session):
    a = session.connect()
    a.send_json(cmd("stop_worker", "stop"))
    session.flush()
    # The reply is out before the worker stops (the manager waits for it).
    assert a.frames == [{"type": "result", "result": True, "id": "stop"}]
    assert session.stops == []
    yield session.settle()
    assert len(session.stops) == 1


# endregion
