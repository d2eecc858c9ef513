"""
The hub's fan-out: node events held for the end of a burst, and everything
else sent at once without overtaking them.
"""

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from funcnodes_tw import aio, wire
from funcnodes_tw.hub import HOLD_MAX, SHARED_FRAME_MAX, Hub
from funcnodes_tw.outbox import Outbox


class FakeFactory:
    def prepareMessage(self, payload, isBinary):
        return ("prepared", payload)


class FakeClient:
    """
    What the hub needs of a WebSocket client, with a real outbox.
    """

    factory = FakeFactory()

    def __init__(self, listening=True):
        self.listening = listening
        self.received = []
        self.outbox = Outbox(self._write, 10**6, lambda: None)

    def _write(self, item, kind):
        self.received.append(item[1] if isinstance(item, tuple) else item)

    def send_text(self, payload, hold=False):
        self.outbox.put(payload, False, hold=hold)

    def send_binary(self, payload, key=None, hold=False):
        self.outbox.put(payload, True, key, hold=hold)

    def send_prepared(self, prepared, size, key=None, hold=False):
        self.outbox.put(prepared, "prepared", key, size, hold)


class Idle:
    """
    A stand-in for the reactor going idle: fired by the test.
    """

    def __init__(self):
        self.waiting = []

    def __call__(self, function, max_wait):
        self.waiting.append((function, max_wait))

    def fire(self):
        waiting, self.waiting = self.waiting, []
        for function, _ in waiting:
            function()


def hub_with(*clients):
    idle = Idle()
    hub = Hub(10**6, when_idle=idle)
    for client in clients:
        hub.join(client)
    return hub, idle


def texts(client):
    messages = [wire.loads(frame) for frame in client.received if frame[:1] == b"{"]
    return [message["event"] for message in messages if message["type"] == "nsevent"]


def test_held_events_reach_every_listener_when_the_burst_ends():
    a, b, quiet = FakeClient(), FakeClient(), FakeClient(listening=False)
    hub, idle = hub_with(a, b, quiet)
    hub.broadcast(wire.nsevent("one", {}), hold=True)
    hub.broadcast_binary(b"\x01", {"type": "io_value", "node": "n", "io": "a"}, hold=True)
    hub.broadcast(wire.nsevent("two", {}), hold=True)
    assert a.received == b.received == []
    assert [wait for _, wait in idle.waiting] == [HOLD_MAX], "one release per burst"
    idle.fire()
    for client in (a, b):
        assert texts(client) == ["one", "two"]
        assert client.received[1].endswith(b"\r\n\r\n\x01")
    assert quiet.received == []


def test_a_reply_goes_out_at_once_after_the_events_held_before_it():
    a, b = FakeClient(), FakeClient()
    hub, idle = hub_with(a, b)
    hub.broadcast(wire.nsevent("before", {}), hold=True)
    hub.send(a, wire.result("done", "id1"))
    assert texts(a) == ["before"]
    assert wire.loads(a.received[-1])["type"] == "result"
    assert b.received == [], "the other client's events still wait"
    idle.fire()
    assert texts(b) == ["before"]
    assert len(a.received) == 2


def test_a_broadcast_that_does_not_hold_goes_out_at_once():
    a = FakeClient()
    hub, idle = hub_with(a)
    hub.broadcast(wire.progress("saving", "info", 0, False))
    assert len(a.received) == 1 and idle.waiting == []


def test_a_new_burst_gets_a_new_release():
    a = FakeClient()
    hub, idle = hub_with(a)
    hub.broadcast(wire.nsevent("one", {}), hold=True)
    idle.fire()
    hub.broadcast(wire.nsevent("two", {}), hold=True)
    assert texts(a) == ["one"] and len(idle.waiting) == 1
    idle.fire()
    assert texts(a) == ["one", "two"]


def test_closing_sends_the_held_events_before_the_close_frame():
    class Closing(FakeClient):
        def going_away(self, reason):
            self.received.append(b"close")

    a = Closing()
    hub, idle = hub_with(a)
    hub.broadcast(wire.nsevent("last", {}), hold=True)
    clock = Clock()
    hub.close_all("bye", clock, 1)
    assert texts(a) == ["last"] and a.received[-1] == b"close"
    clock.advance(1)


def _hops(order, n):
    """
    Work that keeps the loop busy for C{n} turns, one callback after another.
    """
    loop = aio.event_loop()

    def hop(left):
        order.append(left)
        if left:
            loop.call_soon(hop, left - 1)

    loop.call_soon(hop, n)


@pytest.mark.parametrize("max_wait, idle_at", [(60, 6), (0, 1)])
@pytest_twisted.ensureDeferred
async def test_call_when_idle_waits_for_the_work_to_end_or_max_wait(max_wait, idle_at):
    order, done = [], Deferred()
    _hops(order, 5)
    aio.call_when_idle(lambda: done.callback(order.append("idle")), max_wait)
    await done
    assert order.index("idle") == idle_at, order
    while 0 not in order:  # let the hops end
        d = Deferred()
        aio.event_loop().call_soon(d.callback, None)
        await d


def test_a_big_binary_broadcast_reaches_each_client_uncopied():
    """
    Framing a message once for several clients copies its payload: a big
    one goes to each client as it is.
    """
    a, b = FakeClient(), FakeClient()
    hub, idle = hub_with(a, b)
    payload = bytes(SHARED_FRAME_MAX)
    hub.broadcast_binary(payload, {"type": "io_value", "node": "n", "io": "a"})
    [frame], [same] = a.received, b.received
    assert frame is same and frame.payload is payload
