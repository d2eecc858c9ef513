"""
Large text messages parked for C{GET /message/<id>}.

Bounded in bytes (oldest entries go first when full), expired after a
time-to-live, and freed shortly after the first fetch: the reference keeps
every entry in memory for 60 s, whatever its size. Entries above
C{spill_size} wait in a temporary file instead of RAM, so a 50 MB value
costs the worker 50 MB only while it is being encoded.
"""

import ctypes
import io
import os
import tempfile
import uuid
from collections import OrderedDict

from twisted.logger import Logger

_log = Logger()

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def give_back_memory():
    """
    Return freed heap memory to the operating system.

    glibc keeps freed buffers below 32 MiB in the heap, so after encoding a
    20 MB message the worker's RSS would stay ~50 MB higher for good.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


class _Entry:
    __slots__ = ("data", "path", "size", "expires")

    def __init__(self, data, path, size, expires):
        self.data = data
        self.path = path
        self.size = size
        self.expires = expires

    def drop(self):
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class LargeMessageStore:
    def __init__(
        self,
        clock,
        base_url,
        ttl=60.0,
        grace=5.0,
        max_bytes=512 * 1024 * 1024,
        spill_size=4 * 1024 * 1024,
        folder=None,
    ):
        self.clock = clock
        self.base_url = base_url
        self.ttl = ttl
        self.grace = grace
        self.max_bytes = max_bytes
        self.spill_size = spill_size
        self.folder = folder
        self.size = 0
        self._entries = OrderedDict()

    def put(self, payload):
        """
        Park C{payload}; a single payload above C{max_bytes} is still kept,
        alone, since it is the only way to deliver that message.
        """
        msgid = str(uuid.uuid4())
        while self._entries and self.size + len(payload) > self.max_bytes:
            old, entry = self._entries.popitem(last=False)
            self._forget(entry)
            _log.warn("Large-message store full: dropped {msgid}", msgid=old)
        data, path = payload, None
        if len(payload) > self.spill_size:
            data, path = None, self._spill(payload)
            # Once this turn's encoding buffers are gone, hand them back.
            self.clock.callLater(0, give_back_memory)
        self._entries[msgid] = _Entry(data, path, len(payload), self.clock.seconds() + self.ttl)
        self.size += len(payload)
        return msgid

    def _spill(self, payload):
        fd, path = tempfile.mkstemp(prefix="fn-message-", dir=self.folder)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        return path

    def url(self, msgid):
        return f"{self.base_url()}/message/{msgid}"

    def open(self, msgid):
        """
        A binary file object with the stored message, or None.

        A fetch shortens the entry's life to the grace period the UI needs for
        a retry; an open handle on a spilled entry stays readable after the
        entry is dropped.
        """
        entry = self._entries.get(msgid)
        if entry is None or entry.expires <= self.clock.seconds():
            return None
        entry.expires = min(entry.expires, self.clock.seconds() + self.grace)
        if entry.path is None:
            return io.BytesIO(entry.data)
        return open(entry.path, "rb")

    def _forget(self, entry):
        self.size -= entry.size
        entry.drop()

    def expire(self):
        now = self.clock.seconds()
        expired = [msgid for msgid, entry in self._entries.items() if entry.expires <= now]
        for msgid in expired:
            self._forget(self._entries.pop(msgid))
        if expired:
            give_back_memory()

    def clear(self):
        for entry in self._entries.values():
            entry.drop()
        self._entries.clear()
        self.size = 0
