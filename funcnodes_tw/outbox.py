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
        @param write: C{write(item, kind)} sends one message now.
        @param overflow: called once when more than C{limit} bytes wait.
        """
        self._write = write
        self.limit = limit
        self._overflow = overflow
        self._queue = deque()  # [item or None once sent/superseded, kind, size]
        self._latest = {}  # key -> its waiting entry
        self.size = 0
        self.paused = False
        self.overflowed = False

    def put(self, item, kind, key=None, size=None):
        """
        Send C{item} (bytes, or what C{write} knows how to send with C{kind})
        or let it wait; C{size} defaults to C{len(item)}.
        """
        if self.overflowed:
            return
        if not self.paused and not self._queue:
            self._write(item, kind)
            return
        size = len(item) if size is None else size
        if key is not None:
            superseded = self._latest.get(key)
            if superseded is not None and superseded[0] is not None:
                self.size -= superseded[2]
                superseded[0] = None
        entry = [item, kind, size]
        self._queue.append(entry)
        self.size += size
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
            item, entry[0] = entry[0], None
            if item is not None:
                self.size -= entry[2]
                self._write(item, entry[1])
        if not self._queue:
            self._latest.clear()

    def stopProducing(self):
        self._queue.clear()
        self._latest.clear()
        self.size = 0
