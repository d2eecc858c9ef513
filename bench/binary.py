"""The ``as_bytes`` figure: a big value fetched as one binary frame.

Both workers get a 20 MB string on an ``input.str`` node (``POST /message/``, as in
``large``; ``--quick``: 2 MB), then answer ``get_io_full_value`` with ``as_bytes``: one
binary frame of the value's UTF-8 bytes behind the reference's header, the path image
and array previews take too. Two clients fetch it, each ten times per worker
(``--quick``: three), alternating between the workers:

* a plain WebSocket client (:class:`PlainClient`: a blocking socket that reads the
  frame into one preallocated buffer, so the client costs next to nothing): the time
  per fetch, from sending the command to the frame's last byte (median);
* the harness's aiohttp client: the value's MB per second over the same span (median).

*worker CPU per fetch* is the worker's CPU time over all fetches of both clients over
their count. The goal for funcnodes_tw: at least the reference's speed in both clients
(time <= 1.0x, MB/s >= 1.0x) and no more CPU (<= 1.0x). Each received payload's size is
checked. The JSON has every fetch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import struct
import time
from typing import Dict

from bench.figures import (
    Recorder, _set_big_value, big_string, figure, mb, per_side, median_of,
    ratio_at_least, ratio_at_most,
)
from bench.harness import MB, SIDES, Bench, Worker

SIZE_MB, QUICK_SIZE_MB = 20, 2
FETCHES, QUICK_FETCHES = 10, 3


class PlainClient:
    """The least a WebSocket client does (RFC 6455), on a blocking socket."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(4096)
        status, _, self.pending = response.partition(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n")[0]:
            raise ConnectionError(f"handshake refused: {status[:100]!r}")

    def send_text(self, text: str):
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + struct.pack("!H", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(head + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.pending) < n:
            self.pending += self.sock.recv(65536)
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    def read_frame(self) -> tuple:
        """(opcode, payload); the payload read straight into one buffer."""
        first, second = self._read(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        payload = bytearray(n)
        view = memoryview(payload)
        got = min(n, len(self.pending))
        view[:got] = self.pending[:got]
        self.pending = self.pending[got:]
        while got < n:
            got += self.sock.recv_into(view[got:])
        return first & 0x0F, payload

    def fetch(self, nid: str) -> tuple:
        """``get_io_full_value`` as bytes: (seconds, payload size)."""
        message = {"type": "cmd", "cmd": "get_io_full_value", "id": "plain", "as_bytes": True,
                   "kwargs": {"nid": nid, "ioid": "input"}}
        t0 = time.perf_counter()
        self.send_text(json.dumps(message))
        while True:
            opcode, payload = self.read_frame()
            end = payload.find(b"\r\n\r\n")
            if opcode == 2 and b"id=plain" in payload[:end]:
                seconds = time.perf_counter() - t0
                return seconds, len(payload) - end - 4

    def close(self):
        self.sock.close()


async def _aiohttp_fetch(w: Worker, nid: str) -> tuple:
    """The same command on the harness's aiohttp client: (seconds, payload size)."""
    client = w.client
    msg_id, pending, text = client._send(
        "get_io_full_value", {"nid": nid, "ioid": "input"}, as_bytes=True
    )
    arrived = asyncio.get_running_loop().create_future()

    def watch(header, payload, at):
        if header.get("id") == msg_id and not arrived.done():
            arrived.set_result((at, len(payload)))

    client.binary_watchers.append(watch)
    try:
        t0 = time.perf_counter()
        await client.ws.send_str(text)
        at, size = await asyncio.wait_for(arrived, 60)
        return at - t0, size
    finally:
        client.binary_watchers.remove(watch)
        client.pending.pop(msg_id, None)


@figure("as_bytes", "get_io_full_value as_bytes: a 20 MB value in one binary frame")
async def as_bytes(bench: Bench, cfg, out: Recorder):
    size = (QUICK_SIZE_MB if cfg.quick else SIZE_MB) * MB
    fetches = QUICK_FETCHES if cfg.quick else FETCHES
    nids = {}
    for side, w in bench.workers.items():
        nids[side] = (await w.client.call("add_node", id="input.str"))["id"]
    await _set_big_value(bench, nids, big_string(size), cfg)
    for w in bench.workers.values():
        w.client.drain_hints()
    plain = {}
    for side, w in bench.workers.items():
        plain[side] = await asyncio.to_thread(PlainClient, w.port)
    cpu = {side: 0.0 for side in SIDES}

    def checked(w: Worker, got: int):
        if got != size:
            raise RuntimeError(f"{w.title}: a {got}-byte payload instead of {size}")

    async def with_plain(w: Worker, r: int) -> Dict[str, float]:
        cpu0 = w.cpu()
        seconds, got = await asyncio.to_thread(plain[w.side].fetch, nids[w.side])
        cpu[w.side] += w.cpu() - cpu0
        checked(w, got)
        return {"seconds": seconds}

    async def with_aiohttp(w: Worker, r: int) -> Dict[str, float]:
        cpu0 = w.cpu()
        seconds, got = await _aiohttp_fetch(w, nids[w.side])
        cpu[w.side] += w.cpu() - cpu0
        checked(w, got)
        return {"seconds": seconds, "mb_per_s": mb(size) / seconds}

    try:
        for w in bench.order(0):  # warm-up, not measured: first encodings, page faults
            await asyncio.to_thread(plain[w.side].fetch, nids[w.side])
            await _aiohttp_fetch(w, nids[w.side])
        by_plain = await bench.alternate(fetches, with_plain)
        by_aiohttp = await bench.alternate(fetches, with_aiohttp)
    finally:
        for client in plain.values():
            client.close()
    label = f"as_bytes {mb(size):g} MB"
    out.add(
        f"{label}: time per fetch (plain WebSocket client)", "ms",
        {s: statistics.median(r["seconds"] for r in rs) * 1e3 for s, rs in by_plain.items()},
        "lower", target=ratio_at_most(1.0),
    )
    out.add(
        f"{label}: throughput (aiohttp client)", "MB/s",
        per_side(by_aiohttp, median_of("mb_per_s")), "higher", target=ratio_at_least(1.0),
    )
    out.add(
        f"{label}: worker CPU per fetch", "ms",
        {s: cpu[s] / (2 * fetches) * 1e3 for s in SIDES}, "lower", target=ratio_at_most(1.0),
    )
    out.raw[label] = {"value_bytes": size, "plain": by_plain, "aiohttp": by_aiohttp, "cpu": cpu}
