"""Profile one worker under one of the bench's workloads with py-spy.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile pipeline            # funcnodes_tw, 10 s
    .venv/bin/python -m bench.profile chain0 --side ref   # the reference, for comparison
    .venv/bin/python -m bench.profile full_state --seconds 20 --out /tmp/prof

Starts one worker the way the bench does (own config and data folders), sets the
workload up, then runs it in a loop while ``py-spy record --function`` samples the
worker (idle samples left out). Prints the main (reactor) thread's functions with
the most samples on top of the stack (self) and anywhere on it (cumulative), as %
of its samples, plus how busy it was (samples / (rate x seconds)); other threads
only as a total. The raw
collapsed stacks stay in ``--out`` (``<workload>-<side>.txt``); ``--speedscope`` also
records a speedscope JSON (a second run of the workload; open on speedscope.app).

Workloads (the bench figure they profile):

* ``pipeline``: one client keeping 64 ``uuid`` commands in flight (``pipeline``).
* ``pipeline8``: eight such clients (``pipeline``).
* ``chain0``: a 50-node ``add_node`` chain at pretrigger delay 0, a new value every
  round, 1 client (``chain0``).
* ``chain0x20``: the same with 20 clients connected (``chain0``).
* ``full_state``: ``full_state`` with a 200-node graph, one call after the other
  (``full_state``).
* ``rpc``: ``uuid``, one call at a time (``rpc``).
* ``large``: ``get_io_full_value`` of a 20 MB string, answered with a
  ``large_message`` hint and fetched with ``GET /message/<id>`` (``large``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import DELAY_VAR, _pipelined, big_string, build_chain, run_chain  # noqa: E402
from bench.harness import MB, ROOT, Worker  # noqa: E402

WORKLOADS = ("pipeline", "pipeline8", "chain0", "chain0x20", "full_state", "rpc", "large")


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    return found


async def setup(name: str, w: Worker):
    """Prepare the workload; return an ``async def step()`` that runs one unit of it."""
    if name.startswith("pipeline"):
        n = 8 if name == "pipeline8" else 1
        socks = [await w.session.ws_connect(f"ws://127.0.0.1:{w.port}/", max_msg_size=0)
                 for _ in range(n)]
        for ws in socks:
            await _pipelined(ws, 1, 1)

        async def step():
            await asyncio.gather(*(_pipelined(ws, 2000 // n, 64) for ws in socks))

        return step
    if name.startswith("chain0"):
        # One chain, as in the bench. funcnodes-core leaves every round's DataPaths
        # attached to the ``b`` inputs (set once; funcnodes_tw.corefixes works around
        # it, the reference does not), so the reference's rounds get slower the more
        # it ran: profile a few hundred rounds at most (the bench runs ~15).
        ids = await build_chain(w, 50)
        clients = [w.client]
        if name == "chain0x20":
            clients += await w.connect_listening(19)
        counter = iter(range(10**9))

        async def step():
            value = next(counter) + 0.25
            await run_chain(w, clients, ids[0], ids[-1], value, value + len(ids))

        return step
    if name == "rpc":
        async def step():
            for _ in range(100):
                await w.client.call("uuid")

        return step
    if name == "large":
        nid = (await w.client.call("add_node", id="input.str"))["id"]
        await w.post_command("set_io_value", nid=nid, ioid="input", value=big_string(20 * MB))
        await asyncio.sleep(1.0)

        async def step():
            await w.client.call_large("get_io_full_value", nid=nid, ioid="input")

        return step
    if name == "full_state":
        ids = await build_chain(w, 200)
        await run_chain(w, [w.client], ids[0], ids[-1], 0.5, 200.5, timeout=120)

        async def step():
            await w.client.call_auto("full_state")

        return step
    raise ValueError(name)


async def profile(args, out_dir: Path) -> Tuple[Path, float, int]:
    run_dir = Path(tempfile.mkdtemp(prefix="funcnodes-profile-"))
    env = dict(os.environ)
    if args.workload.startswith("chain0"):
        env[DELAY_VAR] = "0"
    w = Worker(args.side, run_dir, env)
    steps = 0
    try:
        await w.start()
        step = await setup(args.workload, w)
        for _ in range(3):  # warm-up
            await step()
        outputs = [("raw", out_dir / f"{args.workload}-{args.side}.txt")]
        if args.speedscope:
            outputs.append(("speedscope", out_dir / f"{args.workload}-{args.side}.speedscope.json"))
        for fmt, path in outputs:
            cmd = [py_spy(), "record", "--pid", str(w.pid), "--rate", str(args.rate),
                   "--duration", str(max(1, round(args.seconds))), "--function",
                   "--format", fmt, "--output", str(path)]
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            t0 = time.perf_counter()
            while spy.poll() is None:
                await step()
                steps += fmt == "raw"
            if fmt == "raw":
                elapsed = time.perf_counter() - t0
            if spy.returncode != 0:
                raise SystemExit(f"py-spy failed: {spy.stderr.read().decode()[-2000:]}")
        return outputs[0][1], elapsed, steps
    finally:
        await w.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def short(frame: str) -> str:
    """``func (path:line)`` with the path relative to the repo or site-packages."""
    for prefix in (str(ROOT) + "/", "site-packages/", "lib/python3."):
        i = frame.find(prefix)
        if i >= 0:
            rest = frame[i + len(prefix):]
            if prefix == "lib/python3.":
                rest = "stdlib/" + rest.split("/", 1)[-1]
            return frame[: frame.index("(") + 1] + rest if "(" in frame else rest
    return frame


def summarise(path: Path, rate: int, seconds: float, top: int) -> str:
    """Top functions of the main (reactor) thread; other threads only as a total."""
    self_counts: Dict[str, int] = collections.Counter()
    cumulative: Dict[str, int] = collections.Counter()
    others: Dict[str, int] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames: List[str] = [short(f) for f in stack.split(";")]
        if not frames[0].startswith("_run_module_as_main"):  # a thread, not the reactor
            others[frames[-1]] += n
            continue
        total += n
        self_counts[frames[-1]] += n
        for frame in set(frames):
            cumulative[frame] += n
    lines = [f"main thread: {total} samples at {rate} Hz over {seconds:.1f} s, busy "
             f"~{100 * total / (rate * seconds):.0f} % of the time"]
    if others:
        leaf, n = others.most_common(1)[0]
        lines.append(f"other threads: {sum(others.values())} samples (mostly {leaf}: {n})")
    roots = [f for f, n in cumulative.items() if n >= 0.99 * total]
    for f in roots:  # the reactor's frames, on (nearly) every stack
        del cumulative[f]
    for title, counter in (("self", self_counts), ("cumulative", cumulative)):
        lines.append(f"\ntop {top} by {title} samples (% of the main thread's samples):")
        for frame, n in counter.most_common(top):
            lines.append(f"  {100 * n / max(total, 1):5.1f} %  {frame}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--side", choices=("tw", "ref"), default="tw")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=".", help="folder for the py-spy output")
    parser.add_argument("--speedscope", action="store_true", help="also record speedscope JSON")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, elapsed, steps = asyncio.run(profile(args, out_dir))
    print(f"{args.workload} on {args.side}: {steps} steps in {elapsed:.1f} s; stacks in {raw}")
    print(summarise(raw, args.rate, elapsed, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
