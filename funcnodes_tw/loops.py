"""
The worker's periodic jobs, each a service that starts and stops with it.

Three run only on demand (L{OnDemand}), so that an idle worker is not
woken: the saver, a second after a change; the large-message expiry, while
messages are parked; and the trigger drain: funcnodes-core
runs a trigger request at once unless the node is busy or misses an input;
only then does the drain tick, every 5 ms, until the request ran or waits
for an input, and stops itself. A graph at work (a chain sleeping its
pretrigger delays) therefore does not wake up 200 times a second either.
"""

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()

DRAIN_INTERVAL = 0.005
SAVE_INTERVAL = 1.0
EXPIRE_INTERVAL = 5.0


def holds_request(node):
    """
    Whether C{node} holds a trigger request it could not run at once (it
    was busy, or an input was missing); funcnodes-core keeps it private.
    """
    return node._requests_trigger


def drain(nodespace):
    """
    Trigger every node that asked for a trigger and is ready.

    @return: whether to look again: a node was triggered, or one holds a
        request until its running trigger ends.
    """
    pending = False
    for node in nodespace.nodes:
        try:
            if node.trigger_if_requested() or (holds_request(node) and node.in_trigger):
                pending = True
        except Exception:
            _log.failure("Triggering {node} failed", node=node)
    return pending


class OnDemand(Service):
    """
    A periodic C{step} that runs only while it has work: L{kick} starts it,
    and it stops itself when C{step} returns False, so that an idle worker
    is not woken at all.
    """

    def __init__(self, name, interval, step, clock):
        self.name = name
        self.interval = interval
        self.step = step
        self._call = LoopingCall(self._tick)
        self._call.clock = clock

    def kick(self):
        if self.running and not self._call.running:
            self._call.start(self.interval, now=False)

    def _tick(self):
        result = self.step()
        if result is False:
            self._call.stop()
        return result

    def startService(self):
        super().startService()
        self.kick()

    def stopService(self):
        super().stopService()
        if self._call.running:
            self._call.stop()


class TriggerDrain(OnDemand):
    def __init__(self, nodespace, clock):
        super().__init__("triggers", DRAIN_INTERVAL, lambda: drain(nodespace), clock)
        self.nodespace = nodespace

    def node_event(self, nid):
        """
        Node C{nid} did something (an event of its own or of its inputs):
        drain if it holds a request, which nothing else would run.
        """
        try:
            node = self.nodespace.get_node_by_id(nid)
        except (ValueError, TypeError):  # not a node's event, or a node gone
            return
        if holds_request(node):
            self.kick()


def saver(worker, clock):
    """
    Saves the worker a second after a change (a burst of edits is one
    write), and every second while saving fails (a full disk).
    """

    def step():
        try:
            return save_if_requested(worker) or False
        except Exception:  # the state would not even serialize
            _log.failure("Saving the worker state failed")
            return False

    return OnDemand("save", SAVE_INTERVAL, step, clock)


def expirer(store, clock):
    """
    Drops expired large messages every few seconds while any are parked.
    """
    return OnDemand("messages", EXPIRE_INTERVAL, store.expire, clock)


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
