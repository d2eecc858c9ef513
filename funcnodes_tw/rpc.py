"""
From a client's text frame to the reply: parsing, dispatch, result or error.

Used by the WebSocket protocol and by C{POST /message/} (which has no
connection, so its replies are broadcast, as the reference does).
"""

from twisted.logger import Logger

from funcnodes_tw import commands, wire

_log = Logger()


class CommandTimeout(Exception):
    pass


class Dispatcher:
    def __init__(self, worker, hub, timeout=None):
        """
        @param timeout: seconds after which a command that has not finished
            gets an error reply (and is cancelled), so that one runaway
            command cannot block its connection for good.
        """
        self.worker = worker
        self.hub = hub
        self.timeout = timeout

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

    def run(self, client, message):
        """
        Run one command message; the Deferred fires once the reply is sent.
        """
        msgid = message.get("id")
        if "cmd" not in message:
            self._error(client, wire.MessageError("A command message needs 'cmd'"), msgid)
            return None
        try:
            d = commands.run(self.worker, message["cmd"], message.get("kwargs"))
        except Exception as exc:
            self._error(client, exc, msgid)
            return None
        if self.timeout and not d.called:
            d.addTimeout(self.timeout, self.worker.clock, _timed_out(message["cmd"], self.timeout))
        d.addCallback(self._reply, client, msgid, message.get("as_bytes"))
        d.addErrback(lambda failure: self._error(client, failure.value, msgid))
        return d

    def _reply(self, result, client, msgid, as_bytes):
        if as_bytes:
            mime, payload = wire.encode_value(result, preview=False)
            header = {"id": msgid, "mime": mime, "type": "result"}
            self.hub.send_binary(client, payload, header)
        else:
            self.hub.send(client, wire.result(result, msgid))

    def _error(self, client, exc, msgid):
        _log.info("Command {id!r} failed: {error!r}", id=msgid, error=exc)
        self.hub.send(client, wire.error(exc, msgid, self.worker.debug))


def _timed_out(name, timeout):
    def raise_timeout(result, timeout_):
        raise CommandTimeout(f"Command {name!r} did not finish within {timeout} s")

    return raise_timeout
