"""The ``metrics_cost`` figure: what counting for ``GET /metrics`` costs the hot path.

Two funcnodes_tw workers of the same build, one as usual (metrics on) and one with
``--no-metrics``, get the ``pipeline`` figure's workload (``uuid`` commands, 64 in
flight per client; 1 client, then 8) in rounds that alternate which goes first, so
slow drift from other load falls on both alike. The pair the harness started sits idle.

A 5 % difference is smaller than what this machine adds by itself, so:

* the figure's workers run on one CPU and the bench on the others (with two or more
  CPUs), so the bench's client and a worker do not take turns on one core;
* it starts ``PAIRS`` pairs of workers, one pair after the other, and pools their
  rounds: two processes of one build can differ by 10 % for their whole life (a
  control of two ``--no-metrics`` workers gave 0.87 to 1.06 per pair on 2026-12-07),
  which more rounds of a single pair do not average out;
* worker CPU per call comes from schedstat (nanoseconds), not from 10 ms ticks;
* with valgrind installed, it also counts the instructions each worker executes for
  the same ``CALLGRIND_CALLS`` calls (callgrind): a figure without that noise.

The table shows the worker with metrics in the funcnodes_tw column and the one without
in the reference column, so the ratio is on / off. The goal (issue 13): throughput with
metrics within 5 % of the same build without, ``>= 0.95x``. The JSON has every round.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
from contextlib import contextmanager
from typing import Dict, List, Optional

from bench.figures import Recorder, _pipelined, figure, measure_pipelined, ratio_at_least
from bench.harness import Bench, Worker

#: The figure's two workers: its table columns (tw, ref) and their extra options.
VARIANTS = {"tw": ("on", ()), "ref": ("off", ("--no-metrics",))}
#: Pairs of workers started one after the other (1 with --quick).
PAIRS = 3
#: Calls counted under callgrind, after as many for warming up.
CALLGRIND_CALLS = 3000


@figure("metrics_cost", "pipelined `uuid` throughput of funcnodes_tw with metrics on vs --no-metrics")
async def metrics_cost(bench: Bench, cfg, out: Recorder):
    pairs = 1 if cfg.quick else PAIRS
    rounds = max(1, 11 * cfg.pipe_rounds // pairs)  # rounds vary by ~10 % here
    worker_cpus, bench_cpus = split_cpus()
    results = {n: {column: [] for column in VARIANTS} for n in cfg.pipe_clients}
    with running_on(bench_cpus):
        for pair in range(pairs):
            workers = {
                column: Worker("tw", bench.run_dir / "metrics_cost" / f"{name}{pair}",
                               bench.env, [*cfg.tw_options, *options], cpus=worker_cpus)
                for column, (name, options) in VARIANTS.items()
            }
            try:
                await asyncio.gather(*(w.start() for w in workers.values()))
                for n_clients in cfg.pipe_clients:
                    await _phase(workers, cfg, n_clients, rounds, results[n_clients])
            finally:
                await asyncio.gather(*(w.stop() for w in workers.values()),
                                     return_exceptions=True)
        instructions = await _instructions(bench, cfg, worker_cpus)

    where = "" if worker_cpus is None else f", workers on CPU {min(worker_cpus)}"
    for n_clients, by_column in results.items():
        noun = "client" if n_clients == 1 else "clients"
        label = f"uuid pipelined, {n_clients} {noun}, metrics on / --no-metrics"
        out.raw[label] = by_column
        count = len(by_column["tw"])
        out.add(
            f"{label}: calls/s (median of {count}, {pairs} worker pairs{where})", "1/s",
            {c: statistics.median(r["calls_per_s"] for r in rs) for c, rs in by_column.items()},
            "higher", target=ratio_at_least(0.95),
        )
        out.add(
            f"{label}: worker CPU per call (schedstat)", "us",
            {c: statistics.median(r["sched_seconds"] / r["calls"] for r in rs) * 1e6
             for c, rs in by_column.items()},
            "lower",
        )
    if instructions is not None:
        out.raw["callgrind instructions per call"] = instructions
        out.add(
            f"uuid pipelined, 1 client: worker instructions per call "
            f"(callgrind, {CALLGRIND_CALLS} calls)", "instr",
            instructions, "lower",
        )


async def _phase(workers: Dict[str, Worker], cfg, n_clients: int, rounds: int,
                 results: Dict[str, List]) -> None:
    """``rounds`` alternating rounds of ``n_clients`` pipelined clients per worker,
    on sockets of this phase only (one left unread through a long phase would miss
    the worker's pings and be dropped)."""
    socks: Dict[str, List] = {}
    try:
        for column, w in workers.items():
            socks[column] = [
                await w.session.ws_connect(w.http_base.replace("http", "ws") + "/",
                                           max_msg_size=0)
                for _ in range(n_clients)
            ]
            for ws in socks[column]:  # each speaks once, so it is a listening client
                await _pipelined(ws, 1, 1)
            await asyncio.gather(  # warm-up, not measured
                *(_pipelined(ws, cfg.pipe_warmup, cfg.pipe_depth) for ws in socks[column])
            )
        per_client = cfg.pipe_calls // n_clients
        for r in range(rounds):
            order = list(workers) if r % 2 == 0 else list(workers)[::-1]
            for column in order:
                results[column].append(await measure_pipelined(
                    workers[column], socks[column], per_client, cfg.pipe_depth
                ))
    finally:
        for column_socks in socks.values():
            for ws in column_socks:
                await ws.close()


async def _instructions(bench: Bench, cfg, cpus) -> Optional[Dict[str, float]]:
    """Instructions each variant executes per pipelined ``uuid`` call on one client,
    counted by callgrind from warm to done; None without valgrind."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        return None
    per_call = {}
    for column, (name, options) in VARIANTS.items():
        base = bench.run_dir / "metrics_cost" / f"callgrind-{name}"
        out_file, vgdb = base / "callgrind.out", f"--vgdb-prefix={base / 'vgdb'}"
        base.mkdir(parents=True, exist_ok=True)
        w = Worker(
            "tw", base, {**bench.env, "PYTHONHASHSEED": "0"}, [*cfg.tw_options, *options],
            prefix=("valgrind", "--tool=callgrind", "--instr-atstart=no", vgdb,
                    f"--callgrind-out-file={out_file}"),
            cpus=cpus,
        )
        try:
            w.spawn()
            await w.wait_listening(timeout=300)
            await w.ready()
            ws = await w.session.ws_connect(w.http_base.replace("http", "ws") + "/",
                                            max_msg_size=0, heartbeat=None)
            await _pipelined(ws, CALLGRIND_CALLS, cfg.pipe_depth)
            await _callgrind_control(vgdb, "--instr=on", w.pid)
            await _pipelined(ws, CALLGRIND_CALLS, cfg.pipe_depth)
            await _callgrind_control(vgdb, "--instr=off", w.pid)
            await _callgrind_control(vgdb, "--dump", w.pid)
            await ws.close()
        finally:
            await w.stop()
        # The dump, and what the exit wrote after it (nothing is counted by then).
        total = sum(_totals(path) for path in base.glob("callgrind.out*"))
        if not total:
            raise RuntimeError(f"callgrind counted nothing; see {base}")
        per_call[column] = total / CALLGRIND_CALLS
    return per_call


async def _callgrind_control(vgdb: str, option: str, pid: int) -> None:
    process = await asyncio.create_subprocess_exec(
        "callgrind_control", vgdb, option, str(pid),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    if await process.wait() != 0:
        raise RuntimeError(f"callgrind_control {vgdb} {option} {pid} failed")


def _totals(path) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1])
    return 0


def split_cpus():
    """(the figure's workers' CPUs, the bench's), or (None, None) on one CPU."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None, None
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


@contextmanager
def running_on(cpus):
    """The bench's event loop thread on ``cpus`` (None: where it was)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
