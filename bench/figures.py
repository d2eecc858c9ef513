"""The figures: small measurement functions sharing the ``Bench`` harness.

A figure is ``async def f(bench, cfg, out)``, registered with ``@figure(name, title)``.
It gets both workers freshly started (``bench.workers["tw"]``, ``bench.workers["ref"]``),
the run's ``Config`` and a ``Recorder``; it adds table rows with
``out.add(label, unit, {side: value}, better)`` and anything worth keeping in the JSON
output to ``out.raw``. To add a figure, write one more such function below.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import string
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional

import aiohttp

from bench.harness import (
    MB, SIDES, Bench, RssSampler, Worker, hwm_bytes, reset_hwm, sched_seconds,
)


# -- results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A goal for one row: ``op`` (">=" or "<=") ``value``, checked against the ratio
    tw/ref (``on="ratio"``) or against funcnodes_tw's own value (``on="tw"``, in the
    row's unit)."""

    op: str
    value: float
    on: str = "ratio"

    def text(self, unit: str) -> str:
        if self.on == "ratio":
            digits = 1 if round(self.value, 1) == self.value else 2  # 1.5x, 0.95x
            return f"{self.op} {self.value:.{digits}f}x"
        return f"{self.op} {self.value:g} {unit}"

    def met(self, row: "Row") -> Optional[bool]:
        actual = row.ratio if self.on == "ratio" else row.values.get("tw")
        if actual is None:
            return None
        return actual >= self.value if self.op == ">=" else actual <= self.value


def ratio_at_least(value: float) -> Target:
    return Target(">=", value)


def ratio_at_most(value: float) -> Target:
    return Target("<=", value)


def tw_at_most(value: float) -> Target:
    return Target("<=", value, on="tw")


@dataclass
class Row:
    label: str
    unit: str
    values: Dict[str, Optional[float]]
    better: Optional[str] = None  # "higher", "lower" or None (informational)
    #: No ratio when the reference's value is below this (e.g. RSS growth of 0.0 MB)
    #: or when the two values have opposite signs.
    noise: float = 0.0
    target: Optional[Target] = None

    @property
    def target_text(self) -> Optional[str]:
        return None if self.target is None else self.target.text(self.unit)

    @property
    def met(self) -> Optional[bool]:
        return None if self.target is None else self.target.met(self)

    @property
    def ratio(self) -> Optional[float]:
        tw, ref = self.values.get("tw"), self.values.get("ref")
        if tw is None or ref is None or abs(ref) < max(self.noise, 1e-12):
            return None
        if tw * ref < 0:
            return None  # e.g. one RSS went up, the other down: no meaningful ratio
        return tw / ref

    def as_dict(self) -> Dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            **{side: self.values.get(side) for side in SIDES},
            "ratio": self.ratio,
            "target": self.target_text,
            "met": self.met,
        }


@dataclass
class Recorder:
    name: str
    title: str
    rows: List[Row] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    seconds: float = 0.0

    def add(self, label: str, unit: str, values: Dict[str, Optional[float]], better=None,
            target: Optional[Target] = None) -> Row:
        """One table row; ratios of MB values under 1 MB are noise and not shown."""
        row = Row(label, unit, dict(values), better, noise=1.0 if unit == "MB" else 0.0,
                  target=target)
        self.rows.append(row)
        return row

    def as_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "seconds": round(self.seconds, 2),
            "error": self.error,
            "rows": [row.as_dict() for row in self.rows],
            "raw": self.raw,
        }


@dataclass
class Figure:
    name: str
    title: str
    run: Callable[[Bench, Any, Recorder], Awaitable[None]]
    #: Environment changes for both workers of this figure (None removes a variable).
    env: Dict[str, Optional[str]] = field(default_factory=dict)


FIGURES: List[Figure] = []


def figure(name: str, title: str, env: Optional[Dict[str, Optional[str]]] = None):
    def register(function):
        FIGURES.append(Figure(name, title, function, dict(env or {})))
        return function

    return register


def per_side(results: Dict[str, List[Any]], pick: Callable[[List[Any]], Any]) -> Dict[str, Any]:
    return {side: pick(values) for side, values in results.items()}


def median_of(key: str):
    return lambda rounds: statistics.median(r[key] for r in rounds)


def max_of(key: str):
    return lambda rounds: max(r[key] for r in rounds)


def mb(n_bytes: float) -> float:
    return n_bytes / MB


def percentile(values: List[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, int(round(p / 100 * len(ordered) + 0.4999)))
    return ordered[min(rank, len(ordered)) - 1]


# -- 1. upload --------------------------------------------------------------------------
BOUNDARY = "----funcnodes-bench-" + "7c1e0f4b9a2d"


def multipart_body(folder: Path, size: int, filename: str) -> Path:
    """Write a ``multipart/form-data`` body with one ``file`` part of ``size`` bytes.

    Written once per size and streamed from disk by every upload; the content is a
    random 1 MiB block repeated (nothing in the path compresses).
    """
    path = folder / f"upload-{size}.multipart"
    if path.exists():
        return path
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    block = random.Random(size).randbytes(1024 * 1024)
    assert BOUNDARY.encode() not in block
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(head)
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            left -= len(chunk)
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())  # no writeback of this file during the measurements
    tmp.rename(path)
    return path


def _clear_files(worker: Worker):
    if worker.files_dir.is_dir():
        for entry in worker.files_dir.iterdir():
            if entry.is_file():
                entry.unlink()


@figure("upload", "POST /upload/ of one big file")
async def upload(bench: Bench, cfg, out: Recorder):
    # Warm-up (not measured): the first upload pays for imports, threads, first writes.
    warmup = multipart_body(bench.run_dir, MB, "warmup.bin")
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    for w in bench.order(0):
        with open(warmup, "rb") as f:
            status, reply = await w.post("/upload/", f, headers=headers)
        if status != 200:
            raise RuntimeError(f"{w.title}: warm-up upload -> {status} {reply[:200]!r}")
        _clear_files(w)
    sizes = [(size_mb, cfg.upload_rounds) for size_mb in cfg.upload_sizes]
    if cfg.big:
        sizes.append((cfg.big_upload_mb, 1))
    for size_mb, rounds in sizes:
        size = size_mb * MB
        name = f"bench-{size_mb}MB.bin"
        body = multipart_body(bench.run_dir, size, name)
        total = body.stat().st_size

        async def measure(w: Worker, r: int) -> Dict[str, float]:
            _clear_files(w)
            await asyncio.sleep(cfg.settle)
            base, cpu0 = w.rss(), w.cpu()
            hwm_ok = reset_hwm(w.pid)
            with RssSampler([w.pid], cfg.sample_interval) as sampler:
                t0 = time.perf_counter()
                with open(body, "rb") as f:
                    status, reply = await w.post("/upload/", f, headers=headers)
                seconds = time.perf_counter() - t0
            cpu = w.cpu() - cpu0
            right_after = w.rss()
            if status != 200:
                raise RuntimeError(f"{w.title}: upload -> {status} {reply[:200]!r}")
            stored = w.files_dir / name
            if stored.stat().st_size != size:
                raise RuntimeError(f"{w.title}: stored {stored.stat().st_size} of {size} bytes")
            await asyncio.sleep(cfg.settle)
            settled = w.rss()
            _clear_files(w)
            return {
                "mb_per_s": mb(size) / seconds,
                "seconds": seconds,
                "body_bytes": total,
                "rss_before": base,
                "peak_growth": sampler.peak[w.pid] - base,
                "hwm_growth": (hwm_bytes(w.pid) - base) if hwm_ok else None,
                "after_growth": right_after - base,
                "settled_growth": settled - base,
                "cpu_seconds": cpu,
            }

        results = await bench.alternate(rounds, measure)
        label = f"upload {size_mb} MB"
        # The goals are for the first size (100 MB; --quick: its tiny stand-in).
        goal = size_mb == cfg.upload_sizes[0]
        out.raw[label] = results
        out.add(
            f"{label}: throughput", "MB/s", per_side(results, median_of("mb_per_s")), "higher",
            target=ratio_at_least(1.0) if goal else None,
        )
        out.add(
            f"{label}: peak RSS growth", "MB",
            per_side(results, lambda rs: mb(max(r["peak_growth"] for r in rs))), "lower",
            target=tw_at_most(10) if goal else None,
        )
        out.add(
            f"{label}: RSS before", "MB", per_side(results, lambda rs: mb(rs[-1]["rss_before"]))
        )
        out.add(
            f"{label}: RSS {cfg.settle:g} s after", "MB",
            per_side(results, lambda rs: mb(rs[-1]["rss_before"] + rs[-1]["settled_growth"])),
            "lower",
        )
        out.add(f"{label}: worker CPU", "s", per_side(results, median_of("cpu_seconds")), "lower")


# -- 2. large messages ------------------------------------------------------------------
def big_string(size: int) -> str:
    """``size`` ASCII characters that JSON does not escape."""
    alphabet = (string.ascii_letters + string.digits).encode()
    block = bytes(random.Random(size).choice(alphabet) for _ in range(64 * 1024))
    return (block * (size // len(block) + 1))[:size].decode("ascii")


async def _set_big_value(bench: Bench, nids: Dict[str, str], value: str, cfg) -> Dict[str, float]:
    """``set_io_value`` through ``POST /message/``; the seconds each worker took."""
    seconds = {}
    for w in bench.order(0):
        t0 = time.perf_counter()
        await w.post_command("set_io_value", nid=nids[w.side], ioid="input", value=value)
        seconds[w.side] = time.perf_counter() - t0
    await asyncio.sleep(max(cfg.settle, 1.0))  # the node runs after the reply
    return seconds


async def _fetch_rounds(bench: Bench, nids, fetches: int, series: Dict):
    """``fetches`` alternating ``get_io_full_value`` round trips (hint + GET) per side."""

    async def measure(w: Worker, r: int) -> Dict[str, float]:
        result = await w.client.call_large("get_io_full_value", nid=nids[w.side], ioid="input")
        result["rss"] = w.rss()
        series[w.side].append(result)
        return result

    return await bench.alternate(fetches, measure)


async def _large_value_phase(bench: Bench, cfg, out: Recorder, size_mb: int, fetches: int,
                             waits=()) -> None:
    """Set a ``size_mb`` string on an ``input.str`` node of each worker, fetch it
    ``fetches`` times through the large-message path, then watch RSS for ``waits``."""
    workers = bench.workers
    nids = {}
    for side, w in workers.items():
        node = await w.client.call("add_node", id="input.str")
        nids[side] = node["id"]
    await asyncio.sleep(cfg.settle)
    before = {side: w.rss() for side, w in workers.items()}

    size = size_mb * MB
    value = big_string(size)
    set_seconds = await _set_big_value(bench, nids, value, cfg)
    del value
    for w in workers.values():
        w.client.drain_hints()  # the broadcast set_io_value result, never fetched
    start = {side: w.rss() for side, w in workers.items()}
    series: Dict[str, List] = {side: [] for side in SIDES}
    pids = [w.pid for w in workers.values()]
    with RssSampler(pids, cfg.sample_interval) as sampler:
        results = await _fetch_rounds(bench, nids, fetches, series)
    right_after = {side: w.rss() for side, w in workers.items()}
    peak = {side: sampler.peak[w.pid] for side, w in workers.items()}

    # Both workers wait at the same time; RSS every second goes to the JSON output.
    waited: Dict[str, List] = {side: [] for side in SIDES}
    after_wait: Dict[float, Dict[str, int]] = {}
    t0 = time.perf_counter()
    for wait in sorted(waits):
        while True:
            elapsed = time.perf_counter() - t0
            for side, w in workers.items():
                waited[side].append((round(elapsed, 2), w.rss()))
            if elapsed >= wait:
                break
            await asyncio.sleep(min(1.0, wait - elapsed))
        after_wait[wait] = {side: w.rss() for side, w in workers.items()}

    label = f"{size_mb} MB"
    out.add(
        f"set_io_value {label} via POST /message/", "MB/s",
        {s: mb(size) / set_seconds[s] for s in SIDES}, "higher",
    )
    out.add(
        f"large message {label}: round trip (hint + GET)", "MB/s",
        per_side(results, lambda rs: mb(size) / statistics.median(r["seconds"] for r in rs)),
        "higher", target=ratio_at_least(3.0) if waits else None,
    )
    out.add(f"RSS before the {label} value", "MB", {s: mb(v) for s, v in before.items()})
    out.add(f"RSS at start ({label} value set)", "MB", {s: mb(v) for s, v in start.items()})
    out.add(
        f"RSS peak during {fetches} x {label} fetches", "MB",
        {s: mb(v) for s, v in peak.items()}, "lower",
    )
    out.add(
        f"RSS peak minus start ({fetches} x {label})", "MB",
        {s: mb(peak[s] - start[s]) for s in SIDES}, "lower",
    )
    out.add(
        f"RSS right after {fetches} x {label} fetches", "MB",
        {s: mb(v) for s, v in right_after.items()}, "lower",
    )
    for wait, rss in after_wait.items():
        out.add(
            f"RSS {wait:g} s after {fetches} fetches", "MB",
            {s: mb(v) for s, v in rss.items()}, "lower",
        )
        out.add(
            f"RSS {wait:g} s after minus start", "MB",
            {s: mb(rss[s] - start[s]) for s in SIDES}, "lower",
            # The goal: back within 20 MB of the start a minute after (--full).
            target=tw_at_most(20) if wait == 60 else None,
        )
    out.raw[label] = {
        "value_bytes": size,
        "set_seconds": set_seconds,
        "rss_before": before,
        "rss_start": start,
        "rss_peak": peak,
        "rss_right_after": right_after,
        "rss_after_wait": {str(k): v for k, v in after_wait.items()},
        "fetches": series,
        "rss_while_waiting": waited,
    }


@figure("large", "large message: 20 MB value fetched 10 x, RSS until a minute later")
async def large_message(bench: Bench, cfg, out: Recorder):
    await _large_value_phase(
        bench, cfg, out, cfg.large_mb, cfg.large_fetches, waits=cfg.large_waits
    )


@figure("large50", "large message: 50 MB value fetched 3 x")
async def large_message_50(bench: Bench, cfg, out: Recorder):
    await _large_value_phase(bench, cfg, out, cfg.large2_mb, cfg.large2_fetches)


# -- 3. RPC round trip ------------------------------------------------------------------
@figure("rpc", "RPC round trip of `uuid` over the WebSocket")
async def rpc(bench: Bench, cfg, out: Recorder):
    for w in bench.order(0):
        for _ in range(cfg.rpc_warmup):
            await w.client.call("uuid")
    rounds = cfg.rpc_rounds
    per_round = max(1, cfg.rpc_calls // rounds)

    async def measure(w: Worker, r: int) -> Dict[str, Any]:
        latencies = []
        cpu0 = w.cpu()
        for _ in range(per_round):
            t0 = time.perf_counter()
            await w.client.call("uuid")
            latencies.append(time.perf_counter() - t0)
        return {"latencies": latencies, "cpu_seconds": w.cpu() - cpu0}

    results = await bench.alternate(rounds, measure)
    pooled = {s: [x for r in rs for x in r["latencies"]] for s, rs in results.items()}
    cpu = {s: sum(r["cpu_seconds"] for r in rs) for s, rs in results.items()}
    n = per_round * rounds
    for p, goal in ((50, 1.0), (99, 0.7)):
        out.add(
            f"uuid RPC p{p} ({n} calls)", "ms",
            {s: percentile(v, p) * 1e3 for s, v in pooled.items()}, "lower",
            target=ratio_at_most(goal),
        )
    out.add(
        "uuid RPC calls per second (sequential)", "1/s",
        {s: len(v) / sum(v) for s, v in pooled.items()}, "higher",
    )
    out.add("worker CPU per uuid call", "us", {s: cpu[s] / n * 1e6 for s in SIDES}, "lower")
    out.raw["latency_ms"] = {
        s: {
            "p50": percentile(v, 50) * 1e3,
            "p90": percentile(v, 90) * 1e3,
            "p99": percentile(v, 99) * 1e3,
            "max": max(v) * 1e3,
            "mean": statistics.fmean(v) * 1e3,
        }
        for s, v in pooled.items()
    }
    out.raw["cpu_seconds"] = cpu


# -- isolation: in a module of its own (bench/isolation.py) --------------------------------
from bench import isolation as _isolation  # noqa: E402,F401  (registers the figure)


# -- 4. pipelined RPC throughput ----------------------------------------------------------
#: A ``uuid`` command with a numbered id; the reply is counted, not parsed.
PIPE_COMMAND = '{"type": "cmd", "cmd": "uuid", "kwargs": {}, "id": "p%d", "as_bytes": false}'
RESULT_STARTS = ('{"type":"result"', '{"type": "result"')  # orjson (tw), json (reference)


async def _pipelined(ws, calls: int, depth: int) -> None:
    """Keep ``depth`` ``uuid`` commands in flight on ``ws`` until ``calls`` replies came:
    send ``depth``, then one more for each reply."""
    sent = min(depth, calls)
    for i in range(sent):
        await ws.send_str(PIPE_COMMAND % i)
    done = 0
    while done < calls:
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                raise ConnectionError(f"socket closed after {done} of {calls} replies")
            continue
        if not msg.data.startswith(RESULT_STARTS):
            if '"error"' in msg.data[:40]:
                raise RuntimeError(f"uuid failed: {msg.data[:200]}")
            continue  # a broadcast
        done += 1
        if sent < calls:
            await ws.send_str(PIPE_COMMAND % sent)
            sent += 1


async def measure_pipelined(w: Worker, socks: List, per_client: int, depth: int) -> Dict[str, float]:
    """``per_client`` pipelined ``uuid`` calls on each socket at once: rate and CPU
    (``sched_seconds``: from schedstat, in nanoseconds)."""
    cpu0, sched0, own0 = w.cpu(), sched_seconds(w.pid), time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(_pipelined(ws, per_client, depth) for ws in socks))
    seconds = time.perf_counter() - t0
    calls = per_client * len(socks)
    return {
        "calls": calls,
        "seconds": seconds,
        "calls_per_s": calls / seconds,
        "cpu_seconds": w.cpu() - cpu0,
        "sched_seconds": sched_seconds(w.pid) - sched0,
        "bench_cpu_seconds": time.process_time() - own0,
    }


@figure("pipeline", "pipelined `uuid` throughput: 1 and 8 clients, 64 commands in flight each")
async def pipeline(bench: Bench, cfg, out: Recorder):
    socks: Dict[str, List] = {}
    most = max(cfg.pipe_clients)
    for side, w in bench.workers.items():
        socks[side] = [
            await w.session.ws_connect(w.http_base.replace("http", "ws") + "/", max_msg_size=0)
            for _ in range(most)
        ]
        for ws in socks[side]:  # each speaks once, like the bench's main client
            await _pipelined(ws, 1, 1)
    try:
        for w in bench.order(0):  # warm-up, not measured
            await asyncio.gather(
                *(_pipelined(ws, cfg.pipe_warmup, cfg.pipe_depth) for ws in socks[w.side])
            )
        goals = {1: 1.5, 8: 1.3}
        for n_clients in cfg.pipe_clients:
            per_client = cfg.pipe_calls // n_clients
            calls = per_client * n_clients

            async def measure(w: Worker, r: int) -> Dict[str, float]:
                return await measure_pipelined(
                    w, socks[w.side][:n_clients], per_client, cfg.pipe_depth
                )

            results = await bench.alternate(cfg.pipe_rounds, measure)
            noun = "client" if n_clients == 1 else "clients"
            label = f"uuid pipelined, {n_clients} {noun} x {cfg.pipe_depth} in flight"
            out.raw[label] = results
            out.add(
                f"{label}: calls/s ({calls} calls)", "1/s",
                per_side(results, median_of("calls_per_s")), "higher",
                target=ratio_at_least(goals[n_clients]) if n_clients in goals else None,
            )
            out.add(
                f"{label}: worker CPU per call", "us",
                per_side(results, lambda rs: statistics.median(
                    r["cpu_seconds"] / r["calls"] for r in rs) * 1e6),
                "lower",
            )
            # The bench's own CPU share: near 100 % would mean the client is the limit.
            out.raw[label + ": bench process CPU %"] = per_side(
                results, lambda rs: [round(100 * r["bench_cpu_seconds"] / r["seconds"], 1)
                                     for r in rs]
            )
    finally:
        for side_socks in socks.values():
            for ws in side_socks:
                await ws.close()


# -- 5. a chain of nodes ------------------------------------------------------------------
def decode_preview(header: Dict[str, str], payload: bytes):
    """The value of a binary ``io_value`` preview (funcnodes-core's ByteEncoder)."""
    mime = header.get("mime", "")
    if mime.startswith("application/fn.struct."):
        return struct.unpack(mime[len("application/fn.struct."):], payload)[0]
    if mime.startswith("application/json"):
        return json.loads(payload)
    return payload


async def build_chain(w: Worker, n: int, after: Optional[str] = None) -> List[str]:
    """``n`` ``add_node`` nodes with ``b`` defaulting to 1, each ``out`` wired to the
    next one's ``a`` (the first one's ``a`` to ``after``'s ``out`` if given)."""
    c = w.client
    nodes = await asyncio.gather(*(c.call("add_node", id="add_node") for _ in range(n)))
    ids = [node["id"] for node in nodes]
    await asyncio.gather(
        *(c.call("set_default_value", nid=nid, ioid="b", value=1) for nid in ids)
    )
    chain = ([after] if after else []) + ids
    await asyncio.gather(*(
        c.call("add_edge", src_nid=a, src_ioid="out", trg_nid=b, trg_ioid="a")
        for a, b in zip(chain, chain[1:])
    ))
    return ids


async def run_chain(w: Worker, clients: List, first: str, last: str, value: float,
                    expected: float, timeout: float = 60.0) -> Dict[str, float]:
    """Set ``first.a`` to ``value``; seconds until ``clients[0]`` and until every
    client got ``last.out`` == ``expected`` as a binary value preview."""
    loop = asyncio.get_running_loop()
    watches = []
    for c in clients:
        arrived = loop.create_future()

        def watcher(header, payload, now, arrived=arrived):
            if arrived.done() or header.get("node") != last or header.get("io") != "out":
                return
            try:
                if decode_preview(header, payload) == expected:
                    arrived.set_result(now)
            except Exception:
                pass

        c.binary_watchers.append(watcher)
        watches.append((c, watcher, arrived))
    try:
        t0 = time.perf_counter()
        reply = asyncio.ensure_future(w.client.call("set_io_value", nid=first, ioid="a",
                                                    value=value))
        times = await asyncio.wait_for(asyncio.gather(*(a for _, _, a in watches)), timeout)
        await reply
    finally:
        for c, watcher, _ in watches:
            c.binary_watchers.remove(watcher)
    return {"first": times[0] - t0, "all": max(times) - t0}


async def _chain_figure(bench: Bench, cfg, out: Recorder, delay_label: str, goals):
    n = cfg.chain_nodes
    await asyncio.sleep(cfg.settle)
    rss_start = {side: w.rss() for side, w in bench.workers.items()}
    chains = {}
    for w in bench.order(0):
        chains[w.side] = await build_chain(w, n)
    # one unmeasured round each (first trigger of every node)
    for w in bench.order(0):
        ids = chains[w.side]
        await run_chain(w, [w.client], ids[0], ids[-1], 0.5, 0.5 + n)
    extra: Dict[str, List] = {}
    try:
        for n_clients in (1, cfg.chain_clients):
            if n_clients > 1:
                for side, w in bench.workers.items():
                    extra[side] = await w.connect_listening(n_clients - 1)

            async def measure(w: Worker, r: int) -> Dict[str, float]:
                ids = chains[w.side]
                value = 1000.0 * (r + 1) + n_clients + 0.25  # a new value every round
                clients = [w.client] + extra.get(w.side, [])
                return await run_chain(w, clients, ids[0], ids[-1], value, value + n)

            results = await bench.alternate(cfg.chain_rounds, measure)
            noun = "client" if n_clients == 1 else "clients"
            label = f"{n}-node chain, {delay_label}, {n_clients} {noun}"
            out.raw[label] = results
            key = "first" if n_clients == 1 else "all"
            out.add(
                f"{label}: to the last value" + ("" if n_clients == 1 else " at all"), "ms",
                per_side(results, lambda rs: statistics.median(r[key] for r in rs) * 1e3),
                "lower", target=ratio_at_most(goals[n_clients > 1]),
            )
    finally:
        for clients in extra.values():
            for c in clients:
                await c.close()
    await asyncio.sleep(cfg.settle)
    out.add(f"RSS at idle after startup ({delay_label} workers)", "MB",
            {s: mb(v) for s, v in rss_start.items()})
    out.add(f"RSS after the chain rounds ({delay_label})", "MB",
            {s: mb(w.rss()) for s, w in bench.workers.items()}, "lower")


#: funcnodes-core reads FUNCNODES_DEFAULT_PRETRIGGER_DELAY (default 0.01 s) into its
#: default config when imported; the workers' config folders are fresh, so the
#: variable decides (``nodes.default_pretrigger_delay`` in config.json afterwards).
DELAY_VAR = "FUNCNODES_DEFAULT_PRETRIGGER_DELAY"


@figure("chain", "50 add_node nodes in a chain, default pretrigger delay: 1 and 20 clients",
        env={DELAY_VAR: None})
async def chain(bench: Bench, cfg, out: Recorder):
    # At the default delay every node sleeps 10 ms first: 50 nodes >= 0.5 s on both,
    # so the goal is to add nothing to the sleeps, with 1 client or 20; the
    # issue's "with 20 clients <= 0.5x" is the worker's own overhead (chain0).
    await _chain_figure(bench, cfg, out, "default delay", {False: 1.0, True: 1.0})


@figure("chain0", "50 add_node nodes in a chain, pretrigger delay 0: 1 and 20 clients",
        env={DELAY_VAR: "0"})
async def chain0(bench: Bench, cfg, out: Recorder):
    await _chain_figure(bench, cfg, out, "delay 0", {False: 0.5, True: 0.5})


# -- 6. full_state ----------------------------------------------------------------------
@figure("full_state", "`full_state` round trip with a 50- and a 200-node graph")
async def full_state(bench: Bench, cfg, out: Recorder):
    chains: Dict[str, List[str]] = {side: [] for side in SIDES}
    for size in cfg.state_nodes:
        for w in bench.order(0):
            ids = chains[w.side]
            ids += await build_chain(w, size - len(ids), ids[-1] if ids else None)
            # one value through the chain, so every IO has a value to describe
            value = float(size) + 0.5
            await run_chain(w, [w.client], ids[0], ids[-1], value, value + len(ids), timeout=120)
        for w in bench.order(0):  # warm-up
            await w.client.call_auto("full_state")

        async def measure(w: Worker, r: int) -> Dict[str, Any]:
            reply = await w.client.call_auto("full_state")
            nodes = len(reply["result"]["backend"]["nodes"])
            if nodes != size:
                raise RuntimeError(f"{w.title}: full_state has {nodes} nodes, expected {size}")
            return {"seconds": reply["seconds"], "bytes": reply["bytes"], "large": reply["large"]}

        results = await bench.alternate(cfg.state_calls, measure)
        label = f"full_state, {size} nodes"
        out.raw[label] = results
        out.add(
            f"{label}: round trip (median of {cfg.state_calls})", "ms",
            per_side(results, lambda rs: statistics.median(r["seconds"] for r in rs) * 1e3),
            "lower", target=ratio_at_most(0.2),
        )
        out.add(f"{label}: reply size", "kB", per_side(results, lambda rs: rs[-1]["bytes"] / 1e3))


# -- 7. idle CPU ------------------------------------------------------------------------
async def _idle_cpu(bench: Bench, seconds: float) -> Dict[str, Dict[str, float]]:
    """Both workers' CPU (% of one core) over the same ``seconds``: from /proc/<pid>/stat
    (``stat``, 10 ms ticks) and from the threads' schedstat (``sched``, ns)."""
    workers = bench.workers
    before = {s: (w.cpu(), sched_seconds(w.pid)) for s, w in workers.items()}
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - t0
    after = {s: (w.cpu(), sched_seconds(w.pid)) for s, w in workers.items()}
    return {
        s: {
            "stat": 100 * (after[s][0] - before[s][0]) / elapsed,
            "sched": 100 * (after[s][1] - before[s][1]) / elapsed,
            "seconds": elapsed,
        }
        for s in workers
    }


async def _pinger(client, offset: float, period: float):
    """Ping every ``period`` s from ``offset`` on, on a fixed schedule like the UI."""
    loop = asyncio.get_running_loop()
    start = loop.time() + offset
    k = 0
    while True:
        await asyncio.sleep(max(0.0, start + k * period - loop.time()))
        await client.ping()
        k += 1


@figure("idle", "idle CPU with 0 and 20 connected clients (with and without UI pings)")
async def idle(bench: Bench, cfg, out: Recorder):
    n = cfg.idle_clients
    period = 2.0
    phases: Dict[str, Dict] = {}
    for w in bench.workers.values():
        await w.client.close()
        w.client = None
    rest = cfg.settle if cfg.quick else cfg.settle + 1.0
    await asyncio.sleep(rest)
    phases["0 clients"] = await _idle_cpu(bench, cfg.idle_seconds)
    clients = {side: await w.connect_listening(n) for side, w in bench.workers.items()}
    pingers = []
    try:
        await asyncio.sleep(rest)
        phases[f"{n} clients, no pings"] = await _idle_cpu(bench, cfg.idle_seconds)
        for side_clients in clients.values():
            for i, c in enumerate(side_clients):
                pingers.append(asyncio.ensure_future(_pinger(c, period * i / n, period)))
        await asyncio.sleep(rest if cfg.quick else period)
        pongs0 = {s: sum(c.pongs for c in cs) for s, cs in clients.items()}
        phases[f"{n} clients pinging every {period:g} s"] = await _idle_cpu(bench, cfg.idle_seconds)
        pongs = {s: sum(c.pongs for c in cs) - pongs0[s] for s, cs in clients.items()}
    finally:
        for task in pingers:
            task.cancel()
        for side_clients in clients.values():
            for c in side_clients:
                await c.close()
    for phase, values in phases.items():
        out.add(
            f"idle CPU, {phase} ({cfg.idle_seconds:g} s)", "%",
            {s: v["stat"] for s, v in values.items()}, "lower",
            target=tw_at_most(0.2) if phase != "0 clients" else None,
        )
    out.raw["cpu_percent"] = phases
    # The reference sends each pong to every client (it broadcasts it); ours to the sender.
    out.raw["pongs_received_while_pinging"] = pongs


# -- startup: in a module of its own (bench/startup.py) ----------------------------------
from bench import startup as _startup  # noqa: E402,F401  (registers the figure)


# -- as_bytes: in a module of its own (bench/binary.py) ----------------------------------
from bench import binary as _binary  # noqa: E402,F401  (registers the figure)


# -- metrics_cost: in a module of its own (bench/metrics_cost.py) ------------------------
from bench import metrics_cost as _metrics_cost  # noqa: E402,F401  (registers the figure)
