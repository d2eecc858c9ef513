"""
Large text messages parked for C{GET /message/<id>}.

Bounded in bytes (oldest entries go first when full), expired after a
time-to-live, and freed shortly after the first fetch: the reference keeps
every entry for 60 s, whatever its size.
"""

import uuid
from collections import OrderedDict

from twisted.logger import Logger

_log = Logger()


class LargeMessageStore:
    def __init__(self, clock, base_url, ttl=60.0, grace=5.0, max_bytes=512 * 1024 * 1024):
        self.clock = clock
        self.base_url = base_url
        self.ttl = ttl
        self.grace = grace
        self.max_bytes = max_bytes
        self.size = 0
        self._entries = OrderedDict()  # msgid -> [payload, expires_at]

    def put(self, payload):
        msgid = str(uuid.uuid4())
        while self._entries and self.size + len(payload) > self.max_bytes:
            old, (data, _) = self._entries.popitem(last=False)
            self.size -= len(data)
            _log.warn("Large-message store full: dropped {msgid}", msgid=old)
        self._entries[msgid] = [payload, self.clock.seconds() + self.ttl]
        self.size += len(payload)
        return msgid

    def url(self, msgid):
        return f"{self.base_url()}/message/{msgid}"

    def get(self, msgid):
        """
        The stored bytes, or None; a fetch shortens the entry's life to the
        grace period the UI needs for a retry.
        """
        entry = self._entries.get(msgid)
        if entry is None or entry[1] <= self.clock.seconds():
            return None
        entry[1] = min(entry[1], self.clock.seconds() + self.grace)
        return entry[0]

    def expire(self):
        now = self.clock.seconds()
        for msgid, (data, expires) in list(self._entries.items()):
            if expires <= now:
                del self._entries[msgid]
                self.size -= len(data)

    def clear(self):
        self._entries.clear()
        self.size = 0
