"""
The connected clients and the one way messages reach them.

A broadcast is encoded once and the same bytes go to every client. A client
receives broadcasts only after it sent its first message: the FuncNodes
manager's liveness probe reads exactly one frame after asking for the uuid,
and a broadcast arriving first would make it declare a live worker dead.

Node events are held in the clients' outboxes while the loop still has work
ready (a graph running), at most L{HOLD_MAX}, and then leave in one socket
write per client: a 50-node chain sends ~150 frames, and a write for each
cost more than making them.
"""

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from funcnodes_tw import aio, wire

_log = Logger()

#: The reference's 10 % margin when deciding that a text message is too big.
SIZE_MARGIN = 1.1
#: Longest time a held node event waits for its burst to end: a client
#: reads the frames of a running graph while it runs, and a longer hold
#: leaves it more to read once the graph is done (chain0: 1 ms beat 2 ms).
HOLD_MAX = 0.001
#: Binary messages from this size on are not framed once for several
#: clients: framing copies the payload, which each client's protocol
#: writes as it is (an image preview to every open UI).
SHARED_FRAME_MAX = 64 * 1024


class Hub:
    def __init__(
        self,
        max_message_size,
        large_messages=None,
        max_binary_frame=None,
        when_idle=None,
        metrics=None,
    ):
        """
        @param when_idle: C{when_idle(function, max_wait)} calls C{function}
            once the reactor has nothing else to do, or after C{max_wait}.
        @param metrics: a L{funcnodes_tw.metrics.Metrics} counting the
            messages parked as large ones, or None.
        """
        self.metrics = metrics
        self.clients = set()
        self._when_idle = when_idle or aio.call_when_idle
        self._releasing = False
        self.max_message_size = max_message_size
        self.max_binary_frame = max_binary_frame
        self.large_messages = large_messages
        self._emptied = []

    def join(self, client):
        self.clients.add(client)

    def leave(self, client):
        self.clients.discard(client)
        if not self.clients:
            emptied, self._emptied = self._emptied, []
            for d in emptied:
                d.callback(None)

    def _listeners(self):
        return [client for client in self.clients if client.listening]

    def _fit(self, payload):
        """
        Replace a text message that is too big for a frame by a pointer to
        C{GET /message/<id>}, where the client fetches the full text.
        """
        if self.large_messages is None or len(payload) * SIZE_MARGIN <= self.max_message_size:
            return bytes(payload)  # a L{wire.Encoded} small enough is joined
        msgid = self.large_messages.put(payload)
        if self.metrics is not None:
            self.metrics.parked(len(payload))
        return wire.dumps(wire.large_message(self.large_messages.url(msgid), msgid))

    def send(self, client, message, hold=False):
        """
        Send to one client, or to all when C{client} is None (HTTP commands);
        a C{hold}ing message waits for the end of the burst.
        """
        targets = self._listeners() if client is None else [client]
        if not targets:
            return  # nobody to tell: do not encode it, nor park it as a large message
        _fan_out(targets, self._fit(wire.dumps_lazy(message)), False, None, hold)
        if hold:
            self._release_later()

    def broadcast(self, message, hold=False):
        self.send(None, message, hold)

    def send_binary(self, client, payload, header, hold=False):
        """
        Send bytes with the reference's header, chunked only when a frame
        limit is configured (the real UI cannot reassemble chunks).
        """
        targets = self._listeners() if client is None else [client]
        if not targets:
            return
        frames = wire.binary_frames(payload, header, self.max_binary_frame)
        key = None
        if header.get("type") == "io_value" and len(frames) == 1:
            key = (header.get("node"), header.get("io"))
        for frame in frames:
            _fan_out(targets, frame, True, key, hold)
        if hold:
            self._release_later()

    def broadcast_binary(self, payload, header, hold=False):
        self.send_binary(None, payload, header, hold)

    def _release_later(self):
        """
        Send the held events once the loop has no more work ready.
        """
        if not self._releasing:
            self._releasing = True
            self._when_idle(self._release, HOLD_MAX)

    def _release(self):
        self._releasing = False
        for client in list(self.clients):
            client.outbox.release()

    def close_all(self, reason, clock, timeout):
        """
        Close every connection; fires when all are gone, or after C{timeout}.
        """
        if not self.clients:
            return succeed(None)
        d = Deferred()
        self._emptied.append(d)
        self._release()  # the last events before the close frame
        for client in list(self.clients):
            client.going_away(reason)
        return d.addTimeout(timeout, clock, onTimeoutCancel=lambda result, timeout: None)


def _fan_out(targets, payload, is_binary, key=None, hold=False):
    """
    Hand one message (bytes, or a L{wire.BinaryFrame}) to its clients; for
    several, frame it only once, unless it is a big binary one.
    """
    if len(targets) == 1 or (is_binary and len(payload) >= SHARED_FRAME_MAX):
        for target in targets:
            if is_binary:
                target.send_binary(payload, key, hold)
            else:
                target.send_text(payload, hold)
        return
    if is_binary:
        payload = bytes(payload)
    prepared = targets[0].factory.prepareMessage(payload, isBinary=is_binary)
    for target in targets:
        target.send_prepared(prepared, len(payload), key, hold)
