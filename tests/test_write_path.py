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
from funcnodes_tw import wire
from funcnodes_tw.protocol import (
    PONG,
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


@pytest_twisted.inlineCallbacks
def test_a_partial_send_queues_the_rest_and_later_frames_wait_behind_it(tcp_pair, monkeypatch):
    transport, receiver = tcp_pair
    real = transport.writeSomeData
    sizes = []

    def three_bytes_first(data):
        sizes.append(len(data))
        return real(bytes(data[:3]) if len(sizes) == 1 else data)

    monkeypatch.setattr(transport, "writeSomeData", three_bytes_first)
    first, second = os.urandom(1000), b"second"
    send_now(transport, first)
    assert queued(transport) == len(first) - 3
    send_now(transport, second)
    assert sizes == [len(first)], "the second frame may not overtake the first's rest"
    received = yield receiver.wait_for(len(first) + len(second))
    assert received == first + second
    assert queued(transport) == 0


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
