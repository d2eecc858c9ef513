"""
Reactor lag, and who stalled the reactor.

A node that computes for seconds in the reactor's thread freezes every
client. A daemon thread posts a probe to the reactor once a L{INTERVAL} and
waits for it: the probe's delay is the reactor's lag. When the probe has not
run after C{threshold} seconds the thread, which still runs while the
reactor does not, logs one warning for that stall with the node whose
trigger is on the reactor thread's stack and that stack itself.

Idle cost: one reactor wakeup and one thread wakeup per L{INTERVAL} (1 s).
"""

import sys
import threading
import traceback
from time import monotonic

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()

#: Seconds between probes.
INTERVAL = 1.0


def running_node(frame):
    """
    The funcnodes-core node whose trigger is on the stack ending in C{frame}
    (the innermost one), or None.
    """
    from funcnodes_core import Node

    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Node):
            return candidate
        frame = frame.f_back
    return None


def describe(node):
    if node is None:
        return "no node is running"
    return f"node {node.uuid} ({node.node_id}, {node.node_name!r})"


class ReactorWatch(Service):
    """
    Measures the reactor's lag (L{lag}, seconds) and counts its stalls.
    """

    name = "reactor-watch"

    def __init__(self, reactor, threshold=1.0, interval=INTERVAL):
        self.reactor = reactor
        self.threshold = threshold
        self.interval = interval
        self.lag = 0.0
        self.stalls = 0
        self._stop = None
        self._ran = threading.Event()

    def startService(self):
        super().startService()
        # Not before the reactor runs: loading a graph is no stall.
        self.reactor.callWhenRunning(self._start)

    def _start(self):
        if self.running and self._stop is None:
            self._reactor_thread = threading.get_ident()
            self._stop = threading.Event()
            threading.Thread(
                target=self._watch, args=(self._stop,), name="reactor-watch", daemon=True
            ).start()

    def stopService(self):
        super().stopService()
        if self._stop is not None:
            self._stop.set()
            self._ran.set()
            self._stop = None

    def stalled(self):
        """
        Whether the last probe ran later than the threshold.
        """
        return self.lag > self.threshold

    def _probe(self, posted):
        self.lag = monotonic() - posted
        self._ran.set()

    def _watch(self, stop):
        while not stop.is_set():
            self._ran.clear()
            posted = monotonic()
            try:
                self.reactor.callFromThread(self._probe, posted)
            except RuntimeError:  # the reactor's loop is closed
                return
            if not self._ran.wait(self.threshold) and not stop.is_set():
                self._report()
                self._ran.wait()
            stop.wait(self.interval)

    def _report(self):
        """
        Log the stall from this thread, while it lasts: the reactor is stuck.
        """
        self.stalls += 1
        frame = sys._current_frames().get(self._reactor_thread)
        node = running_node(frame)
        _log.warn(
            "The reactor has not turned for {threshold} s; {running}. "
            "Its thread is at:\n{stack}",
            threshold=self.threshold,
            running=describe(node),
            node=None if node is None else node.uuid,
            node_id=None if node is None else node.node_id,
            node_name=None if node is None else node.node_name,
            stack="".join(traceback.format_stack(frame)) if frame is not None else "(unknown)",
        )
