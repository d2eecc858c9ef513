"""The figures: small measurement functions sharing the ``Bench`` harness.

A figure is ``async def f(bench, cfg, out)``, registered with ``@figure(name, title)``.
It gets both workers freshly started (``bench.workers["tw"]``, ``bench.workers["ref"]``),
the run's ``Config`` and a ``Recorder``; it adds table rows with
``out.add(label, unit, {side: value}, better)`` and anything worth keeping in the JSON
output to ``out.raw``. To add a figure, write one more such function below.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional

from bench.harness import MB, SIDES, Bench, RssSampler, Worker, hwm_bytes, reset_hwm


# -- results ----------------------------------------------------------------------------
@dataclass
class Row:
    label: str
    unit: str
    values: Dict[str, Optional[float]]
    better: Optional[str] = None  # "higher", "lower" or None (informational)
    #: No ratio when the reference's value is below this (e.g. RSS growth of 0.0 MB)
    #: or when the two values have opposite signs.
    noise: float = 0.0

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
        }


@dataclass
class Recorder:
    name: str
    title: str
    rows: List[Row] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    seconds: float = 0.0

    def add(self, label: str, unit: str, values: Dict[str, Optional[float]], better=None) -> Row:
        """One table row; ratios of MB values under 1 MB are noise and not shown."""
        row = Row(label, unit, dict(values), better, noise=1.0 if unit == "MB" else 0.0)
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


FIGURES: List[Figure] = []


def figure(name: str, title: str):
    def register(function):
        FIGURES.append(Figure(name, title, function))
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
    sizes = [(cfg.upload_mb, cfg.upload_rounds)]
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
        out.raw[label] = results
        out.add(f"{label}: throughput", "MB/s", per_side(results, median_of("mb_per_s")), "higher")
        out.add(
            f"{label}: peak RSS growth", "MB",
            per_side(results, lambda rs: mb(max(r["peak_growth"] for r in rs))), "lower",
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
        "higher",
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
    for p in (50, 99):
        out.add(
            f"uuid RPC p{p} ({n} calls)", "ms",
            {s: percentile(v, p) * 1e3 for s, v in pooled.items()}, "lower",
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
