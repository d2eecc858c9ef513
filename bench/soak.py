"""Soak: a realistic mixed workload against one funcnodes_tw worker for minutes,
watching whether its memory grows.

    .venv/bin/python -m bench.soak                 # 10 minutes, RSS every 10 s
    .venv/bin/python -m bench.soak --minutes 60 --json soak.json
    .venv/bin/python -m bench.soak --quick         # 30 s smoke run, RSS every 2 s
    .venv/bin/python -m bench.soak --worker ref    # the reference worker instead

One worker subprocess (``python -m funcnodes_tw``, or the reference worker with
``--worker ref``), and in this process, all at once:

* ``ui`` x 5: UI-like clients that stay connected, ping every 2 s and read
  ``full_state`` every 10 s (the UI does on ``fullsync``);
* ``editor``: adds an ``add_node`` node every 0.2 s, wires it to the previous
  one, sets its value, moves it (``update_node_view``); beyond 40 nodes it
  removes the oldest, so the graph stays the same size while nodes come and go;
* ``setter``: 20 ``set_io_value`` per second on the head of a 10-node chain,
  so value previews and trigger events reach every client;
* ``churn``: every 2 s a new connection that asks ``uuid``, ``full_state``,
  ``get_library`` and leaves;
* ``big``: every 30 s a 2 MB string set through ``POST /message/``, then read
  back with ``get_io_full_value`` (a ``large_message`` hint + ``GET``);
* ``files``: every 20 s a 1 MB ``POST /upload/``; every 30 s ``save``; every
  60 s ``export_worker``.

The worker's ``VmRSS`` is sampled every ``--interval`` seconds and printed as it
goes; at the end the series, the slope (least squares, MB per minute) over the
whole run and over its second half (after warm-up), and the number of commands,
errors and timeouts. Exit status 1 when a command failed or timed out, or with
``--max-slope`` when the second-half slope is above it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # `python bench/soak.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import BOUNDARY, big_string  # noqa: E402
from bench.harness import MB, TITLES, Client, Worker, cpu_seconds, kill_all  # noqa: E402


#: The parts of the workload, for ``--actors`` (to find which one a growth comes with).
ACTORS = ("ui", "editor", "setter", "churn", "big", "files")


def slope_mb_per_min(series: List[tuple]) -> float:
    """Least-squares slope of ``[(seconds, MB)]`` in MB per minute."""
    if len(series) < 2:
        return 0.0
    n = len(series)
    mx = sum(t for t, _ in series) / n
    my = sum(v for _, v in series) / n
    sxx = sum((t - mx) ** 2 for t, _ in series)
    if not sxx:
        return 0.0
    sxy = sum((t - mx) * (v - my) for t, v in series)
    return sxy / sxx * 60


class Soak:
    def __init__(self, worker: Worker, seconds: float, interval: float, scale: float = 1.0,
                 actors=ACTORS):
        self.worker = worker
        self.actors = actors
        self.seconds = seconds
        self.interval = interval
        self.scale = scale  # < 1: shorter periods (--quick)
        self.stats: Counter = Counter()
        self.failures: List[str] = []
        self.series: List[tuple] = []
        self.stopping = asyncio.Event()
        self.t0 = 0.0

    def every(self, seconds: float) -> float:
        return seconds * self.scale

    async def call(self, client: Client, actor: str, cmd: str, timeout: float = 30.0, **kw):
        try:
            # Any reply may come as a large_message hint (full_state of a graph
            # holding the 2 MB string, export_worker with the uploaded file).
            reply = await client.call_auto(cmd, timeout=timeout, **kw)
        except (asyncio.TimeoutError, TimeoutError):
            self.stats["timeouts"] += 1
            self._fail(f"{actor}: {cmd} timed out")
            raise
        except Exception as exc:
            self.stats["errors"] += 1
            self._fail(f"{actor}: {cmd} failed: {exc!r}"[:300])
            raise
        self.stats["commands"] += 1
        if reply["large"]:
            self.stats["large_messages"] += 1
        return reply["result"]

    def _fail(self, text: str):
        if len(self.failures) < 50:
            self.failures.append(f"{time.perf_counter() - self.t0:7.1f} s {text}")

    async def sleep(self, seconds: float) -> bool:
        """Sleep; False once the soak is over."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            return True
        return False

    async def connect(self) -> Client:
        client = await self.worker.connect()
        self.stats["connections"] += 1
        return client

    # -- actors -----------------------------------------------------------------------
    async def ui(self, index: int):
        client = await self.connect()
        try:
            await self.call(client, "ui", "uuid")
            await self.call(client, "ui", "full_state")
            next_state = time.monotonic() + self.every(10) + index
            while await self.sleep(2.0):
                await client.ping()
                if time.monotonic() >= next_state:
                    await self.call(client, "ui", "full_state")
                    next_state += self.every(10)
                client.drain_hints()  # broadcast POST /message/ results
        finally:
            await client.close()

    async def editor(self):
        client = await self.connect()
        nodes: List[str] = []
        rng = random.Random(1)
        try:
            await self.call(client, "editor", "uuid")
            while await self.sleep(0.2):
                node = await self.call(client, "editor", "add_node", id="add_node")
                nid = node["id"]
                await self.call(client, "editor", "set_default_value", nid=nid, ioid="b", value=1)
                if nodes:
                    await self.call(client, "editor", "add_edge", src_nid=nodes[-1],
                                    src_ioid="out", trg_nid=nid, trg_ioid="a")
                else:
                    await self.call(client, "editor", "set_io_value", nid=nid, ioid="a",
                                    value=rng.random())
                await self.call(client, "editor", "update_node_view", nid=nid,
                                data={"pos": [rng.randint(0, 2000), rng.randint(0, 2000)]})
                nodes.append(nid)
                if len(nodes) > 40:
                    await self.call(client, "editor", "remove_node", id=nodes.pop(0))
                    self.stats["nodes_removed"] += 1
                    await self.call(client, "editor", "set_io_value", nid=nodes[0], ioid="a",
                                    value=rng.random())
                client.drain_hints()
        finally:
            await client.close()

    async def setter(self):
        client = await self.connect()
        try:
            await self.call(client, "setter", "uuid")
            chain = []
            for _ in range(10):
                chain.append((await self.call(client, "setter", "add_node", id="add_node"))["id"])
            for nid in chain:
                await self.call(client, "setter", "set_default_value", nid=nid, ioid="b", value=1)
            for a, b in zip(chain, chain[1:]):
                await self.call(client, "setter", "add_edge", src_nid=a, src_ioid="out",
                                trg_nid=b, trg_ioid="a")
            value = 0
            while await self.sleep(0.05):
                value += 1
                await self.call(client, "setter", "set_io_value", nid=chain[0], ioid="a",
                                value=value)
                if value % 100 == 0:
                    await self.call(client, "setter", "get_io_value", nid=chain[-1], ioid="out")
                client.drain_hints()
        finally:
            await client.close()

    async def churn(self):
        while await self.sleep(self.every(2)):
            client = await self.connect()
            try:
                await self.call(client, "churn", "uuid")
                await self.call(client, "churn", "full_state")
                await self.call(client, "churn", "get_library")
            finally:
                await client.close()

    async def big(self):
        client = await self.connect()
        try:
            await self.call(client, "big", "uuid")
            nid = (await self.call(client, "big", "add_node", id="input.str"))["id"]
            size = 2 * MB
            while await self.sleep(self.every(30)):
                value = big_string(size)
                await self.worker.post_command("set_io_value", nid=nid, ioid="input", value=value)
                del value
                try:
                    fetched = await client.call_large("get_io_full_value", nid=nid, ioid="input")
                except Exception as exc:
                    self.stats["errors"] += 1
                    self._fail(f"big: large get_io_full_value failed: {exc!r}")
                else:
                    self.stats["commands"] += 1
                    self.stats["large_messages"] += 1
                    if fetched["bytes"] < size:
                        self._fail(f"big: fetched only {fetched['bytes']} bytes")
                client.drain_hints()
        finally:
            await client.close()

    async def files(self):
        client = await self.connect()
        try:
            await self.call(client, "files", "uuid")
            body = self.upload_body()
            headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
            tick = 0
            while await self.sleep(self.every(10)):
                tick += 1
                if tick % 2 == 0:
                    status, reply = await self.worker.post("/upload/", body, headers=headers)
                    if status != 200:
                        self.stats["errors"] += 1
                        self._fail(f"files: upload -> {status} {reply[:200]!r}")
                    else:
                        self.stats["uploads"] += 1
                if tick % 3 == 0:
                    await self.call(client, "files", "save")
                if tick % 6 == 0:
                    await self.call(client, "files", "export_worker", timeout=60)
                client.drain_hints()
        finally:
            await client.close()

    def upload_body(self) -> bytes:
        head = (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="soak.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        return head + random.Random(7).randbytes(MB) + f"\r\n--{BOUNDARY}--\r\n".encode()

    # -- the run ------------------------------------------------------------------------
    async def sample(self):
        pid = self.worker.pid
        next_at = 0.0
        while True:
            now = time.perf_counter() - self.t0
            rss = self.worker.rss() / MB
            self.series.append((round(now, 1), round(rss, 1)))
            print(f"[soak] {now:6.0f} s  RSS {rss:7.1f} MB  commands {self.stats['commands']:7d}"
                  f"  errors {self.stats['errors'] + self.stats['timeouts']}"
                  f"  cpu {cpu_seconds(pid):6.1f} s", file=sys.stderr, flush=True)
            next_at += self.interval
            if next_at > self.seconds + 1e-6:
                return
            await asyncio.sleep(max(0.0, self.t0 + next_at - time.perf_counter()))

    async def run(self) -> Dict:
        self.t0 = time.perf_counter()
        actors = []
        if "ui" in self.actors:
            actors += [(lambda i=i: self.ui(i)) for i in range(5)]
        actors += [getattr(self, name) for name in ACTORS[1:] if name in self.actors]
        tasks = [asyncio.ensure_future(self._guard(a)) for a in actors]
        await self.sample()
        self.stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        half = [p for p in self.series if p[0] >= self.seconds / 2]
        return {
            "seconds": time.perf_counter() - self.t0,
            "interval": self.interval,
            "rss_series_mb": self.series,
            "slope_mb_per_min": slope_mb_per_min(self.series),
            "slope_second_half_mb_per_min": slope_mb_per_min(half),
            "rss_start_mb": self.series[0][1],
            "rss_end_mb": self.series[-1][1],
            "rss_max_mb": max(v for _, v in self.series),
            "stats": dict(self.stats),
            "failures": self.failures,
        }

    async def _guard(self, actor):
        """Run ``actor()``; after a failure (already counted) start it again."""
        while not self.stopping.is_set():
            try:
                await actor()
            except Exception as exc:
                self._fail(f"actor restarted after: {exc!r}"[:300])
                self.stats["actors_restarted"] += 1
                await self.sleep(1.0)


async def soak(minutes: float, interval: float, scale: float, keep: bool,
               actors=ACTORS, side: str = "tw") -> Dict:
    run_dir = Path(tempfile.mkdtemp(prefix="fn-soak-"))
    worker = Worker(side, run_dir, dict(os.environ))
    try:
        await worker.start()
        print(f"[soak] worker pid {worker.pid} on port {worker.port}, "
              f"{minutes:g} min, RSS every {interval:g} s", file=sys.stderr, flush=True)
        report = await Soak(worker, minutes * 60, interval, scale, actors).run()
    finally:
        t0 = time.perf_counter()
        await worker.stop()  # SIGTERM; SIGKILL if not gone after 10 s
        stop_seconds = time.perf_counter() - t0
    report["worker_exit_code"] = worker.proc.returncode
    report["stop_seconds"] = stop_seconds
    report["actors"] = list(actors)
    report["worker"] = worker.title
    report["run_dir"] = str(run_dir)
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def summary(report: Dict) -> str:
    series = report["rss_series_mb"]
    s = report["stats"]
    points = ", ".join(f"{t:g}: {v:.1f}" for t, v in series)
    lines = [f"{report['worker']}: RSS series (s, MB): {points}"]
    lines.append(
        f"RSS start {report['rss_start_mb']:.1f} MB, end {report['rss_end_mb']:.1f} MB, "
        f"max {report['rss_max_mb']:.1f} MB; slope {report['slope_mb_per_min']:+.2f} MB/min "
        f"(second half {report['slope_second_half_mb_per_min']:+.2f} MB/min)"
    )
    lines.append(
        f"commands {s.get('commands', 0)}, connections {s.get('connections', 0)}, "
        f"nodes removed {s.get('nodes_removed', 0)}, large messages {s.get('large_messages', 0)}, "
        f"uploads {s.get('uploads', 0)}; errors {s.get('errors', 0)}, timeouts "
        f"{s.get('timeouts', 0)}, actors restarted {s.get('actors_restarted', 0)}; "
        f"worker exit code {report['worker_exit_code']} after {report['stop_seconds']:.1f} s"
    )
    lines += [f"  {f}" for f in report["failures"][:20]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--quick", action="store_true",
                        help="30 s, RSS every 2 s, periodic jobs 5x as often")
    parser.add_argument("--max-slope", type=float,
                        help="fail when the second-half slope is above this (MB/min)")
    parser.add_argument("--actors", default=",".join(ACTORS),
                        help=f"comma-separated subset of {','.join(ACTORS)} (default: all)")
    parser.add_argument("--worker", choices=sorted(TITLES), default="tw",
                        help="tw: funcnodes_tw (default), ref: the reference worker")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)
    actors = tuple(a.strip() for a in args.actors.split(",") if a.strip())
    unknown = set(actors) - set(ACTORS)
    if unknown:
        parser.error(f"unknown actors: {', '.join(sorted(unknown))}")
    minutes, interval, scale = args.minutes, args.interval, 1.0
    if args.quick:
        minutes, interval, scale = 0.5, 2.0, 0.2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        report = asyncio.run(soak(minutes, interval, scale, args.keep, actors, args.worker))
    finally:
        kill_all()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(summary(report))
    failed = report["stats"].get("errors", 0) or report["stats"].get("timeouts", 0)
    failed = failed or report["stats"].get("actors_restarted", 0) or report["worker_exit_code"]
    if args.max_slope is not None and report["slope_second_half_mb_per_min"] > args.max_slope:
        print(f"slope above {args.max_slope} MB/min", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
