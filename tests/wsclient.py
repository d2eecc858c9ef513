"""A small FuncNodes worker client on Autobahn's Twisted flavour, for tests.

It speaks the wire protocol of PROTOCOL.md (§2, §3) and records every frame it receives
in ``Client.transcript`` so tests can compare whole sessions, not just results.

Usage (inside a Twisted test)::

    client = yield connect(reactor, "ws://127.0.0.1:9382")
    node = yield client.call("add_node", id="add_node")
    frame = yield client.call("get_io_full_value", as_bytes=True, nid=..., ioid="out")
    yield client.close()

Command kwargs are given as keyword arguments; ``kwargs=`` takes a dict for names that
clash with ``call``'s own parameters. The message id is ``msg_id`` (the protocol's
commands themselves use ``id``, e.g. ``add_node(id=...)``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import urlparse

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint

__all__ = ["Client", "CommandError", "connect", "parse_binary_frame"]

_HEADER_END = b"\r\n\r\n"


class CommandError(Exception):
    """The worker answered a command with an ``error`` message."""

    def __init__(self, error: str, tb: Optional[list] = None, id: Any = None):
        super().__init__(error)
        self.error = error
        self.tb = tb or []
        self.id = id


def parse_binary_frame(data: bytes) -> Dict[str, Any]:
    """Parse one binary frame (§3) into ``{"binary", "chunk", "msgid", "header", "payload"}``.

    Mirrors the UI's parser: split the header on ``;``, then each part on the first ``=``,
    and strip whitespace. ``chunk`` and ``msgid`` are reported separately from ``header``.
    """
    end = data.find(_HEADER_END)
    if end < 0:
        raise ValueError("binary frame without header terminator")
    head = data[:end].decode("utf-8")
    payload = data[end + len(_HEADER_END):]
    chunk = msgid = None
    header: Dict[str, str] = {}
    for part in head.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"malformed header part {part!r}")
        key, value = key.strip(), value.strip()
        if key == "chunk" and chunk is None:
            chunk = value
        elif key == "msgid" and msgid is None:
            msgid = value
        else:
            header[key] = value
    return {
        "binary": True,
        "chunk": chunk,
        "msgid": msgid,
        "header": header,
        "payload": payload,
    }


class _Protocol(WebSocketClientProtocol):
    """Forwards Autobahn callbacks to the owning ``Client``."""

    client: "Client"

    def onOpen(self):
        self.client = Client(self)
        opened, self.factory.opened = self.factory.opened, None
        if opened is not None:
            opened.callback(self.client)

    def onMessage(self, payload, isBinary):
        self.client._on_frame(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        opened, self.factory.opened = self.factory.opened, None
        if opened is not None:
            opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        client = getattr(self, "client", None)
        if client is not None:
            client._on_close(wasClean, code, reason)


class _Factory(WebSocketClientFactory):
    protocol = _Protocol
    opened: Optional[defer.Deferred] = None


class Client:
    """One WebSocket connection to a worker; see the module docstring."""

    def __init__(self, proto: _Protocol):
        self._proto = proto
        self._reactor = proto.factory.reactor
        self.transcript: List[Dict[str, Any]] = []
        self._pending: Dict[str, defer.Deferred] = {}
        self._waiters: List[tuple] = []
        self._quiet_waiters: List[tuple] = []
        self._close_waiters: List[defer.Deferred] = []
        self.is_closed = False
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None

    # -- sending ------------------------------------------------------------------
    def send_json(self, obj: Any) -> None:
        """Send ``obj`` as one JSON text frame."""
        self._proto.sendMessage(json.dumps(obj).encode("utf-8"), isBinary=False)

    def send_text(self, text: str) -> None:
        """Send raw text (e.g. deliberately invalid JSON)."""
        self._proto.sendMessage(text.encode("utf-8"), isBinary=False)

    def call(
        self,
        cmd: str,
        *,
        as_bytes: Optional[bool] = False,
        msg_id: Any = None,
        kwargs: Optional[dict] = None,
        timeout: float = 10,
        **kw: Any,
    ) -> defer.Deferred:
        """Send a ``cmd`` message and return a Deferred for its reply.

        Fires with the JSON ``result`` or, when ``as_bytes`` is true, with the parsed
        binary result frame; errbacks with ``CommandError`` on an ``error`` with this id,
        and with ``defer.TimeoutError`` after ``timeout`` s (the reference sends nothing
        for empty byte results). ``as_bytes=None`` omits the key, like the manager does.
        """
        if msg_id is None:
            msg_id = str(uuid.uuid4())
        msg: Dict[str, Any] = {"type": "cmd", "cmd": cmd, "kwargs": {**(kwargs or {}), **kw}}
        msg["id"] = msg_id
        if as_bytes is not None:
            msg["as_bytes"] = as_bytes
        key = self._id_key(msg_id)

        def _forget(res):
            self._pending.pop(key, None)
            return res

        d = defer.Deferred()
        self._pending[key] = d
        d.addTimeout(timeout, self._reactor)
        d.addBoth(_forget)
        self.send_json(msg)
        return d

    @staticmethod
    def _id_key(msg_id: Any) -> str:
        # Binary result frames carry str(id); JSON replies echo the id verbatim.
        return msg_id if isinstance(msg_id, str) else json.dumps(msg_id)

    # -- receiving ------------------------------------------------------------------
    def _on_frame(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            msg = parse_binary_frame(payload)
        else:
            msg = json.loads(payload.decode("utf-8"))
        self.transcript.append(msg)
        self._dispatch_reply(msg)
        index = len(self.transcript) - 1
        for waiter in list(self._waiters):
            predicate, start, d = waiter
            if index >= start and predicate(msg):
                self._waiters.remove(waiter)
                d.callback(msg)
        for period, call in self._quiet_waiters:
            if call.active():
                call.reset(period)

    def _dispatch_reply(self, msg: Dict[str, Any]) -> None:
        if msg.get("binary"):
            if msg["header"].get("type") != "result":
                return
            d = self._pending.get(msg["header"].get("id"))
            if d is not None and not d.called:
                d.callback(msg)
            return
        if not isinstance(msg, dict) or msg.get("type") not in ("result", "error"):
            return
        d = self._pending.get(self._id_key(msg.get("id")))
        if d is None or d.called:
            return
        if msg["type"] == "result":
            d.callback(msg["result"])
        else:
            d.errback(CommandError(msg.get("error"), msg.get("tb"), msg.get("id")))

    def wait_for(
        self, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 5, start: int = 0
    ) -> defer.Deferred:
        """Fire with the first message at index >= ``start`` matching ``predicate``."""
        for msg in self.transcript[start:]:
            if predicate(msg):
                return defer.succeed(msg)
        d = defer.Deferred()
        waiter = (predicate, start, d)
        self._waiters.append(waiter)

        def _drop(res):
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return res

        d.addTimeout(timeout, self._reactor)
        d.addBoth(_drop)
        return d

    def wait_quiet(self, period: float = 0.3, timeout: float = 10) -> defer.Deferred:
        """Fire once no message has arrived for ``period`` s (a settle point)."""
        d = defer.Deferred()
        call = self._reactor.callLater(period, lambda: d.called or d.callback(None))
        waiter = (period, call)
        self._quiet_waiters.append(waiter)

        def _done(res):
            self._quiet_waiters.remove(waiter)
            if call.active():
                call.cancel()
            return res

        d.addTimeout(timeout, self._reactor)
        d.addBoth(_done)
        return d

    # -- closing ------------------------------------------------------------------
    def _on_close(self, was_clean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.is_closed = True
        self.close_code, self.close_reason = code, reason
        for d in list(self._pending.values()):
            if not d.called:
                d.errback(ConnectionError(f"connection closed: {code} {reason}"))
        waiting, self._close_waiters = self._close_waiters, []
        for d in waiting:
            d.callback(None)

    def when_closed(self) -> defer.Deferred:
        """A Deferred firing when the connection is gone (for whatever reason)."""
        if self.is_closed:
            return defer.succeed(None)
        d = defer.Deferred()
        self._close_waiters.append(d)
        return d

    def close(self, code: int = 1000) -> defer.Deferred:
        """Start the closing handshake; fire once the TCP connection is gone."""
        d = self.when_closed()
        if not self.is_closed:
            self._proto.sendClose(code=code)
        return d


def connect(reactor, url: str, timeout: float = 5) -> defer.Deferred:
    """Connect to ``ws://host:port`` and fire with a ``Client`` once the handshake is done.

    Always connects to ``127.0.0.1`` (tests only run local workers); auto-ping is off so
    no timers outlive the connection.
    """
    parsed = urlparse(url)
    factory = _Factory(url)
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=timeout)
    factory.opened = defer.Deferred()
    opened = factory.opened
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", parsed.port or 80, timeout=timeout)
    connecting = endpoint.connect(factory)

    def _failed(failure):
        if not opened.called:
            factory.opened = None
            opened.errback(failure)

    connecting.addErrback(_failed)
    return opened
