"""
The WebSocket side: one protocol instance per client, and its factory.

Commands from one client run one after another (the UI relies on that
order), but pings are answered at once, even while a slow command runs, so
the UI never marks a busy worker as unresponsive.
"""

from collections import deque

from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.logger import Logger

from funcnodes_tw import __version__, wire
from funcnodes_tw.outbox import Outbox

#: The outbox kind of a message framed once for several clients.
PREPARED = "prepared"
#: Commands a client may queue behind a slow one before it gets errors.
MAX_WAITING_COMMANDS = 1000
#: Close code for a client that fell too far behind (application range).
CLOSE_TOO_SLOW = 4008


class WorkerProtocol(WebSocketServerProtocol):
    _log = Logger()

    #: Set by the client's first message; only then does it get broadcasts.
    listening = False

    def onConnect(self, request):
        limit = self.factory.max_connections
        if limit and len(self.factory.hub.clients) >= limit:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "Too many connections")
        origin = request.headers.get("origin")
        if not self.factory.origins.allows(origin, request.headers.get("host")):
            self._log.warn("Refused a WebSocket from origin {origin}", origin=origin)
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "Origin not allowed")

    def onOpen(self):
        self._commands = deque()
        self._busy = False
        self.outbox = Outbox(self._write, self.factory.max_client_queue, self._too_slow)
        if getattr(self.transport, "producer", None) is not None:
            # Twisted Web's HTTPChannel, left behind when the WebSocket took over.
            self.transport.unregisterProducer()
        self.registerProducer(self.outbox, True)
        self.factory.hub.join(self)

    def onMessage(self, payload, isBinary):
        self.listening = True
        if isBinary:
            error = wire.MessageError("Binary frames are not accepted; send JSON text")
            self.factory.hub.send(self, wire.error(error, None))
            return
        message = self.factory.dispatcher.parse(self, payload)
        if message is None:
            return
        if len(self._commands) >= MAX_WAITING_COMMANDS:
            error = wire.MessageError("Too many commands waiting; wait for replies")
            self.factory.hub.send(self, wire.error(error, message.get("id")))
            return
        self._commands.append(message)
        if not self._busy:
            self._run_commands()

    def _run_commands(self, _=None):
        """
        Run waiting commands in order: at once while they finish at once,
        and the next one only when a slow one has replied.
        """
        self._busy = False
        while self._commands:
            d = self.factory.dispatcher.run(self, self._commands.popleft())
            if d is None:
                continue
            # Not d.called: a Deferred paused on an inner one (DeferredLock.run
            # in save, export_worker) is called before its reply is sent.
            replied = []
            d.addBoth(lambda result: replied.append(True) or result)
            if not replied:
                self._busy = True
                d.addBoth(self._run_commands)
                return

    def onClose(self, wasClean, code, reason):
        # Autobahn leaves the timer of a closing handshake we started (1002,
        # 1007, 1009, going away) running after the connection is gone.
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        self.closeHandshakeTimeoutCall = None
        if call is not None:
            call.cancel()
        self.factory.hub.leave(self)
        outbox = getattr(self, "outbox", None)
        if outbox is not None:
            outbox.stopProducing()

    def send_text(self, payload):
        if self.state == self.STATE_OPEN:
            self.outbox.put(payload, False)

    def send_binary(self, payload, key=None):
        """
        Send a binary frame; a waiting frame with the same C{key} (a value
        preview of the same IO) is superseded by this one.
        """
        if self.state == self.STATE_OPEN:
            self.outbox.put(payload, True, key)

    def send_prepared(self, prepared, size, key=None):
        """
        Send a message framed once for several clients (a broadcast).
        """
        if self.state == self.STATE_OPEN:
            self.outbox.put(prepared, PREPARED, key, size)

    def _write(self, item, kind):
        """
        Send one message: bytes as text (C{kind} False) or binary (True), or
        a prepared message (L{PREPARED}).
        """
        if self.state != self.STATE_OPEN:
            return
        if kind is PREPARED:
            self.sendPreparedMessage(item)
        else:
            # Autobahn's maxMessagePayloadSize caps outgoing messages too, but the
            # limit is for what clients send (the reference's aiohttp max_msg_size
            # is inbound only): big text is already a large_message pointer, and
            # big binary values have no fallback, so lift the cap while sending.
            limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0
            try:
                self.sendMessage(item, isBinary=kind)
            finally:
                self.maxMessagePayloadSize = limit

    def _too_slow(self):
        self._log.warn(
            "Closing {peer}: more than {limit} bytes waiting for it",
            peer=self.peer,
            limit=self.factory.max_client_queue,
        )
        self.factory.hub.leave(self)
        self.sendClose(CLOSE_TOO_SLOW, "Client too slow: reconnect to resynchronise")

    def going_away(self, reason):
        """
        Close with 1001 like the reference; Autobahn's C{sendClose} only
        lets applications send 1000 or 3000-4999.
        """
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=self.CLOSE_STATUS_CODE_GOING_AWAY, reasonUtf8=reason.encode())


def protocol_options(max_message_size, ping_interval=10, ping_timeout=20):
    """
    The one place where worker settings become Autobahn's protocol options.

    Autobahn's defaults suit a client, not a server: no payload cap, no
    auto-ping. Frames above the cap close the connection with 1009, as with
    the reference; auto-ping finds half-open connections. A protocol error
    (1002), invalid UTF-8 (1007) or an oversized message (1009) closes with
    that code: Autobahn's default C{failByDrop} would drop the TCP
    connection without a close frame, so clients would see only 1006.
    """
    return {
        "maxFramePayloadSize": max_message_size,
        "maxMessagePayloadSize": max_message_size,
        "autoPingInterval": ping_interval,
        "autoPingTimeout": ping_timeout,
        "utf8validateIncoming": True,
        "failByDrop": False,
        "openHandshakeTimeout": 10,
        "closeHandshakeTimeout": 2,
    }


def make_factory(
    hub,
    dispatcher,
    options,
    origins,
    max_client_queue,
    max_connections=None,
):
    factory = WebSocketServerFactory(server=f"funcnodes_tw/{__version__}")
    factory.protocol = WorkerProtocol
    factory.setProtocolOptions(**options)
    factory.hub = hub
    factory.dispatcher = dispatcher
    factory.origins = origins
    factory.max_client_queue = max_client_queue
    factory.max_connections = max_connections
    return factory
