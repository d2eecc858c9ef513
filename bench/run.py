"""Benchmark funcnodes_tw against the reference worker, side by side.

    .venv/bin/python -m bench                 # every figure, full sizes
    .venv/bin/python -m bench --quick         # tiny sizes, a smoke run (< 40 s)
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
from bench.report import (  # noqa: E402
    git_state, results_document, write_json, write_markdown, write_table,
)


@dataclasses.dataclass
class Config:
    upload_sizes: tuple = (100, 200)  # MB; the goals are for the first
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
    pipe_calls: int = 20_000  # replies per round, shared by the clients
    pipe_depth: int = 64  # commands in flight per client
    pipe_clients: tuple = (1, 8)
    pipe_rounds: int = 3
    pipe_warmup: int = 500  # per client
    chain_nodes: int = 50
    chain_clients: int = 20
    chain_rounds: int = 7
    state_nodes: tuple = (50, 200)
    state_calls: int = 21
    idle_seconds: float = 10.0
    idle_clients: int = 20
    startup_rounds: int = 3
    startup_idle: float = 5.0
    share_workers: bool = False
    settle: float = 1.0
    sample_interval: float = 0.02
    quick: bool = False
    full: bool = False
    worker_env: dict = dataclasses.field(default_factory=dict)
    tw_options: list = dataclasses.field(default_factory=list)

    @classmethod
    def from_args(cls, args) -> "Config":
        cfg = cls(big=args.big, quick=args.quick, full=args.full,
                  share_workers=args.quick or args.share_workers)
        cfg.worker_env = dict(item.split("=", 1) for item in args.env)
        cfg.tw_options = list(args.tw_option)
        if args.full:
            # 60 s: the goal; 75 s: after the reference's 60-65 s message expiry.
            cfg.large_waits = (60.0, 75.0)
            cfg.idle_seconds = 30.0
        if args.quick:
            cfg.upload_sizes, cfg.upload_rounds, cfg.big_upload_mb = (5,), 1, 20
            cfg.large_mb, cfg.large_fetches, cfg.large2_mb, cfg.large2_fetches = 2, 3, 3, 1
            cfg.large_waits = (1.0,)
            cfg.rpc_calls, cfg.rpc_rounds, cfg.rpc_warmup = 100, 2, 10
            cfg.pipe_calls, cfg.pipe_rounds, cfg.pipe_warmup = 2000, 1, 50
            cfg.chain_nodes, cfg.chain_clients, cfg.chain_rounds = 10, 4, 2
            cfg.state_nodes, cfg.state_calls = (10, 30), 3
            cfg.idle_seconds, cfg.idle_clients = 2.0, 4
            cfg.startup_rounds, cfg.startup_idle = 1, 1.0
            cfg.settle = 0.2
        return cfg


def parse_args(argv=None):
    names = [f.name for f in FIGURES]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark funcnodes_tw against the reference worker (funcnodes-worker 1.6.0).",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes and shared workers: a smoke run in < 40 s",
    )
    parser.add_argument(
        "--full", action="store_true",
        help="watch RSS 60 s and 75 s (not 10 s) after the large-message fetches; "
             "idle CPU over 30 s (not 10 s)",
    )
    parser.add_argument("--big", action="store_true", help="also upload a 1 GB file")
    parser.add_argument(
        "--only", action="append", metavar="NAME",
        help=f"run only this figure (repeatable or comma-separated): {', '.join(names)}",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--markdown", metavar="PATH", help="also write the table as Markdown here (for docs)"
    )
    parser.add_argument(
        "--share-workers", action="store_true",
        help="one pair of workers for consecutive figures with the same environment "
             "(cleared between figures; implied by --quick)",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="set an environment variable for both workers (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument(
        "--tw-option", action="append", default=[], metavar="OPTION",
        help="an extra command-line option for funcnodes_tw only (repeatable), e.g. --tw-option=--uvloop",
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


def figure_env(fig, cfg: Config) -> dict:
    """The workers' environment for ``fig``: ours, ``--env``, then the figure's own."""
    env = {**os.environ, **cfg.worker_env}
    for name, value in fig.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


async def run_figures(selected, cfg: Config, run_dir: Path, log) -> list:
    """Run each figure with two fresh workers; with ``share_workers`` consecutive
    figures with the same environment use the same pair (``Bench.reset`` between)."""
    recorders = []
    bench = None
    envs = {fig.name: figure_env(fig, cfg) for fig in selected}
    order = list(selected)
    if cfg.share_workers:
        # Figures with the same environment one after another (fewer worker starts);
        # the results keep the figures' own order.
        keys = []
        for fig in selected:
            key = sorted(envs[fig.name].items())
            if key not in keys:
                keys.append(key)
        order.sort(key=lambda fig: keys.index(sorted(envs[fig.name].items())))
    try:
        for fig in order:
            rec = Recorder(fig.name, fig.title)
            log(f"[bench] {fig.name}: {fig.title} ...")
            env = envs[fig.name]
            if bench is not None and (not cfg.share_workers or bench.env != env):
                await bench.stop()
                bench = None
            t0 = time.perf_counter()
            try:
                if bench is None:
                    bench = Bench(run_dir, cfg, env=env)
                    await bench.start(fig.name)
                else:
                    await bench.reset()
                await fig.run(bench, cfg, rec)
            except Exception as exc:  # one failed figure does not stop the others
                rec.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log(traceback.format_exc())
                if bench is not None:
                    await bench.stop()
                    bench = None
            if not cfg.share_workers and bench is not None:
                await bench.stop()
                bench = None
            rec.seconds = time.perf_counter() - t0
            log(f"[bench] {fig.name}: {rec.seconds:.1f} s")
            recorders.append(rec)
    finally:
        if bench is not None:
            await bench.stop()
    position = {fig.name: i for i, fig in enumerate(selected)}
    return sorted(recorders, key=lambda rec: position[rec.name])


def log(text: str) -> None:
    """Progress and errors go to stderr; stdout carries only the table."""
    sys.stderr.write(text.rstrip() + "\n")
    sys.stderr.flush()


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        width = max(len(fig.name) for fig in FIGURES)
        for fig in FIGURES:
            sys.stdout.write(f"{fig.name:{width}} {fig.title}\n")
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
    if cfg.tw_options:
        code = " ".join([code, *cfg.tw_options]).strip()
    sys.stdout.write(
        f"\nfuncnodes_tw vs reference ({mode} mode, {started:%Y-%m-%d %H:%M}, "
        f"{os.cpu_count()} CPUs, load {load} at start{', ' + code if code else ''})\n\n"
    )
    write_table(recorders, sys.stdout)
    if args.markdown:
        with open(args.markdown, "w") as f:
            write_markdown(recorders, f)
        log(f"[bench] Markdown table written to {args.markdown}")
    if args.json:
        document = results_document(recorders, dataclasses.asdict(cfg), started)
        document["machine"]["loadavg_at_start"] = list(load_before)
        document["git"] = git
        write_json(args.json, document)
        log(f"[bench] results written to {args.json}")
    return 1 if any(rec.error for rec in recorders) else 0


if __name__ == "__main__":
    sys.exit(main())
