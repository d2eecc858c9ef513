"""
Telling a supervisor how the worker is doing: systemd's C{sd_notify}, and
noticing a parent that went away.
"""

import os

import sdnotify
from twisted.application.service import Service
from twisted.internet import protocol, stdio
from twisted.logger import Logger

_log = Logger()


def notify(state):
    """
    Send C{state} (C{READY=1}, C{STOPPING=1}, ...) when run by systemd.
    """
    if os.environ.get("NOTIFY_SOCKET"):
        sdnotify.SystemdNotifier().notify(state)


class _Watch(protocol.Protocol):
    def __init__(self, gone):
        self.gone = gone

    def connectionLost(self, reason):
        self.gone()


class StdinWatch(Service):
    """
    Stop the worker when standard input closes: a parent that started us
    with a pipe and died (or closed it) takes the worker down with it.
    """

    name = "stdin"

    def __init__(self, stop, reactor):
        self.stop = stop
        self.reactor = reactor
        self._stdio = None

    def startService(self):
        super().startService()
        # Only stdin is watched: stdout stays the log's, so give StandardIO a sink.
        self._sink = os.open(os.devnull, os.O_WRONLY)
        self._stdio = stdio.StandardIO(
            _Watch(self._closed), stdout=self._sink, reactor=self.reactor
        )

    def _closed(self):
        if self.running:
            _log.info("Standard input closed: stopping")
            self.stop()

    def stopService(self):
        super().stopService()
        if self._stdio is not None:
            stdio_, self._stdio = self._stdio, None
            stdio_.loseConnection()
