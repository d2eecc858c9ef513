"""
The worker's own shortcuts on Autobahn's and Twisted's per-frame paths:
frames sent in place on real TCP sockets, short client frames unmasked in
Python, and the C{--uvloop} option outside the launcher.
"""

import os

import pytest
import pytest_twisted
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python import usage

from funcnodes_tw.outbox import Outbox
from inprocess import Cert, add_command, start  # noqa: F401 (fixture)
from funcnodes_tw import wire
from funcnodes_tw.protocol import (
    PONG,
    SCATTER_MIN,
    SEND_LIMIT,
    SMALL_FRAME,
    frame_header,
    send_now,
    unmask,
)


@pytest.fixture(autouse=True)
def _clean(clean_reactor):
    yield


# region masking


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 17, 80, 125, 126, SMALL_FRAME - 1, SMALL_FRAME, 1000])
def test_unmask_is_autobahns_xor(length):
    mask, data = os.urandom(4), os.urandom(length)
    assert unmask(mask, data) == create_xor_masker(mask, length).process(data)


# region sending in place


class Receiver(protocol.Protocol):
    def __init__(self):
        self.received = bytearray()
        self._waiting = []

    def dataReceived(self, data):
        self.received += data
        for size, d in list(self._waiting):
            if len(self.received) >= size:
                self._waiting.remove((size, d))
                d.callback(bytes(self.received))

    def wait_for(self, size):
        if len(self.received) >= size:
            return defer.succeed(bytes(self.received))
        d = defer.Deferred()
        self._waiting.append((size, d))
        return d.addTimeout(10, reactor)


@pytest.fixture
def tcp_pair():
    """
    A real connection on 127.0.0.1: (the server side's transport, the
    client's L{Receiver}).
    """
    accepted = defer.Deferred()

    class Server(protocol.Protocol):
        def connectionMade(self):
            accepted.callback(self.transport)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Server), interface="127.0.0.1")
    receiver = Receiver()
    connected = protocol.ClientCreator(reactor, lambda: receiver).connectTCP(
        "127.0.0.1", port.getHost().port
    )
    transport = pytest_twisted.blockon(accepted)
    pytest_twisted.blockon(connected)
    yield transport, receiver
    receiver.transport.loseConnection()
    transport.loseConnection()
    pytest_twisted.blockon(port.stopListening())
    # Let both ends see the close before the reactor is checked.
    pytest_twisted.blockon(deferLater(reactor, 0.05, lambda: None))


def queued(transport):
    return transport._tempDataLen + len(transport.dataBuffer) - transport.offset


@pytest_twisted.inlineCallbacks
def test_an_idle_tcp_socket_sends_at_once(tcp_pair):
    transport, receiver = tcp_pair
    send_now(transport, b"hello")
    assert queued(transport) == 0
    assert transport not in reactor.getWriters(), "no reactor turn needed"
    received = yield receiver.wait_for(5)
    assert received == b"hello"


#: More than a loopback socket's buffers take at once.
BIG = 32 * 2**20


@pytest_twisted.inlineCallbacks
def test_a_big_payload_is_sent_beside_its_header_and_its_rest_queued_once(tcp_pair):
    transport, receiver = tcp_pair
    head, payload, second = b"head", os.urandom(BIG), b"second"
    send_now(transport, head, payload)
    left = queued(transport)
    assert 0 < left < len(payload), "the socket took part of it at once"
    assert transport._tempDataBuffer == [payload[-left:]], "the rest in one write"
    send_now(transport, second)
    assert queued(transport) == left + len(second), "the next frame waits behind the rest"
    received = yield receiver.wait_for(len(head) + len(payload) + len(second))
    assert received == head + payload + second
    assert queued(transport) == 0


@pytest_twisted.inlineCallbacks
def test_a_full_socket_gets_header_and_payload_in_order_later(tcp_pair):
    transport, receiver = tcp_pair
    filler = b""
    while True:  # fill the socket itself; the transport's buffer stays empty
        try:
            filler += b"f" * transport.socket.send(b"f" * 2**20)
        except BlockingIOError:
            break
    head, payload = b"head", memoryview(os.urandom(SCATTER_MIN))[1:]
    send_now(transport, head, payload)
    assert queued(transport) == len(head) + len(payload)
    received = yield receiver.wait_for(len(filler) + len(head) + len(payload))
    assert received == filler + head + bytes(payload)


@pytest_twisted.inlineCallbacks
def test_the_rest_of_a_big_frame_leaves_in_few_reactor_turns(tcp_pair, monkeypatch):
    """
    With the worker's C{SEND_LIMIT} (set when a WebSocket opens), not
    Twisted's 128 KiB a turn.
    """
    transport, receiver = tcp_pair
    monkeypatch.setattr(transport, "SEND_LIMIT", SEND_LIMIT)
    turns = []
    real = transport.doWrite
    monkeypatch.setattr(transport, "doWrite", lambda: turns.append(1) or real())
    send_now(transport, b"head", os.urandom(BIG))
    left = queued(transport)
    yield receiver.wait_for(BIG + 4)
    assert len(turns) <= left // SEND_LIMIT + 8, f"{len(turns)} turns for {left} bytes"


@pytest.mark.parametrize("tls", [False, True])
@pytest_twisted.inlineCallbacks
def test_a_big_binary_result_arrives_whole_before_the_next_reply(start, tmp_path, monkeypatch, tls):
    payload = os.urandom(20 * 2**20)

    def test_big(worker):
        return payload

    add_command(monkeypatch, test_big)
    served = yield start(tls=Cert(tmp_path) if tls else None)
    client = yield served.connect()
    big = client.call("test_big", as_bytes=True, msg_id="big", timeout=30)
    after = client.call("uuid", msg_id="after", timeout=30)
    frame = yield big
    yield after
    assert frame["payload"] == payload
    assert frame["header"]["id"] == "big" and frame["chunk"] == "1/1"
    ids = [m["header"]["id"] if m.get("binary") else m.get("id") for m in client.transcript]
    assert ids.index("big") < ids.index("after")


@pytest_twisted.inlineCallbacks
def test_a_paused_producer_keeps_frames_queued(tcp_pair):
    transport, receiver = tcp_pair

    transport.registerProducer(Outbox(transport.write, 100, lambda: None), True)
    transport.producerPaused = True
    send_now(transport, b"later")
    assert queued(transport) == 5
    received = yield receiver.wait_for(5)
    assert received == b"later"
    transport.unregisterProducer()


def test_other_transports_take_the_ordinary_write():
    transport = StringTransport()
    send_now(transport, b"frame")
    assert transport.value() == b"frame"


# region uvloop


def test_uvloop_needs_the_launcher():
    """
    Here, as under twistd, the reactor already runs on asyncio's own loop.
    """
    from funcnodes_tw.tap import Options

    with pytest.raises(usage.UsageError, match="funcnodes-tw only"):
        Options().parseOptions(["--uvloop"])


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
@pytest.mark.parametrize("binary", [False, True])
def test_frames_are_framed_as_autobahn_frames_them(length, binary):
    payload = os.urandom(length)
    autobahn_frame = autobahn_protocol.PreparedMessage(payload, binary, False, True).payloadHybi
    assert frame_header(length, binary) + payload == autobahn_frame


def test_the_framed_pong_is_the_pong_text_framed():
    assert PONG.payloadHybi == frame_header(len(wire.PONG), False) + wire.PONG
