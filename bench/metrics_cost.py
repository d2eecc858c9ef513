"""The ``metrics_cost`` figure: what counting for ``GET /metrics`` costs the hot path.

The figure starts two funcnodes_tw workers of the same build itself: one as usual
(metrics on) and one with ``--no-metrics``. Both get the ``pipeline`` figure's workload
(``uuid`` commands, 64 in flight per client, 1 client and then 8) in rounds that
alternate which worker goes first, so slow drift from other load on the machine falls
on both alike. The pair the harness started sits idle.

The table shows the worker with metrics in the funcnodes_tw column and the one without
in the reference column, so the ratio is on / off. The goal (issue 13): throughput with
metrics within 5 % of the same build without, ``>= 0.95x``. The JSON has every round.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Dict, List

from bench.figures import Recorder, _pipelined, figure, measure_pipelined, ratio_at_least
from bench.harness import Bench, Worker

#: The figure's two workers: its table columns (tw, ref) and their extra options.
VARIANTS = {"tw": ("on", ()), "ref": ("off", ("--no-metrics",))}


@figure("metrics_cost", "pipelined `uuid` throughput of funcnodes_tw with metrics on vs --no-metrics")
async def metrics_cost(bench: Bench, cfg, out: Recorder):
    workers = {
        column: Worker("tw", bench.run_dir / "metrics_cost" / name, bench.env,
                       [*cfg.tw_options, *options])
        for column, (name, options) in VARIANTS.items()
    }
    socks: Dict[str, List] = {column: [] for column in VARIANTS}
    try:
        await asyncio.gather(*(w.start() for w in workers.values()))
        rounds = 11 * cfg.pipe_rounds  # a 5 % difference needs many: rounds vary by ~10 % here
        for n_clients in cfg.pipe_clients:
            # Sockets of this phase only: one left unread through a long phase
            # would miss the worker's pings and be dropped.
            for column, w in workers.items():
                for ws in socks[column]:
                    await ws.close()
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
            results: Dict[str, List] = {column: [] for column in VARIANTS}
            for r in range(rounds):
                order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
                for column in order:
                    results[column].append(await measure_pipelined(
                        workers[column], socks[column], per_client, cfg.pipe_depth
                    ))
            noun = "client" if n_clients == 1 else "clients"
            label = f"uuid pipelined, {n_clients} {noun}, metrics on / --no-metrics"
            out.raw[label] = results
            out.add(
                f"{label}: calls/s (median of {rounds})", "1/s",
                {c: statistics.median(r["calls_per_s"] for r in rs) for c, rs in results.items()},
                "higher", target=ratio_at_least(0.95),
            )
            out.add(
                f"{label}: worker CPU per call", "us",
                {c: statistics.median(r["cpu_seconds"] / r["calls"] for r in rs) * 1e6
                 for c, rs in results.items()},
                "lower",
            )
    finally:
        for column_socks in socks.values():
            for ws in column_socks:
                await ws.close()
        await asyncio.gather(*(w.stop() for w in workers.values()), return_exceptions=True)
        for w in workers.values():
            w.kill()
