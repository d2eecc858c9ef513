"""
What one client has not received yet, when its connection cannot keep up.

The outbox is the push producer behind a client's TCP transport: while the
transport's buffer is full it pauses, and frames wait here instead. A newer
value preview for the same input or output replaces the waiting one (the
client only ever shows the latest), and a client that falls further behind
than C{limit} bytes is cut off rather than allowed to grow the worker's
memory; the UI reconnects and resynchronises.
"""

from collections import deque

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Outbox:
    def __init__(self, write, limit, overflow):
        """
        @param write: C{write(payload, is_binary)} sends one message now.
        @param overflow: called once when more than C{limit} bytes wait.
        """
        self._write = write
        self.limit = limit
        self._overflow = overflow
        self._queue = deque()  # [payload or None once sent/superseded, is_binary]
        self._latest = {}  # key -> its waiting entry
        self.size = 0
        self.paused = False
        self.overflowed = False

    def put(self, payload, is_binary, key=None):
        if self.overflowed:
            return
        if not self.paused and not self._queue:
            self._write(payload, is_binary)
            return
        if key is not None:
            superseded = self._latest.get(key)
            if superseded is not None and superseded[0] is not None:
                self.size -= len(superseded[0])
                superseded[0] = None
        entry = [payload, is_binary]
        self._queue.append(entry)
        self.size += len(payload)
        if key is not None:
            self._latest[key] = entry
        if self.size > self.limit:
            self.overflowed = True
            self.stopProducing()
            self._overflow()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        while self._queue and not self.paused:
            entry = self._queue.popleft()
            payload, entry[0] = entry[0], None
            if payload is not None:
                self.size -= len(payload)
                self._write(payload, entry[1])
        if not self._queue:
            self._latest.clear()

    def stopProducing(self):
        self._queue.clear()
        self._latest.clear()
        self.size = 0
