"""The ``startup`` figure: how long a fresh worker takes to listen, and its idle RSS.

Per round each side gets a new worker process of its own (fresh config and data
folders), started one after the other, never both at once, so neither competes with
the other for the two cores; the order alternates between rounds.

* *startup to listening*: from ``Popen`` to the first accepted TCP connection on the
  worker's port (polled every 10 ms).
* *RSS at idle*: ``VmRSS`` after the bench's client connected, sent ``uuid`` and (the
  reference) added funcnodes-basic, so both hold the same library, then
  ``cfg.startup_idle`` seconds (5 s; ``--quick``: 1 s) of nothing.
* *first upload* / *second upload*: ``POST /upload/`` of a 1 kB file right after that;
  funcnodes_tw imports its multipart parser at the first upload, so the first one
  shows what deferring that import costs.

Both are medians over ``cfg.startup_rounds`` rounds; the JSON has every round.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench.figures import BOUNDARY, Recorder, figure, mb, ratio_at_most
from bench.harness import Bench, Worker

POLL = 0.01
UPLOAD = (
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="file"; filename="first.bin"\r\n'
    "Content-Type: application/octet-stream\r\n\r\n"
).encode() + bytes(1000) + f"\r\n--{BOUNDARY}--\r\n".encode()


async def _upload_seconds(w: Worker) -> float:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    t0 = time.perf_counter()
    status, reply = await w.post("/upload/", UPLOAD, headers=headers)
    seconds = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"{w.title}: upload -> {status} {reply[:200]!r}")
    return seconds


async def _one_start(bench: Bench, side: str, round_no: int) -> dict:
    options = bench.config.tw_options if side == "tw" else ()
    w = Worker(side, bench.run_dir / "startup" / f"round{round_no}", bench.env, options)
    try:
        t0 = time.perf_counter()
        w.spawn()
        await w.wait_listening(poll=POLL)
        listening = time.perf_counter() - t0
        await w.ready()
        await asyncio.sleep(bench.config.startup_idle)
        rss = w.rss()
        first = await _upload_seconds(w)
        second = await _upload_seconds(w)
        return {"listening_s": listening, "rss": rss, "upload1_s": first, "upload2_s": second}
    finally:
        await w.stop()


@figure("startup", "startup to listening and RSS at idle of a fresh worker")
async def startup(bench: Bench, cfg, out: Recorder):
    # The figure starts workers of its own: the pair the harness started sits idle.
    results = await bench.alternate(
        cfg.startup_rounds, lambda w, r: _one_start(bench, w.side, r)
    )
    out.raw["rounds"] = results
    out.add(
        f"startup to listening (median of {cfg.startup_rounds})", "s",
        {s: statistics.median(r["listening_s"] for r in rs) for s, rs in results.items()},
        "lower", target=ratio_at_most(0.5),
    )
    out.add(
        f"RSS at idle ({cfg.startup_idle:g} s after the first client, median)", "MB",
        {s: mb(statistics.median(r["rss"] for r in rs)) for s, rs in results.items()},
        "lower", target=ratio_at_most(1.0),
    )
    for key, label in (("upload1_s", "first"), ("upload2_s", "second")):
        out.add(
            f"{label} upload of 1 kB after the idle wait (median)", "ms",
            {s: statistics.median(r[key] for r in rs) * 1e3 for s, rs in results.items()},
            "lower",
        )
