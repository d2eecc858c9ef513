"""
The worker's periodic jobs, each a service that starts and stops with it.

The trigger drain is the odd one: it ticks every 5 ms only while nodes have
work and stops itself when the graph is idle, so an idle worker does not
wake up 200 times a second. Node-space events start it again.
"""

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()

DRAIN_INTERVAL = 0.005
SAVE_INTERVAL = 1.0
EXPIRE_INTERVAL = 5.0


def drain(nodespace):
    """
    Trigger every node that asked for a trigger and is ready.

    @return: whether work is still pending (a trigger running or due).
    """
    pending = False
    for node in nodespace.nodes:
        try:
            if node.trigger_if_requested() or node.in_trigger:
                pending = True
        except Exception:
            _log.failure("Triggering {node} failed", node=node)
    return pending


class TriggerDrain(Service):
    name = "triggers"

    def __init__(self, nodespace, clock):
        self.nodespace = nodespace
        self._call = LoopingCall(self._tick)
        self._call.clock = clock

    def kick(self):
        if self.running and not self._call.running:
            self._call.start(DRAIN_INTERVAL, now=False)

    def _tick(self):
        if not drain(self.nodespace):
            self._call.stop()

    def startService(self):
        super().startService()
        self.kick()

    def stopService(self):
        super().stopService()
        if self._call.running:
            self._call.stop()


def _guarded(function, what):
    def run():
        try:
            return function()
        except Exception:
            _log.failure("{what} failed", what=what)

    return run


def timer(name, interval, function, clock):
    """
    A TimerService whose failures are logged instead of stopping it.
    """
    service = TimerService(interval, _guarded(function, name))
    service.clock = clock
    service.setName(name)
    return service


def save_if_requested(worker):
    if worker.save_requested:
        d = worker.save()
        # The worker logs and reports the first failure and asks for the
        # save again: here, a retry failing once a second stays quiet.
        d.addErrback(lambda f: None)
        return d


def heartbeat_check(worker, required):
    """
    Stop the worker when no client sent C{heartbeat} for C{required} seconds.
    """
    if worker.clock.seconds() - worker.last_heartbeat > required:
        _log.warn("No heartbeat for {required} s: stopping", required=required)
        worker.stop()
