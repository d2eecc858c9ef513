"""The ``isolation`` figure: how fast a worker answers while nodes work off its loop.

Both workers load the test suite's ``tests/isolation_nodes.py`` (``add_shelf``) and get
a ``burn`` node (``separate_process=True``: pure-Python CPU work) and a ``nap`` node
(``separate_thread=True``: ``time.sleep``). Per round, on a second WebSocket connection
of its own (``autoping`` off), the bench sends a WebSocket ping every 10 ms: 0.5 s idle,
then both nodes are triggered for 2 s each (``--quick``: 0.5 s) and pinging goes on
until both have reported their result. Three rounds alternate between the workers.

* *ping p50 / p99 / max during the work*: round trips of the pings sent between the
  first node's start and the last node's end (as the nodes report them), pooled over
  the rounds. The goal for funcnodes_tw: p99 <= 20 ms.
* *ping p99 idle*: the 0.5 s before each round.
* *wall time of both nodes*: last end minus first start (median): about 2 s when they
  run side by side, 4 s when one waits for the other.
* *CPU node in its own process*: 1 when ``burn`` reported a pid other than the worker's
  (funcnodes-core 2.4, and so the reference, run ``separate_process`` nodes in a thread).

The ping's round trip needs the worker's event loop (the server answers pings there), so
it shows how long a request would wait. The JSON has every round's node runs and pings.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Dict, List

import aiohttp

from bench.figures import Recorder, figure, percentile, tw_at_most
from bench.harness import ROOT, Bench, Worker

NODES = "isolation_nodes"
PING_INTERVAL = 0.01
IDLE = 0.5
ROUNDS = 3


def _pythonpath() -> str:
    # The workers import isolation_nodes (also in funcnodes_tw's pool processes).
    return os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))


class Pinger:
    """WebSocket pings on a connection of its own; ``rtts`` holds (sent, round trip)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.sent: Dict[bytes, tuple] = {}
        self.rtts: List[tuple] = []
        self.sender = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, worker: Worker) -> "Pinger":
        ws = await worker.session.ws_connect(
            f"ws://127.0.0.1:{worker.port}/", autoping=False, heartbeat=None, max_msg_size=0
        )
        return cls(ws)

    async def _read(self):
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.PONG:
                entry = self.sent.pop(bytes(msg.data), None)
                if entry is not None:
                    self.rtts.append((entry[0], time.perf_counter() - entry[1]))
            elif msg.type == aiohttp.WSMsgType.PING:
                await self.ws.pong(msg.data)

    async def _send(self):
        seq = 0
        while True:
            seq += 1
            payload = str(seq).encode()
            self.sent[payload] = (time.time(), time.perf_counter())
            await self.ws.ping(payload)
            await asyncio.sleep(PING_INTERVAL)

    def start(self):
        self.sent.clear()
        self.rtts = []
        self.sender = asyncio.get_running_loop().create_task(self._send())

    async def stop(self):
        self.sender.cancel()
        await asyncio.gather(self.sender, return_exceptions=True)
        await asyncio.sleep(0.1)  # the last pongs

    def between(self, start: float, end: float) -> List[float]:
        return sorted(rtt for sent, rtt in self.rtts if start <= sent <= end)

    def lost(self, start: float, end: float) -> int:
        return sum(1 for sent, _ in self.sent.values() if start <= sent <= end)

    async def close(self):
        if self.sender is not None:
            self.sender.cancel()
        await self.ws.close()
        self.reader.cancel()


async def _results(w: Worker, nids: Dict[str, str], since: float, timeout: float) -> Dict:
    """Poll the nodes' outputs until each reports a run that started after ``since``."""
    deadline = time.monotonic() + timeout
    runs: Dict[str, dict] = {}
    while len(runs) < len(nids):
        for name, nid in nids.items():
            if name not in runs:
                value = await w.client.call("get_io_value", nid=nid, ioid="out")
                if isinstance(value, dict) and value.get("start", 0) >= since:
                    runs[name] = value
        if len(runs) < len(nids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{w.title}: nodes did not finish ({sorted(runs)} did)")
            await asyncio.sleep(0.05)
    return runs


@figure(
    "isolation",
    "ping round trips while a node burns CPU (separate_process) and one sleeps (separate_thread)",
    env={"PYTHONPATH": _pythonpath()},
)
async def isolation(bench: Bench, cfg, out: Recorder):
    seconds = 0.5 if cfg.quick else 2.0
    nodes: Dict[str, Dict[str, str]] = {}
    pingers: Dict[str, Pinger] = {}
    try:
        for w in bench.order(0):
            await w.client.call("add_shelf", timeout=120, src=NODES)
            nodes[w.side] = {
                name: (await w.client.call("add_node", id=f"isolation.{name}"))["id"]
                for name in ("burn", "nap")
            }
            pingers[w.side] = await Pinger.open(w)

        async def measure(w: Worker, r: int) -> Dict:
            pinger, nids = pingers[w.side], nodes[w.side]
            pinger.start()
            await asyncio.sleep(IDLE)
            began = time.time()
            value = seconds + r * 1e-6  # a new value each round
            for nid in nids.values():
                await w.client.call("set_io_value", nid=nid, ioid="seconds", value=value)
            runs = await _results(w, nids, began - 0.01, timeout=seconds * 10 + 60)
            await pinger.stop()
            start = min(run["start"] for run in runs.values())
            end = max(run["end"] for run in runs.values())
            return {
                "runs": runs,
                "worker_pid": w.pid,
                "work": pinger.between(start, end),
                "idle": pinger.between(began - IDLE, began),
                "lost": pinger.lost(start, end),
                "wall": end - start,
            }

        results = await bench.alternate(ROUNDS, measure)
    finally:
        for pinger in pingers.values():
            await pinger.close()

    work = {s: sorted(x for r in rs for x in r["work"]) for s, rs in results.items()}
    idle = {s: sorted(x for r in rs for x in r["idle"]) for s, rs in results.items()}
    label = f"{seconds:g} s CPU + {seconds:g} s sleep"
    for p in (50, 99):
        out.add(
            f"ping p{p} during {label}", "ms",
            {s: percentile(v, p) * 1e3 if v else None for s, v in work.items()}, "lower",
            target=tw_at_most(20) if p == 99 else None,
        )
    out.add(
        f"ping max during {label}", "ms",
        {s: v[-1] * 1e3 if v else None for s, v in work.items()}, "lower",
    )
    out.add(
        "ping p99 idle", "ms",
        {s: percentile(v, 99) * 1e3 if v else None for s, v in idle.items()}, "lower",
    )
    out.add(
        f"wall time of both nodes ({label})", "s",
        {s: statistics.median(r["wall"] for r in rs) for s, rs in results.items()}, "lower",
    )
    out.add(
        "CPU node in its own process (1 = yes)", "",
        {
            s: min(float(r["runs"]["burn"]["pid"] != r["worker_pid"]) for r in rs)
            for s, rs in results.items()
        },
    )
    out.raw["rounds"] = {
        s: [
            {
                "runs": r["runs"],
                "worker_pid": r["worker_pid"],
                "wall": r["wall"],
                "pings_during_work": len(r["work"]),
                "pings_lost": r["lost"],
                "ping_ms_during_work": [round(x * 1e3, 3) for x in r["work"]],
                "ping_ms_idle": [round(x * 1e3, 3) for x in r["idle"]],
            }
            for r in rs
        ]
        for s, rs in results.items()
    }
