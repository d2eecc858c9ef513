"""
The WebSocket side: one protocol instance per client, and its factory.

Commands from one client run one after another (the UI relies on that
order), but pings are answered at once, even while a slow command runs, so
the UI never marks a busy worker as unresponsive.
"""

from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet.defer import succeed
from twisted.logger import Logger

from funcnodes_tw import __version__, wire

#: The reference's C{FUNCNODES_WS_WORKER_MAX_SIZE} default.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


class WorkerProtocol(WebSocketServerProtocol):
    _log = Logger()

    #: Set by the client's first message; only then does it get broadcasts.
    listening = False

    def onConnect(self, request):
        origin = request.headers.get("origin")
        if not self.factory.origins.allows(origin, request.headers.get("host")):
            self._log.warn("Refused a WebSocket from origin {origin}", origin=origin)
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "Origin not allowed")

    def onOpen(self):
        self._tail = succeed(None)
        self.factory.hub.join(self)

    def onMessage(self, payload, isBinary):
        self.listening = True
        if isBinary:
            error = wire.MessageError("Binary frames are not accepted; send JSON text")
            self.factory.hub.send(self, wire.error(error, None))
            return
        dispatcher = self.factory.dispatcher
        message = dispatcher.parse(self, payload)
        if message is not None:
            self._tail.addCallback(lambda _: dispatcher.run(self, message))
            self._tail.addErrback(lambda f: self._log.failure("Replying failed", f))

    def onClose(self, wasClean, code, reason):
        self.factory.hub.leave(self)

    def send_text(self, payload):
        if self.state == self.STATE_OPEN:
            self.sendMessage(payload, isBinary=False)

    def send_binary(self, payload):
        if self.state == self.STATE_OPEN:
            self.sendMessage(payload, isBinary=True)

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
    the reference; auto-ping finds half-open connections.
    """
    return {
        "maxFramePayloadSize": max_message_size,
        "maxMessagePayloadSize": max_message_size,
        "autoPingInterval": ping_interval,
        "autoPingTimeout": ping_timeout,
        "utf8validateIncoming": True,
        "openHandshakeTimeout": 10,
        "closeHandshakeTimeout": 2,
    }


def make_factory(hub, dispatcher, options, origins):
    factory = WebSocketServerFactory(server=f"funcnodes_tw/{__version__}")
    factory.protocol = WorkerProtocol
    factory.setProtocolOptions(**options)
    factory.hub = hub
    factory.dispatcher = dispatcher
    factory.origins = origins
    return factory
