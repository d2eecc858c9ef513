"""
Telling a supervisor how the worker is doing: systemd's C{sd_notify}, and
noticing a parent that went away.
"""

import os

import sdnotify
from twisted.application.internet import TimerService
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


def watchdog_interval(environ=os.environ):
    """
    Seconds between C{WATCHDOG=1} pings systemd asks for (half its
    C{WatchdogSec=}), or None when it asks none of this process.
    """
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        usec = int(usec)
    except ValueError:
        _log.warn("Ignoring WATCHDOG_USEC={usec!r}: not a number", usec=usec)
        return None
    return usec / 2e6 if usec > 0 else None


def watchdog(interval, clock):
    """
    Ping systemd's watchdog from the reactor: a reactor that stops turning
    stops the pings, and systemd restarts the worker.
    """
    service = TimerService(interval, notify, "WATCHDOG=1")
    service.clock = clock
    service.setName("watchdog")
    return service


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
