"""
The WebSocket side: one protocol instance per client, and its factory.

Commands from one client run one after another (the UI relies on that
order), but pings are answered at once, even while a slow command runs, so
the UI never marks a busy worker as unresponsive.
"""

import socket
from collections import deque
from contextlib import contextmanager
from time import perf_counter

import txaio
from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import tcp
from twisted.logger import Logger

from funcnodes_tw import __version__, wire
from funcnodes_tw.internals import Internals
from funcnodes_tw.metrics import Read
from funcnodes_tw.outbox import Outbox

#: The outbox kind of a message framed once for several clients.
PREPARED = "prepared"
#: Commands a client may queue behind a slow one before it gets errors.
MAX_WAITING_COMMANDS = 1000
#: Bytes of frames held back during one read before they are sent anyway.
CORK_LIMIT = 64 * 1024
#: The first byte of a final binary frame.
BINARY_FIN = 0x82
#: Close code for a client that fell too far behind (application range).
CLOSE_TOO_SLOW = 4008
#: Client frames shorter than this are unmasked in Python (L{unmask}).
SMALL_FRAME = 256
#: The pong, framed once: every open UI tab pings every 2 s.
PONG = PreparedMessage(wire.PONG, False, applyMask=False, doNotCompress=True)
#: Pings answered without parsing JSON: the UI's spelling and Python's
#: C{json.dumps}'. Any other spelling of a ping takes the parser. A tuple,
#: not a set: C{==} on bytes of another length returns at once, where a
#: hash would read a whole (perhaps megabyte) command.
PINGS = (b'{"type":"ping"}', b'{"type": "ping"}')
#: How early Autobahn's auto-ping timers may fire: txaio's batched timers
#: round the due time down to a whole second.
TIMER_SLACK = 1.0
#: What a TCP transport hands one C{send} when its socket turns writable:
#: Twisted's 128 KiB took a 20 MB frame ~150 reactor turns. It also bounds
#: what Twisted joins when more frames come behind a big one.
SEND_LIMIT = 1024 * 1024
#: Frames with a payload from this size on are written without joining
#: header and payload (L{send_now}); smaller ones are joined and corked.
SCATTER_MIN = 64 * 1024
#: What the fast paths read of Autobahn's protocol: the frame parser's state
#: (L{WorkerProtocol._read_text_frames}) and its send queue.
_PARSER = Internals(
    "Autobahn's WebSocket protocol",
    [
        "current_frame",
        "data",
        "inside_message",
        "failedByMe",
        "autoPingTimeoutCall",
        "autoPingRestartOnAnyTraffic",
        "_cancelAutoPingTimeoutCall",
        "_dataReceived",
        "send_queue",
    ],
    "every frame goes through Autobahn's own parser and sendData",
)
#: What L{WorkerProtocol.onMessageEnd} reads of a message Autobahn parsed.
_MESSAGE = Internals(
    "Autobahn's WebSocket protocol",
    ["message_data", "message_is_binary", "_onMessage"],
    "every parsed message also goes through Autobahn's onMessageEnd",
)
#: What L{send_now} reads of Twisted's TCP transport to see it is idle.
_TCP = Internals(
    "Twisted's TCP transport",
    ["socket", "TLS", "dataBuffer", "offset", "_tempDataLen", "_writeDisconnected", "producerPaused"],
    "frames wait a reactor turn in its write",
)


def unmask(mask, payload):
    """
    A client frame's C{payload} unmasked with its 4-byte C{mask}.

    Short frames (a client's commands) take one big-integer XOR: creating
    Autobahn's native masker costs ~4 us, several times that; from a few
    hundred bytes on the native one is faster.
    """
    n = len(payload)
    if n >= SMALL_FRAME:
        return create_xor_masker(mask, n).process(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little"
    )


class WorkerProtocol(WebSocketServerProtocol):
    _log = Logger()

    #: Set by the client's first message; only then does it get broadcasts.
    listening = False
    #: When the client last sent anything (L{_sendAutoPing}).
    _heard_at = float("-inf")
    #: Frames held back while a read is handled (L{sendData}), else None.
    _corked = None
    #: Whether Autobahn's internals that the fast paths read are there;
    #: decided once the connection is open.
    _fast = False
    #: Whether to count what is sent and time commands (the worker has
    #: metrics on), the read being handled, and the counts: messages and
    #: their bytes (payloads, without the framing).
    _counting = False
    _read = None
    json_sent = json_bytes = binary_sent = binary_bytes = 0

    def onConnect(self, request):
        limit = self.factory.max_connections
        if limit and len(self.factory.hub.clients) >= limit:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "Too many connections")
        origin = request.headers.get("origin")
        if not self.factory.origins.allows(origin, request.headers.get("host")):
            self._log.warn("Refused a WebSocket from origin {origin}", origin=origin)
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "Origin not allowed")

    def connectionMade(self):
        super().connectionMade()
        # The clock of Autobahn's timers (auto-ping): txaio's loop, which
        # tests set to a Clock; txaio picks the reactor on first use.
        self._clock = txaio.config.loop or self.factory.reactor

    def onOpen(self):
        self._fast = _PARSER.usable(self)
        self._counting = self.factory.metrics is not None
        self._commands = deque()
        self._busy = False
        self.outbox = Outbox(
            self._write, self.factory.max_client_queue, self._too_slow, self.corked
        )
        if isinstance(self.transport, tcp.Connection):
            self.transport.SEND_LIMIT = SEND_LIMIT
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
        if payload in PINGS:
            self.send_pong()
            return
        message = self.factory.dispatcher.parse(self, payload)
        if message is None:
            return
        if not self._busy:
            self._run(message, self._read)
        elif len(self._commands) >= MAX_WAITING_COMMANDS:
            error = wire.MessageError("Too many commands waiting; wait for replies")
            self.factory.hub.send(self, wire.error(error, message.get("id")))
        else:  # behind a slow one, with the read it came in (timed from then)
            self._commands.append((message, self._read))

    def _run(self, message, read):
        """
        Run a command; until it has replied, the next ones wait.
        """
        d = self.factory.dispatcher.run(self, message, read)
        if d is None:
            return
        # Not d.called: a Deferred paused on an inner one (DeferredLock.run
        # in save, export_worker) is called before its reply is sent.
        replied = []
        d.addBoth(lambda result: replied.append(True) or result)
        if not replied:
            self._busy = True
            d.addBoth(self._run_waiting)

    def _run_waiting(self, _=None):
        """
        Run the commands that waited, in order, until one is slow again.
        """
        self._busy = False
        while self._commands and not self._busy:
            message, read = self._commands.popleft()
            self._run(message, read)

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
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.connection_closed(self)
            if self.closedByMe and self.localCloseCode:
                metrics.closed(self.localCloseCode)
            elif self.droppedByMe and not wasClean:
                ping = (self.wasNotCleanReason or "").startswith("WebSocket ping timeout")
                metrics.closed("ping_timeout" if ping else "dropped")

    @property
    def sent(self):
        """
        C{((json messages, bytes), (binary messages, bytes))} sent so far.
        """
        return (self.json_sent, self.json_bytes), (self.binary_sent, self.binary_bytes)

    def send_text(self, payload, hold=False):
        """
        Send a text frame; C{hold} lets it wait for the outbox's release.
        """
        if self.state == self.STATE_OPEN:
            self.outbox.put(payload, False, hold=hold)

    def send_pong(self):
        """
        Answer a ping, with the same bytes as C{send_text(wire.PONG)}.
        """
        self.send_prepared(PONG, len(wire.PONG))

    def send_binary(self, payload, key=None, hold=False):
        """
        Send a binary message, a L{wire.BinaryFrame}; a waiting one with the
        same C{key} (a value preview of the same IO) is superseded by it.
        """
        if self.state == self.STATE_OPEN:
            self.outbox.put(payload, True, key, hold=hold)

    def send_prepared(self, prepared, size, key=None, hold=False):
        """
        Send a message framed once for several clients (a broadcast).
        """
        if self.state == self.STATE_OPEN:
            self.outbox.put(prepared, PREPARED, key, size, hold)

    def _write(self, item, kind):
        """
        Send one message: bytes as text (C{kind} False) or binary (True), or
        a prepared message (L{PREPARED}).
        """
        if self.state != self.STATE_OPEN:
            return
        if kind is PREPARED:
            self.sendPreparedMessage(item)
            if not self._counting:
                return
            frame = item.payloadHybi
            binary, size = frame[0] == BINARY_FIN, payload_length(frame)
        else:
            # Framed here, not by sendMessage: no compression is negotiated,
            # and its checks cost more than a small reply. Nor does its cap,
            # maxMessagePayloadSize, apply: the limit is for what clients
            # send (the reference's aiohttp max_msg_size is inbound only);
            # big text is already a large_message pointer, and big binary
            # values have no fallback.
            binary, size = kind, len(item)
            if binary:
                head, payload = frame_header(size, True) + item.head, item.payload
            else:
                head, payload = frame_header(size, False), item
            if len(payload) < SCATTER_MIN or not self._fast or self.send_queue:
                self.sendData(head + payload)
            else:
                # A big payload is written as it is, after what was corked.
                self._uncork()
                send_now(self.transport, head, payload)
        # Counted here, not in a Metrics method: every reply passes by, and
        # a call would cost more than the counting (bench: metrics_cost).
        if self._counting:
            if binary:
                self.binary_sent += 1
                self.binary_bytes += size
            else:
                self.json_sent += 1
                self.json_bytes += size

    def sendData(self, data, sync=False, chopsize=None):
        """
        Put frame bytes on the socket without waiting a reactor turn
        (L{send_now}); frames made while one read is handled go out
        together when it is done, so pipelined replies share a C{send}.
        """
        if not self._fast or sync or chopsize or self.send_queue:
            self._uncork()
            super().sendData(data, sync, chopsize)
        elif self._corked is None:
            send_now(self.transport, data)
        else:
            self._corked.append(data)
            self._corked_size += len(data)
            if self._corked_size >= CORK_LIMIT:
                self._uncork()

    def dataReceived(self, data):
        # Not Autobahn's, which formats a debug line for every read even
        # with debug logging off.
        self._heard_at = self._clock.seconds()  # for _sendAutoPing
        if not self._counting:
            self._handle(data)
            return
        self._read = read = Read(perf_counter())
        try:
            self._handle(data)
        finally:
            self.factory.metrics.read_done(read)

    def _handle(self, data):
        """
        One read: its commands run as their frames are taken, and the frames
        they send leave together at the end (L{corked}).
        """
        if not self._fast:
            super().dataReceived(data)
            return
        with self.corked():
            rest = self._read_text_frames(data)
            if rest:
                self._dataReceived(rest)

    def _read_text_frames(self, data):
        """
        Take the whole, valid text frames at the start of C{data} (a
        client's commands) past Autobahn's frame parser, which costs some
        twenty calls per frame; return the rest of C{data} for that parser.

        Only a frame Autobahn would take as a whole message comes here:
        between frames, final, masked, no extension bits, within the size
        limits, valid UTF-8. Anything else, control frames included, stays
        with Autobahn and gets its handling and close codes.
        """
        pos, end = 0, len(data)
        frame_limit, message_limit = self.maxFramePayloadSize, self.maxMessagePayloadSize
        while (
            end - pos >= 6
            and data[pos] == 0x81  # FIN, no RSV bits, text
            and data[pos + 1] & 0x80  # masked
            and self.state == self.STATE_OPEN
            and self.current_frame is None
            and not (self.data or self.inside_message or self.failedByMe)
        ):
            length, head = data[pos + 1] & 0x7F, pos + 2
            if length == 126:
                length, head = int.from_bytes(data[head : head + 2], "big"), head + 2
                if length < 126:
                    break
            elif length == 127:
                break
            start = head + 4
            stop = start + length
            if stop > end or 0 < frame_limit < length or 0 < message_limit < length:
                break
            payload = unmask(data[head:start], data[start:stop])
            if not payload.isascii():
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    break
            pos = stop
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()  # as Autobahn does for any data frame
            self.onMessage(payload, False)
        return data[pos:] if pos else data

    @contextmanager
    def corked(self):
        """
        Frames sent inside go out together at the end (inside another
        C{corked}, with that one's).
        """
        if self._corked is not None:
            yield
            return
        self._corked, self._corked_size = [], 0
        try:
            yield
        finally:
            self._uncork()
            self._corked = None

    def _uncork(self):
        if self._corked:
            frames = self._corked
            self._corked, self._corked_size = [], 0
            send_now(self.transport, frames[0] if len(frames) == 1 else b"".join(frames))

    def _closeConnection(self, abort=False):
        self._uncork()
        super()._closeConnection(abort)

    def onMessageEnd(self):
        # Autobahn's also fires a "message" event with a new Deferred per
        # message, for observers this protocol never has.
        if not (_MESSAGE.usable(self) and self._fast):
            super().onMessageEnd()
            return
        if not self.failedByMe:
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def _sendAutoPing(self):
        """
        Ping only a client that has been silent for C{autoPingInterval}.

        Autobahn pings on a fixed schedule; but a client's own frames (the
        UI pings every 2 s) already show the connection is alive, and each
        ping costs the worker a send and a wakeup for the pong. A half-open
        client is still pinged an interval after its last frame and
        dropped C{autoPingTimeout} later.
        """
        silent = self._clock.seconds() - self._heard_at
        if silent < self.autoPingInterval - TIMER_SLACK:
            self.autoPingPendingCall = self.factory._batched_timer.call_later(
                self.autoPingInterval - silent, self._sendAutoPing
            )
            return
        super()._sendAutoPing()

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


def frame_header(length, binary):
    """
    The header of a final, unmasked server frame of C{length} bytes
    (RFC 6455, 5.2).
    """
    first = 0x82 if binary else 0x81
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def payload_length(frame):
    """
    The payload length in the header of an unmasked frame (L{frame_header}).
    """
    length = frame[1]
    if length == 126:
        return int.from_bytes(frame[2:4], "big")
    if length == 127:
        return int.from_bytes(frame[2:10], "big")
    return length


def send_now(transport, data, payload=b""):
    """
    Write C{data}, then C{payload}, sending them in place when a plain TCP
    socket has nothing waiting.

    Twisted's C{write} only queues: the reactor then registers the socket
    for writing, polls, sends and unregisters it, two C{epoll_ctl} calls and
    a loop turn per reply, and a big message goes out 128 KiB a turn. With
    an empty buffer the bytes go out now in one C{sendmsg}, as asyncio's
    transports send them, header and payload side by side without joining
    them; what the socket does not take is queued once by the ordinary
    C{write} (the payload's rest is the one copy made of it), which also
    pauses the producer (the outbox) when the buffer fills. TLS and other
    transports always take the ordinary path.
    """
    if (
        type(transport) is tcp.Server
        and _TCP.usable(transport)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.producerPaused
        and not transport._tempDataLen
        and len(transport.dataBuffer) == transport.offset
    ):
        sent = _send(transport.socket, data, payload)
        if sent is not None:
            if sent == len(data) + len(payload):
                return
            if sent >= len(data):
                data, payload = payload[sent - len(data) :], b""
            else:
                data = data[sent:]
        # else the connection is lost: the ordinary write finds that out.
    transport.write(bytes(data) if type(data) is not bytes else data)
    if payload:
        transport.write(bytes(payload) if type(payload) is not bytes else payload)


def _send(sock, data, payload):
    """
    How much of C{data} + C{payload} the socket took at once, or None when
    the connection is lost.
    """
    try:
        if payload:
            return sock.sendmsg([data, payload]) if _SENDMSG else sock.send(data)
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return None


#: Whether sockets can send several buffers in one call (not on Windows).
_SENDMSG = hasattr(socket.socket, "sendmsg")


def protocol_options(max_incoming, ping_interval=10, ping_timeout=20):
    """
    The one place where worker settings become Autobahn's protocol options.

    Autobahn's defaults suit a client, not a server: no payload cap, no
    auto-ping. A client's message or frame above C{max_incoming} closes the
    connection with 1009; auto-ping finds half-open connections. A protocol error
    (1002), invalid UTF-8 (1007) or an oversized message (1009) closes with
    that code: Autobahn's default C{failByDrop} would drop the TCP
    connection without a close frame, so clients would see only 1006.
    """
    return {
        "maxFramePayloadSize": max_incoming,
        "maxMessagePayloadSize": max_incoming,
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
    metrics=None,
):
    factory = WebSocketServerFactory(server=f"funcnodes_tw/{__version__}")
    factory.protocol = WorkerProtocol
    factory.setProtocolOptions(**options)
    factory.hub = hub
    factory.dispatcher = dispatcher
    factory.origins = origins
    factory.max_client_queue = max_client_queue
    factory.max_connections = max_connections
    factory.metrics = metrics
    return factory
