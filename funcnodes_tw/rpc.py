"""
From a client's text frame to the reply: parsing, dispatch, result or error.

Used by the WebSocket protocol and by C{POST /message/} (which has no
connection, so its replies are broadcast, as the reference does).
"""

from time import perf_counter

from twisted.logger import Logger

from funcnodes_tw import commands, wire
from funcnodes_tw.metrics import Read

_log = Logger()


class CommandTimeout(Exception):
    pass


class Dispatcher:
    def __init__(self, worker, hub, timeout=None, metrics=None):
        """
        @param timeout: seconds after which a command that has not finished
            gets an error reply (and is cancelled), so that one runaway
            command cannot block its connection for good.
        @param metrics: a L{funcnodes_tw.metrics.Metrics} that counts and
            times the commands, or None.
        """
        self.worker = worker
        self.hub = hub
        self.timeout = timeout
        self.metrics = metrics

    def parse(self, client, payload):
        """
        Decode a frame; answer pings and refuse garbage right away.

        @return: the command message to run, or None when nothing is left to do.
        """
        try:
            message = wire.loads(payload)
        except wire.MessageError as exc:
            if client is not None:  # POST /message/ answers 400 instead of broadcasting
                self.hub.send(client, wire.error(exc, None))
            return None
        kind = message.get("type")
        if kind == "ping":
            if client is not None:
                client.send_pong()
            return None
        if kind != "cmd":
            return None
        return message

    def run(self, client, message, read=None):
        """
        Run one command message; the Deferred fires once the reply is sent.

        @param read: the L{Read} that brought the message, when metrics are
            on; None: it came just now.
        """
        msgid = message.get("id")
        name = message.get("cmd")
        if read is None and self.metrics is not None:
            read = Read(perf_counter(), open=False)
        if "cmd" not in message:
            error = wire.MessageError("A command message needs 'cmd'")
            self._error(client, error, msgid, name, read)
            return None
        try:
            d = commands.run(self.worker, name, message.get("kwargs"))
        except Exception as exc:
            self._error(client, exc, msgid, name, read)
            return None
        if self.timeout and not d.called:
            d.addTimeout(self.timeout, self.worker.clock, _timed_out(name, self.timeout))
        d.addCallback(self._reply, client, msgid, message.get("as_bytes"), name, read)
        d.addErrback(lambda failure: self._error(client, failure.value, msgid, name, read))
        return d

    def _reply(self, result, client, msgid, as_bytes, name=None, read=None):
        if as_bytes:
            mime, payload = wire.encode_value(result, preview=False)
            header = {"id": msgid, "mime": mime, "type": "result"}
            self.hub.send_binary(client, payload, header)
        else:
            self.hub.send(client, wire.result(result, msgid))
        if read is not None:
            if read.open:  # timed with the read's other replies (Metrics.read_done)
                read.replied.append(name)
            else:
                self.metrics.command(name, "ok", read.at)

    def _error(self, client, exc, msgid, name=None, read=None):
        _log.info("Command {id!r} failed: {error!r}", id=msgid, error=exc)
        self.hub.send(client, wire.error(exc, msgid, self.worker.debug))
        if read is not None:
            outcome = "timeout" if isinstance(exc, CommandTimeout) else "error"
            self.metrics.command(name, outcome, read.at)


def _timed_out(name, timeout):
    def raise_timeout(result, timeout_):
        raise CommandTimeout(f"Command {name!r} did not finish within {timeout} s")

    return raise_timeout
