"""
Large text messages parked for C{GET /message/<id>}.

Bounded in bytes (oldest entries go first when full), expired after a
time-to-live, and freed shortly after the first fetch: the reference keeps
every entry in memory for 60 s, whatever its size. An entry holds its raw
bytes and is base64'd while it is sent, so parking a 20 MB value costs no
encoding; the same value parked again is held once, and entries that do not
fit the RAM budget wait in a temporary file.
"""

import ctypes
import os
import tempfile
import uuid
from collections import OrderedDict

from twisted.logger import Logger

from funcnodes_tw import wire

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


class _Spilled:
    """
    An open spilled entry: its file, read in L{wire.CHUNK} pieces.
    """

    def __init__(self, path):
        self.file = open(path, "rb")
        self.size = os.fstat(self.file.fileno()).st_size

    def chunks(self):
        with self.file:
            yield from iter(lambda: self.file.read(wire.CHUNK), b"")


class _Entry:
    __slots__ = ("message", "path", "size", "expires")

    def __init__(self, message, path, size, expires):
        self.message = message
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
    """
    Entries wait in RAM as L{wire.Encoded} (raw bytes, base64'd only while
    they are sent); raw data equal to what another entry holds (the same
    value fetched again) is held once. When they hold more than
    C{resident_bytes}, the oldest entries above C{spill_size} move to a
    temporary file.
    """

    def __init__(
        self,
        clock,
        base_url,
        ttl=60.0,
        grace=5.0,
        max_bytes=512 * 1024 * 1024,
        spill_size=4 * 1024 * 1024,
        folder=None,
        resident_bytes=64 * 1024 * 1024,
    ):
        self.clock = clock
        self.base_url = base_url
        self.ttl = ttl
        self.grace = grace
        self.max_bytes = max_bytes
        self.spill_size = spill_size
        self.folder = folder
        self.resident_bytes = resident_bytes
        self.size = 0
        self.resident = 0
        self._entries = OrderedDict()
        #: The pieces entries in RAM hold: id -> [piece, number of holders].
        self._held = {}
        #: Called when a message is parked (the expiry timer starts).
        self.on_put = lambda: None

    def put(self, message):
        """
        Park C{message}, bytes or L{wire.Encoded}; a single message above
        C{max_bytes} is still kept, alone, since it is the only way to
        deliver it.
        """
        if isinstance(message, bytes):
            message = wire.Encoded([message])
        msgid = str(uuid.uuid4())
        while self._entries and self.size + message.size > self.max_bytes:
            old, entry = self._entries.popitem(last=False)
            self._forget(entry)
            _log.warn("Large-message store full: dropped {msgid}", msgid=old)
        self._share(message)
        self._hold(message)
        entry = _Entry(message, None, message.size, self.clock.seconds() + self.ttl)
        self._entries[msgid] = entry
        self.size += entry.size
        self._make_room()
        self.on_put()
        return msgid

    def _share(self, message):
        """
        Point C{message}'s raw pieces at equal ones already held.
        """
        parts = message.parts
        for i in range(1, len(parts), 2):
            for piece, _ in self._held.values():
                if len(piece) == len(parts[i]) and piece == parts[i]:
                    parts[i] = piece
                    break

    def _hold(self, message):
        for piece in message.parts:
            held = self._held.setdefault(id(piece), [piece, 0])
            held[1] += 1
            if held[1] == 1:
                self.resident += len(piece)

    def _release(self, message):
        for piece in message.parts:
            held = self._held[id(piece)]
            held[1] -= 1
            if held[1] == 0:
                del self._held[id(piece)]
                self.resident -= len(piece)

    def _make_room(self):
        """
        Move the oldest big entries in RAM to disk until the rest fit in
        C{resident_bytes}; the newest, most likely fetched next, goes last.
        """
        for entry in self._entries.values():
            if self.resident <= self.resident_bytes:
                return
            if entry.message is not None and entry.size > self.spill_size:
                self._spill(entry)

    def _spill(self, entry):
        fd, entry.path = tempfile.mkstemp(prefix="fn-message-", dir=self.folder)
        with os.fdopen(fd, "wb") as f:
            f.writelines(entry.message.chunks())
        self._release(entry.message)
        entry.message = None
        # Once this turn's buffers are gone, hand them back.
        self.clock.callLater(0, give_back_memory)

    def url(self, msgid):
        return f"{self.base_url()}/message/{msgid}"

    def open(self, msgid):
        """
        The stored message (its C{size} and C{chunks()}), or None.

        A fetch shortens the entry's life to the grace period the UI needs for
        a retry; an open spilled entry stays readable after it is dropped.
        """
        entry = self._entries.get(msgid)
        if entry is None or entry.expires <= self.clock.seconds():
            return None
        entry.expires = min(entry.expires, self.clock.seconds() + self.grace)
        if entry.path is None:
            return entry.message
        return _Spilled(entry.path)

    def _forget(self, entry):
        self.size -= entry.size
        if entry.message is not None:
            self._release(entry.message)
        entry.drop()

    def expire(self):
        """
        Drop the messages past their time; return whether any are left.
        """
        now = self.clock.seconds()
        expired = [msgid for msgid, entry in self._entries.items() if entry.expires <= now]
        for msgid in expired:
            self._forget(self._entries.pop(msgid))
        if expired:
            give_back_memory()
        return bool(self._entries)

    def clear(self):
        for entry in self._entries.values():
            entry.drop()
        self._entries.clear()
        self._held.clear()
        self.size = self.resident = 0
