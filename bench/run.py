"""Benchmark funcnodes_tw against the reference worker, side by side.

    .venv/bin/python -m bench                 # every figure, full sizes
    .venv/bin/python -m bench --quick         # tiny sizes, a smoke run (< 30 s)
    .venv/bin/python -m bench --only upload --big --json results.json

Each figure starts both workers afresh (same environment, own config and data
folders under a temporary run directory), measures, and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import datetime
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import FIGURES, Recorder  # noqa: E402
from bench.harness import Bench, kill_all  # noqa: E402
from bench.report import git_state, results_document, write_json, write_table  # noqa: E402


@dataclasses.dataclass
class Config:
    upload_mb: int = 200
    upload_rounds: int = 3
    big: bool = False
    big_upload_mb: int = 1000
    large_mb: int = 20
    large_fetches: int = 10
    large2_mb: int = 50
    large2_fetches: int = 3
    large_waits: tuple = (10.0,)
    rpc_calls: int = 1000
    rpc_rounds: int = 4
    rpc_warmup: int = 100
    settle: float = 1.0
    sample_interval: float = 0.02
    quick: bool = False
    full: bool = False
    worker_env: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_args(cls, args) -> "Config":
        cfg = cls(big=args.big, quick=args.quick, full=args.full)
        cfg.worker_env = dict(item.split("=", 1) for item in args.env)
        if args.full:
            # 60 s: the goal; 75 s: after the reference's 60-65 s message expiry.
            cfg.large_waits = (60.0, 75.0)
        if args.quick:
            cfg.upload_mb, cfg.upload_rounds, cfg.big_upload_mb = 5, 1, 20
            cfg.large_mb, cfg.large_fetches, cfg.large2_mb, cfg.large2_fetches = 2, 3, 3, 1
            cfg.large_waits = (1.0,)
            cfg.rpc_calls, cfg.rpc_rounds, cfg.rpc_warmup = 100, 2, 10
            cfg.settle = 0.2
        return cfg


def parse_args(argv=None):
    names = [f.name for f in FIGURES]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark funcnodes_tw against the reference worker (funcnodes-worker 1.6.0).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in < 30 s")
    parser.add_argument(
        "--full", action="store_true",
        help="watch RSS 60 s and 75 s (not 10 s) after the large-message fetches",
    )
    parser.add_argument("--big", action="store_true", help="also upload a 1 GB file")
    parser.add_argument(
        "--only", action="append", metavar="NAME",
        help=f"run only this figure (repeatable or comma-separated): {', '.join(names)}",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="set an environment variable for both workers (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directory (worker logs)")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    args = parser.parse_args(argv)
    if args.only:
        wanted = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        args.only = wanted
    for item in args.env:
        if "=" not in item or item.startswith("="):
            parser.error(f"--env takes NAME=VALUE, not {item!r}")
    return args


async def run_figures(selected, cfg: Config, run_dir: Path, log) -> list:
    recorders = []
    for fig in selected:
        rec = Recorder(fig.name, fig.title)
        log(f"[bench] {fig.name}: {fig.title} ...")
        bench = Bench(run_dir, cfg, env={**os.environ, **cfg.worker_env})
        t0 = time.perf_counter()
        try:
            await bench.start(fig.name)
            await fig.run(bench, cfg, rec)
        except Exception as exc:  # one failed figure does not stop the others
            rec.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log(traceback.format_exc())
        finally:
            await bench.stop()
        rec.seconds = time.perf_counter() - t0
        log(f"[bench] {fig.name}: {rec.seconds:.1f} s")
        recorders.append(rec)
    return recorders


def log(text: str) -> None:
    """Progress and errors go to stderr; stdout carries only the table."""
    sys.stderr.write(text.rstrip() + "\n")
    sys.stderr.flush()


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for fig in FIGURES:
            sys.stdout.write(f"{fig.name:10} {fig.title}\n")
        return 0
    selected = [f for f in FIGURES if not args.only or f.name in args.only]
    cfg = Config.from_args(args)
    started = datetime.datetime.now().astimezone()
    git = git_state()  # at the start: the code the workers were started from
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"[bench] warning: load average {load_before[0]:.2f}; other work skews the figures")

    run_dir = Path(tempfile.mkdtemp(prefix="funcnodes-bench-"))
    atexit.register(kill_all)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        recorders = asyncio.run(run_figures(selected, cfg, run_dir, log))
    except KeyboardInterrupt:
        log("[bench] interrupted; workers stopped")
        return 130
    finally:
        kill_all()
        if args.keep:
            log(f"[bench] run directory kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    mode = "quick" if cfg.quick else ("full" if cfg.full else "default")
    load = "/".join(f"{x:.2f}" for x in load_before)
    code = ""
    if git["commit"]:
        code = f"funcnodes_tw {git['commit']}{'+dirty' if git['dirty'] else ''}"
    sys.stdout.write(
        f"\nfuncnodes_tw vs reference ({mode} mode, {started:%Y-%m-%d %H:%M}, "
        f"{os.cpu_count()} CPUs, load {load} at start{', ' + code if code else ''})\n\n"
    )
    write_table(recorders, sys.stdout)
    if args.json:
        document = results_document(recorders, dataclasses.asdict(cfg), started)
        document["machine"]["loadavg_at_start"] = list(load_before)
        document["git"] = git
        write_json(args.json, document)
        log(f"[bench] results written to {args.json}")
    return 1 if any(rec.error for rec in recorders) else 0


if __name__ == "__main__":
    sys.exit(main())
