"""Heavy nodes on a Dask cluster beside the local process pool, in one run.

    .venv/bin/python -m bench.cluster [--quick] [--json results.json]

Starts a ``dask scheduler`` and two ``dask worker`` processes (4 threads each) on
127.0.0.1, and two funcnodes_tw workers: one plain (``separate_process`` nodes in
its local process pool), one with ``--cluster``. Both load the test nodes of
``tests/cluster_nodes.py`` and ``tests/isolation_nodes.py``. The reference worker
has no cluster (nor a process pool: funcnodes-core 2.4 runs such nodes in a
thread), so the comparison is funcnodes_tw's local pool against the cluster:

* *per-call time of a trivial node*: ``set_io_value`` to the node's output frame,
  one call after the other (median): the cost of the way there and back;
* *100 small tasks*: 100 such nodes triggered together, until the last output;
* *100 MB array*: a node makes a 100 MB numpy array, a second one takes it and
  returns it (three transfers of 100 MB), until the second node's output; MB/s
  counts the three;
* *ping p99 during 8 heavy nodes*: WebSocket round trips (``bench.isolation``'s
  pinger, every 10 ms) while 8 nodes burn CPU for 2 s each (the issue's goal for
  the cluster: p99 <= 20 ms);
* *RSS after start*: what importing Dask's client and connecting costs.

On one machine the dask workers share its cores with everything else: the figures
show the worker's own overhead and responsiveness, not a cluster's speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from bench.figures import percentile
from bench.harness import MB, ROOT, Worker, free_port
from bench.isolation import Pinger

SIDES = ("local", "cluster")
MEGABYTES = 100


class Dask:
    """A scheduler and dask workers on 127.0.0.1, as subprocesses."""

    def __init__(self, run_dir: Path, env: Dict[str, str]):
        self.run_dir = run_dir
        self.env = env
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: List[subprocess.Popen] = []

    def _spawn(self, name: str, argv: List[str]) -> subprocess.Popen:
        with open(self.run_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", *argv], env=self.env, cwd=self.run_dir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        self.procs.append(proc)
        return proc

    async def start(self, workers: int, threads: int):
        self._spawn("scheduler", ["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--no-dashboard"])
        await _listening(self.port)
        for i in range(workers):
            self._spawn(f"worker{i}", [
                "distributed.cli.dask_worker", self.address, "--host", "127.0.0.1",
                "--nthreads", str(threads), "--no-nanny", "--no-dashboard",
                "--local-directory", str(self.run_dir / f"worker{i}-space"),
            ])

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _listening(port: int, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port} after {timeout} s")
            await asyncio.sleep(0.1)
        else:
            writer.close()
            return


class Outputs:
    """Arrival times and values of the nodes' ``out`` frames on a worker's client."""

    def __init__(self, worker: Worker):
        self.waiting: Dict[str, asyncio.Future] = {}
        worker.client.binary_watchers.append(self._frame)

    def _frame(self, header, payload, now):
        future = self.waiting.pop(header.get("node"), None)
        if future is not None and header.get("io") == "out" and not future.done():
            value = json.loads(payload) if "json" in header.get("mime", "") else None
            future.set_result((now, value))
        elif future is not None:
            self.waiting[header.get("node")] = future

    def expect(self, nid: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiting[nid] = future
        return future


async def _add(w: Worker, node_id: str) -> str:
    return (await w.client.call("add_node", id=node_id))["id"]


async def _on_cluster(w: Worker, outputs: Outputs, timeout: float = 60.0):
    """Wait until a trivial node runs on a dask worker (the worker connected)."""
    nid = await _add(w, "cluster_test.double")
    deadline = time.monotonic() + timeout
    x = 0
    while True:
        x += 1
        arrived = outputs.expect(nid)
        await w.client.call("set_io_value", nid=nid, ioid="x", value=x)
        try:
            _, value = await asyncio.wait_for(arrived, 2)
        except asyncio.TimeoutError:  # failed: no scheduler yet
            value = None
        if value and value.get("worker"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not reach the cluster\n{w.log_tail()}")
        await asyncio.sleep(0.5)
    await w.client.call("remove_node", id=nid)


async def per_call(w: Worker, outputs: Outputs, calls: int) -> float:
    nid = await _add(w, "cluster_test.double")
    times = []
    for x in range(calls):
        arrived = outputs.expect(nid)
        t0 = time.perf_counter()
        await w.client.call("set_io_value", nid=nid, ioid="x", value=x + 1)
        now, value = await asyncio.wait_for(arrived, 60)
        assert value["value"] == 2 * (x + 1), value
        times.append(now - t0)
    await w.client.call("remove_node", id=nid)
    return statistics.median(times)


async def many(w: Worker, outputs: Outputs, count: int) -> float:
    nids = [await _add(w, "cluster_test.double") for _ in range(count)]
    arrivals = [outputs.expect(nid) for nid in nids]
    t0 = time.perf_counter()
    for i, nid in enumerate(nids):
        await w.client.call("set_io_value", nid=nid, ioid="x", value=i)
    done = await asyncio.wait_for(asyncio.gather(*arrivals), 300)
    assert sorted(value["value"] for _, value in done) == [2 * i for i in range(count)]
    wall = max(now for now, _ in done) - t0
    for nid in nids:
        await w.client.call("remove_node", id=nid)
    return wall


async def array(w: Worker, outputs: Outputs, megabytes: int) -> float:
    make = await _add(w, "cluster_test.make_array")
    echo = await _add(w, "cluster_test.echo")
    await w.client.call("add_edge", src_nid=make, src_ioid="out", trg_nid=echo, trg_ioid="array")
    arrived = outputs.expect(echo)
    t0 = time.perf_counter()
    await w.client.call("set_io_value", nid=make, ioid="megabytes", value=megabytes)
    now, _ = await asyncio.wait_for(arrived, 300)
    for nid in (make, echo):
        await w.client.call("remove_node", id=nid)
    return now - t0


async def heavy(w: Worker, outputs: Outputs, count: int, seconds: float) -> Dict:
    nids = [await _add(w, "isolation.burn") for _ in range(count)]
    pinger = await Pinger.open(w)
    try:
        pinger.start()
        await asyncio.sleep(0.5)
        arrivals = [outputs.expect(nid) for nid in nids]
        for nid in nids:
            await w.client.call("set_io_value", nid=nid, ioid="seconds", value=seconds)
        runs = [value for _, value in await asyncio.wait_for(asyncio.gather(*arrivals), 600)]
        await pinger.stop()
    finally:
        await pinger.close()
    start = min(run["start"] for run in runs)
    end = max(run["end"] for run in runs)
    work = pinger.between(start, end)
    for nid in nids:
        await w.client.call("remove_node", id=nid)
    return {
        "p50": percentile(work, 50) * 1e3,
        "p99": percentile(work, 99) * 1e3,
        "max": work[-1] * 1e3,
        "pings": len(work),
        "wall": end - start,
        "processes": len({run["pid"] for run in runs}),
    }


async def run(quick: bool) -> Dict:
    run_dir = Path(tempfile.mkdtemp(prefix="fn-bench-cluster-"))
    tests = str(ROOT / "tests")
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    dask = Dask(run_dir, env)
    workers: Dict[str, Worker] = {}
    try:
        await dask.start(workers=2, threads=4)
        workers = {
            "local": Worker("tw", run_dir / "local", env),
            "cluster": Worker("tw", run_dir / "cluster", env, ["--cluster", dask.address]),
        }
        await asyncio.gather(*(w.start() for w in workers.values()))
        rss = {side: w.rss() / MB for side, w in workers.items()}
        outputs = {side: Outputs(w) for side, w in workers.items()}
        for w in workers.values():
            for shelf in ("cluster_nodes", "isolation_nodes"):
                await w.client.call("add_shelf", timeout=120, src=shelf)
        await _on_cluster(workers["cluster"], outputs["cluster"])
        calls, count, megabytes, seconds = (5, 20, 10, 0.5) if quick else (30, 100, MEGABYTES, 2.0)
        results: Dict[str, Dict] = {side: {"rss_mb": rss[side]} for side in SIDES}
        for side in SIDES:
            w, out = workers[side], outputs[side]
            results[side]["per_call_ms"] = await per_call(w, out, calls) * 1e3
            results[side]["many_s"] = await many(w, out, count)
            took = await array(w, out, megabytes)
            results[side]["array_s"] = took
            results[side]["array_mb_s"] = 3 * megabytes * 1024 * 1024 / MB / took
            results[side]["heavy"] = await heavy(w, out, 8, seconds)
        results["sizes"] = {"calls": calls, "tasks": count, "megabytes": megabytes,
                            "heavy_seconds": seconds, "cores": os.cpu_count()}
        return results
    finally:
        for w in workers.values():
            await w.stop()
        dask.stop()


def table(results: Dict) -> str:
    sizes = results["sizes"]
    rows = [
        (f"per-call time of a trivial node (median of {sizes['calls']})", "ms", "per_call_ms"),
        (f"{sizes['tasks']} small tasks together", "s", "many_s"),
        (f"{sizes['megabytes']} MiB array out, in and out (3 transfers)", "s", "array_s"),
        ("  the same as throughput", "MB/s", "array_mb_s"),
        ("RSS after start", "MB", "rss_mb"),
    ]
    heavy = [
        (f"ping p50 during 8 heavy nodes ({sizes['heavy_seconds']:g} s each)", "ms", "p50"),
        ("ping p99 during 8 heavy nodes (goal <= 20 ms)", "ms", "p99"),
        ("ping max during 8 heavy nodes", "ms", "max"),
        ("wall time of the 8 heavy nodes", "s", "wall"),
    ]
    lines = [f"{'figure':<58} | {'local pool':>14} | {'cluster':>14}", "-" * 92]
    for label, unit, key in rows:
        values = [results[side][key] for side in SIDES]
        lines.append(f"{label:<58} | " + " | ".join(f"{v:>9.2f} {unit:<4}" for v in values))
    for label, unit, key in heavy:
        values = [results[side]["heavy"][key] for side in SIDES]
        lines.append(f"{label:<58} | " + " | ".join(f"{v:>9.2f} {unit:<4}" for v in values))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.quick))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
