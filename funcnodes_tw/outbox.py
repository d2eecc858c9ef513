"""
What one client has not received yet: frames held for a batch, and frames
its connection cannot take yet.

The outbox is the push producer behind a client's TCP transport: while the
transport's buffer is full it pauses, and frames wait here instead. A newer
value preview for the same input or output replaces the waiting one (the
client only ever shows the latest), and a client that falls further behind
than C{limit} bytes is cut off rather than allowed to grow the worker's
memory; the UI reconnects and resynchronises.

Node events may also be I{held}: queued while the graph is busy and sent
together on L{release}, one socket write for many frames instead of one
per event. Anything sent without holding takes the held frames with it,
so the order is the one the frames were put in.
"""

from collections import deque
from contextlib import nullcontext

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Outbox:
    def __init__(self, write, limit, overflow, batch=nullcontext):
        """
        @param write: C{write(item, kind)} sends one message now.
        @param overflow: called once when more than C{limit} bytes wait.
        @param batch: a context manager factory: what C{write} sends inside
            one goes out in one write when it exits.
        """
        self._write = write
        self.limit = limit
        self._overflow = overflow
        self._batch = batch
        self._queue = deque()  # [item or None once sent/superseded, kind, size]
        self._latest = {}  # key -> its waiting entry
        self.size = 0
        self.paused = False
        self.overflowed = False

    def put(self, item, kind, key=None, size=None, hold=False):
        """
        Send C{item} (bytes, or what C{write} knows how to send with C{kind})
        or let it wait; C{size} defaults to C{len(item)}. A C{hold}ing item
        waits for L{release}.

        Only frames that wait for the transport supersede each other: held
        ones all go out, as they would have without the batching.
        """
        if self.overflowed:
            return
        if not (self.paused or self._queue or hold):
            self._write(item, kind)
            return
        size = len(item) if size is None else size
        if key is not None and self.paused:
            superseded = self._latest.get(key)
            if superseded is not None and superseded[0] is not None:
                self.size -= superseded[2]
                superseded[0] = None
        entry = [item, kind, size]
        self._queue.append(entry)
        self.size += size
        if key is not None and self.paused:
            self._latest[key] = entry
        if self.size > self.limit:
            self.overflowed = True
            self.stopProducing()
            self._overflow()
        elif not hold:
            self.release()

    def release(self):
        """
        Send the held frames now, in one batch, unless the transport is full.
        """
        if self.paused or not self._queue:
            return
        with self._batch():
            while self._queue and not self.paused:
                entry = self._queue.popleft()
                item, entry[0] = entry[0], None
                if item is not None:
                    self.size -= entry[2]
                    self._write(item, entry[1])
        if not self._queue:
            self._latest.clear()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self.release()

    def stopProducing(self):
        self._queue.clear()
        self._latest.clear()
        self.size = 0
