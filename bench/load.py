"""Many clients, many commands, one worker: does every command get exactly one answer,
does every client see every broadcast, and does the worker's memory stay bounded?

    .venv/bin/python -m bench.load                       # 50 clients x 2000 commands
    .venv/bin/python -m bench.load --clients 10 --commands 200 --json report.json

The controller (this module's ``main``) starts one funcnodes_tw worker
(``python -m funcnodes_tw``) and builds a small graph on it: for each *setter*
client a pair of ``add_node`` nodes, ``A.out -> B.a``, with ``b`` defaulting to 1.
Then it starts ``--drivers`` driver processes (``python -m bench.load --driver``),
each running its share of the clients on aiohttp with its own event loop, so the
clients do not all compete for one Python thread. The driver protocol is JSON lines
over the drivers' stdin/stdout:

    controller -> driver   {"port":..,"clients":[plans]}   (one line, the config)
    driver -> controller   {"event": "ready"}               every client connected and spoke
    controller -> driver   "go"
    driver -> controller   {"event": "done", ...}           every command answered (or not)
    controller -> driver   {"marker": "<nid>"}              after the graph has settled
    driver -> controller   {"event": "report", "clients": [...]}

Each client pipelines its commands (``--inflight`` at once, 16 by default) and
sends a ``ping`` every ``--ping-every`` commands. Setters send, in every block of
four commands, one ``set_io_value`` of their own node ``A.a`` (1, 2, 3, ...), so
value previews and trigger events are broadcast to every client; the others only
send cheap reads (``uuid``, ``get_io_value``, ``get_meta``, ``get_ios_values``).

When all drivers are done and the graph is final (``B.out`` of every pair read
back), the controller adds one more node: its ``node_added`` event is the last
broadcast, so once a client has it, it has everything before it. The checks:

* answers: every command id answered exactly once (no missing, duplicate or
  unknown ids), no error replies, ``set_io_value`` and ``uuid`` results right;
* events: every client saw the same number of each ``nsevent`` (text frames are
  never dropped or merged for a client that keeps up), one ``pong`` per ``ping``,
  and as the last preview of each setter's IOs the final value (``A.a == k``,
  ``A.out == k+1``, ``B.out == k+2``; previews of one IO may be merged while a
  client's socket is full, the newest one always stays);
* memory: the worker's ``VmRSS`` before, at its peak (sampled every 0.1 s) and
  after the clients left.

The report (``--json``) holds the figures and a ``problems`` list; the exit status
is 1 when there are problems. ``tests/test_load.py`` runs this and asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # `python bench/load.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from bench.harness import MB, RssSampler, Worker, cpu_seconds, hwm_bytes, kill_all  # noqa: E402

#: Commands of a setter, per block of four: ("set" is the set_io_value of its A.a).
SETTER_CYCLE = ("set", "uuid", "get_io_value", "get_ios_values")
READER_CYCLE = ("uuid", "get_io_value", "get_meta", "get_ios_values")


ROOT = Path(__file__).resolve().parent.parent


# -- the driver side ----------------------------------------------------------------------
def decode_preview(mime: str, payload: bytes):
    """The value of an ``io_value`` preview (funcnodes-core's ByteEncoder)."""
    if mime.startswith("application/fn.struct."):
        return struct.unpack(mime[len("application/fn.struct."):], payload)[0]
    if mime.startswith("application/json"):
        return json.loads(payload)
    return payload.decode("utf-8", "replace")


def binary_header(data: bytes) -> tuple:
    """``(header fields, payload offset)`` of a binary frame."""
    end = data.find(b"\r\n\r\n")
    header = {}
    for part in data[:max(end, 0)].decode("utf-8", "replace").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            header[key] = value
    return header, end + 4


class LoadClient:
    """One WebSocket client: pipelined commands, and a tally of what it received.

    ``plan`` says what to send: ``name`` (prefix of the message ids), ``inflight``,
    ``node_a`` (a setter's own node, None for readers), ``read_node`` (read by
    ``get_io_value``/``get_ios_values``) and ``watch`` (the ``node/io`` keys whose
    last preview is kept).
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, plan: Dict[str, Any],
                 worker_uuid: Optional[str] = None):
        self.ws = ws
        self.plan = plan
        self.worker_uuid = worker_uuid
        self.window = asyncio.Semaphore(plan.get("inflight", 16))
        self.outstanding: Dict[str, Any] = {}  # id -> expected result (... = any)
        self.answered_ids = set()
        self.sent = self.answered = self.duplicates = self.unknown = 0
        self.errors = self.wrong_results = 0
        self.error_samples: List[str] = []
        self.wrong_samples: List[str] = []
        self.pings = self.pongs = self.sets = 0
        self.events: Counter = Counter()
        self.io_counts: Counter = Counter()
        self.last: Dict[str, Any] = {}
        self.watch = set(plan.get("watch", ()))
        self.added_nodes = set()
        self.changed = asyncio.Event()  # something was answered, added, or closed
        self.sending_done = False
        self.closed = False
        self.close_code: Optional[int] = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    # receiving
    async def _read(self):
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._text(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._binary(msg.data)
        finally:
            self.closed = True
            self.close_code = self.ws.close_code
            self.changed.set()
            for _ in range(len(self.outstanding) + 1):  # wake a blocked sender
                self.window.release()

    def _text(self, data: str):
        message = orjson.loads(data)
        kind = message.get("type")
        if kind == "result" or kind == "error":
            self._answer(message, kind)
        elif kind == "nsevent":
            event = message.get("event")
            self.events[event] += 1
            if event == "node_added":
                node = (message.get("data") or {}).get("node") or {}
                self.added_nodes.add(node.get("id"))
                self.changed.set()
        elif kind == "pong":
            self.pongs += 1
        else:
            self.events[f"<{kind}>"] += 1

    def _answer(self, message: dict, kind: str):
        msgid = message.get("id")
        try:
            expected = self.outstanding.pop(msgid)
        except (KeyError, TypeError):
            if msgid in self.answered_ids:
                self.duplicates += 1
            else:
                self.unknown += 1
            return
        self.answered_ids.add(msgid)
        self.answered += 1
        if kind == "error":
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(f"{msgid}: {str(message.get('error'))[:300]}")
        elif expected is not ... and message.get("result") != expected:
            self.wrong_results += 1
            if len(self.wrong_samples) < 5:
                self.wrong_samples.append(f"{msgid}: {message.get('result')!r} != {expected!r}")
        self.window.release()
        if not self.outstanding:
            self.changed.set()

    def _binary(self, data: bytes):
        header, at = binary_header(data)
        if header.get("type") != "io_value":
            self.events[f"<binary {header.get('type')}>"] += 1
            return
        self.io_counts["*"] += 1
        key = f"{header.get('node')}/{header.get('io')}"
        if key in self.watch:
            self.io_counts[key] += 1
            self.last[key] = decode_preview(header.get("mime", ""), data[at:])

    async def _until(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.closed:
                return condition()
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return condition()
        return True

    # sending
    async def send(self, msgid: str, cmd: str, kwargs: dict, expected: Any = ...):
        self.outstanding[msgid] = expected
        self.sent += 1
        await self.ws.send_str(
            orjson.dumps({"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": msgid}).decode()
        )

    async def call(self, msgid: str, cmd: str, kwargs: dict, timeout: float = 60.0) -> bool:
        """Send one command and wait for its answer (not pipelined)."""
        await self.window.acquire()
        await self.send(msgid, cmd, kwargs)
        return await self._until(lambda: msgid not in self.outstanding, timeout)

    async def ping(self):
        self.pings += 1
        await self.ws.send_str('{"type": "ping"}')

    async def run(self, commands: int, ping_every: int = 0, timeout: float = 300.0) -> float:
        """Send ``commands`` commands of the plan, pipelined; wait for every answer."""
        plan = self.plan
        cycle = SETTER_CYCLE if plan.get("node_a") else READER_CYCLE
        t0 = time.perf_counter()
        for i in range(commands):
            await self.window.acquire()
            if self.closed:
                break
            step = cycle[i % len(cycle)]
            msgid = f"{plan['name']}-{i}"
            if step == "set":
                self.sets += 1
                kwargs = {"nid": plan["node_a"], "ioid": "a", "value": self.sets}
                await self.send(msgid, "set_io_value", kwargs, self.sets)
            elif step == "uuid":
                await self.send(msgid, "uuid", {}, self.worker_uuid or ...)
            elif step == "get_io_value":
                await self.send(msgid, "get_io_value", {"nid": plan["read_node"], "ioid": "out"})
            elif step == "get_ios_values":
                await self.send(msgid, "get_ios_values", {"nid": plan["read_node"]})
            else:
                await self.send(msgid, step, {})
            if ping_every and i % ping_every == 0:
                await self.ping()
        self.sending_done = True
        await self._until(lambda: not self.outstanding, timeout)
        return time.perf_counter() - t0

    async def wait_marker(self, marker: str, timeout: float = 60.0) -> bool:
        return await self._until(lambda: marker in self.added_nodes, timeout)

    def report(self) -> Dict[str, Any]:
        return {
            "name": self.plan["name"],
            "setter": bool(self.plan.get("node_a")),
            "sent": self.sent,
            "answered": self.answered,
            "missing": len(self.outstanding),
            "duplicates": self.duplicates,
            "unknown": self.unknown,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "wrong_results": self.wrong_results,
            "wrong_samples": self.wrong_samples,
            "sets": self.sets,
            "pings": self.pings,
            "pongs": self.pongs,
            "events": dict(self.events),
            "io_counts": dict(self.io_counts),
            "last": self.last,
            "close_code": self.close_code if self.closed else None,
        }


async def _stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _emit(obj: dict):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def driver_main() -> int:
    """One driver process: its clients, told what to do over stdin (module docstring)."""
    config = json.loads(await _stdin_line())
    url = f"ws://127.0.0.1:{config['port']}/"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        clients: List[LoadClient] = []
        for plan in config["clients"]:
            ws = await session.ws_connect(url, max_msg_size=0, autoping=True, heartbeat=None)
            clients.append(LoadClient(ws, plan, config.get("worker_uuid")))
        # A first command makes the worker send this client its broadcasts.
        hello = await asyncio.gather(*(c.call(f"{c.plan['name']}-hello", "uuid", {})
                                       for c in clients))
        if not all(hello):
            _emit({"event": "failed", "why": "a client got no answer to its first uuid"})
            return 1
        for c in clients:  # the hello does not count
            c.sent -= 1
            c.answered -= 1
        _emit({"event": "ready"})
        if (await _stdin_line()).strip() != "go":
            return 2
        t0 = time.perf_counter()
        await asyncio.gather(*(
            c.run(config["commands"], config.get("ping_every", 0), config.get("timeout", 300))
            for c in clients
        ))
        _emit({"event": "done", "seconds": time.perf_counter() - t0})
        line = (await _stdin_line()).strip()
        marker = json.loads(line).get("marker") if line else None
        seen = await asyncio.gather(*(c.wait_marker(marker) for c in clients)) if marker else []
        reports = [c.report() for c in clients]
        for report, ok in zip(reports, seen):
            report["marker_seen"] = ok
        _emit({"event": "report", "clients": reports})
        await asyncio.gather(*(c.ws.close() for c in clients), return_exceptions=True)
        for c in clients:
            c.reader.cancel()
    return 0


# -- the controller -----------------------------------------------------------------------
class Driver:
    """A driver subprocess and its JSON-lines conversation."""

    def __init__(self, index: int, run_dir: Path):
        self.index = index
        self.stderr_path = run_dir / f"driver{index}.stderr.log"
        self.proc: Optional[asyncio.subprocess.Process] = None

    async def start(self, config: dict):
        with open(self.stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.load", "--driver",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                cwd=str(ROOT), limit=64 * 1024 * 1024,
            )
        self.write(json.dumps(config))

    def write(self, line: str):
        self.proc.stdin.write(line.encode() + b"\n")

    async def read(self, timeout: float) -> dict:
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"driver {self.index} ended early:\n{self.stderr_tail()}")
        return json.loads(line)

    async def expect(self, event: str, timeout: float) -> dict:
        message = await self.read(timeout)
        if message.get("event") != event:
            raise RuntimeError(f"driver {self.index}: expected {event}, got {message}\n"
                               f"{self.stderr_tail()}")
        return message

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def finish(self, timeout: float = 30.0):
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self.proc.stdin.close()
        except Exception:
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def build_pairs(client, n: int) -> List[tuple]:
    """``n`` pairs of ``add_node`` nodes, ``A.out -> B.a``, ``b`` defaulting to 1."""
    pairs = []
    for _ in range(n):
        a = (await client.call("add_node", id="add_node"))["id"]
        b = (await client.call("add_node", id="add_node"))["id"]
        for nid in (a, b):
            await client.call("set_default_value", nid=nid, ioid="b", value=1)
        await client.call("add_edge", src_nid=a, src_ioid="out", trg_nid=b, trg_ioid="a")
        pairs.append((a, b))
    return pairs


def sets_for(commands: int) -> int:
    """How many ``set_io_value`` a setter sends among ``commands`` commands."""
    return sum(1 for i in range(commands) if SETTER_CYCLE[i % len(SETTER_CYCLE)] == "set")


def log_problems(path: Path) -> List[str]:
    """Lines of the worker's log at level error/critical, and tracebacks."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    markers = ("#error]", "#critical]", "Traceback", "Unhandled")
    return [line for line in text.splitlines() if any(m in line for m in markers)]


async def run_load(clients: int = 50, commands: int = 2000, setters: int = 10,
                   drivers: int = 2, inflight: int = 16, ping_every: int = 100,
                   timeout: float = 600.0, keep: bool = False,
                   log=lambda text: None) -> Dict[str, Any]:
    """Run the whole scenario (module docstring); return the report."""
    run_dir = Path(tempfile.mkdtemp(prefix="fn-load-"))
    worker = Worker("tw", run_dir, dict(os.environ))
    drivers = max(1, min(drivers, clients))
    setters = min(setters, clients)
    team = [Driver(i, run_dir) for i in range(drivers)]
    report: Dict[str, Any] = {
        "clients": clients, "commands_per_client": commands, "setters": setters,
        "drivers": drivers, "inflight": inflight, "ping_every": ping_every,
        "run_dir": str(run_dir),
    }
    problems: List[str] = []
    report["problems"] = problems
    try:
        await worker.start()
        control = worker.client
        worker_uuid = await control.call("uuid")
        pairs = await build_pairs(control, max(setters, 1))
        await asyncio.sleep(1.0)  # setup events pass before the clients listen
        watch = [f"{a}/{io}" for a, b in pairs for a, io in ((a, "a"), (a, "out"))]
        watch += [f"{b}/{io}" for a, b in pairs for io in ("a", "out")]
        plans = [
            {
                "name": f"c{i}",
                "inflight": inflight,
                "node_a": pairs[i][0] if i < setters else None,
                "read_node": pairs[i % len(pairs)][1],
                "watch": watch,
            }
            for i in range(clients)
        ]
        log(f"worker pid {worker.pid} on port {worker.port}; {len(pairs)} node pairs; "
            f"starting {drivers} drivers")
        for d in team:
            await d.start({
                "port": worker.port, "worker_uuid": worker_uuid, "commands": commands,
                "ping_every": ping_every, "timeout": timeout,
                "clients": plans[d.index::drivers],
            })
        for d in team:
            await d.expect("ready", 120)
        rss_before = worker.rss()
        cpu_before = cpu_seconds(worker.pid)
        log(f"{clients} clients ready; RSS {rss_before / MB:.1f} MB; go")
        with RssSampler([worker.pid], interval=0.1) as sampler:
            t0 = time.perf_counter()
            for d in team:
                d.write("go")
            done = [await d.expect("done", timeout + 60) for d in team]
            seconds = time.perf_counter() - t0
            cpu_after = cpu_seconds(worker.pid)
            log(f"all commands sent and answered in {seconds:.1f} s; settling")
            # The graph is final once every B.out has its last value.
            expected_sets = sets_for(commands)
            settle_deadline = time.monotonic() + 60
            for a, b in pairs[:setters]:
                while True:
                    value = await control.call("get_io_value", nid=b, ioid="out")
                    if value == expected_sets + 2 or time.monotonic() > settle_deadline:
                        break
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            marker = (await control.call("add_node", id="add_node"))["id"]
            for d in team:
                d.write(json.dumps({"marker": marker}))
            reports = []
            for d in team:
                reports += (await d.expect("report", 120))["clients"]
        for d in team:
            await d.finish()
        await asyncio.sleep(2.0)
        rss_after = worker.rss()
        report.update(
            seconds=seconds,
            driver_seconds=max(m["seconds"] for m in done),
            worker_cpu_seconds=cpu_after - cpu_before,
            rss_before_mb=rss_before / MB,
            rss_peak_mb=sampler.peak.get(worker.pid, 0) / MB,
            rss_after_mb=rss_after / MB,
            rss_hwm_mb=hwm_bytes(worker.pid) / MB,
            rss_series_mb=[(round(t, 1), round(v / MB, 1))
                           for t, v in sampler.samples[worker.pid][::10]],
        )
        _check(report, reports, pairs[:setters], expected_sets, problems)
    finally:
        for d in team:
            if d.proc is not None and d.proc.returncode is None:
                d.proc.kill()
                await d.proc.wait()
        await worker.stop()
        code = worker.proc.returncode if worker.proc is not None else None
        report["worker_exit_code"] = code
        report["worker_log_problems"] = log_problems(worker.base / "stdout.log")[:20]
        if code not in (0, None):
            problems.append(f"worker exited with {code}")
        if report["worker_log_problems"]:
            problems.append(f"{len(report['worker_log_problems'])} error lines in the worker log")
        if not keep and not problems:
            shutil.rmtree(run_dir, ignore_errors=True)
    return report


def _check(report: dict, clients: List[dict], pairs: List[tuple], sets: int,
           problems: List[str]):
    """Fill in the totals and list what went wrong."""
    totals = Counter()
    for c in clients:
        for key in ("sent", "answered", "missing", "duplicates", "unknown", "errors",
                    "wrong_results", "pings", "pongs"):
            totals[key] += c[key]
        if c["missing"] or c["duplicates"] or c["unknown"] or c["errors"] or c["wrong_results"]:
            problems.append(
                f"{c['name']}: sent {c['sent']}, answered {c['answered']}, missing "
                f"{c['missing']}, duplicates {c['duplicates']}, unknown {c['unknown']}, errors "
                f"{c['errors']} {c['error_samples']}, wrong {c['wrong_results']} "
                f"{c['wrong_samples']}"
            )
        if c["sent"] != report["commands_per_client"]:
            problems.append(f"{c['name']}: sent only {c['sent']} commands")
        if c["pongs"] != c["pings"]:
            problems.append(f"{c['name']}: {c['pings']} pings, {c['pongs']} pongs")
        if c["close_code"] is not None:
            problems.append(f"{c['name']}: closed by the worker ({c['close_code']})")
        if not c.get("marker_seen"):
            problems.append(f"{c['name']}: never saw the final node_added")
    report["totals"] = dict(totals)
    seconds = report["seconds"]
    report["commands_per_second"] = totals["answered"] / seconds if seconds else 0
    # Text events: every client must have the same count of each.
    names = sorted({name for c in clients for name in c["events"]})
    events, lost = {}, 0
    for name in names:
        counts = [c["events"].get(name, 0) for c in clients]
        events[name] = {"min": min(counts), "max": max(counts)}
        lost += sum(max(counts) - n for n in counts)
        if min(counts) != max(counts):
            problems.append(f"event {name}: counts differ between clients "
                            f"({min(counts)}..{max(counts)})")
    report["events"] = events
    report["lost_events"] = lost
    # Value previews: counts may differ (merged while a socket was full), last values not.
    io_counts = [c["io_counts"].get("*", 0) for c in clients]
    report["io_value_frames"] = {"min": min(io_counts), "max": max(io_counts),
                                 "total": sum(io_counts)}
    finals = {}
    for a, b in pairs:
        finals[f"{a}/a"] = sets
        finals[f"{a}/out"] = sets + 1
        finals[f"{b}/out"] = sets + 2
    wrong_finals = 0
    for c in clients:
        for key, value in finals.items():
            if c["last"].get(key) != value:
                wrong_finals += 1
                if wrong_finals <= 5:
                    problems.append(f"{c['name']}: last preview of {key} is "
                                    f"{c['last'].get(key)!r}, expected {value!r}")
    report["wrong_final_values"] = wrong_finals
    report["frames_per_client"] = {
        "min": min(c["answered"] + c["pongs"] + sum(c["events"].values())
                   + c["io_counts"].get("*", 0) for c in clients),
        "max": max(c["answered"] + c["pongs"] + sum(c["events"].values())
                   + c["io_counts"].get("*", 0) for c in clients),
    }


def summary(report: dict) -> str:
    t = report.get("totals", {})
    lines = [
        f"clients {report['clients']} x commands {report['commands_per_client']} "
        f"({report['setters']} setters, {report['drivers']} driver processes, "
        f"{report['inflight']} in flight)",
    ]
    if "seconds" in report:
        lines += [
            f"commands sent {t.get('sent')}, answered {t.get('answered')}, missing "
            f"{t.get('missing')}, duplicates {t.get('duplicates')}, unknown {t.get('unknown')}, "
            f"errors {t.get('errors')}, wrong results {t.get('wrong_results')}",
            f"time {report['seconds']:.1f} s ({report['commands_per_second']:.0f} commands/s), "
            f"worker CPU {report['worker_cpu_seconds']:.1f} s",
            f"pings {t.get('pings')}, pongs {t.get('pongs')}; lost events "
            f"{report['lost_events']}; wrong final values {report['wrong_final_values']}",
            "events per client: " + ", ".join(
                f"{name} {v['min']}" + ("" if v["min"] == v["max"] else f"..{v['max']}")
                for name, v in report["events"].items()),
            f"io_value frames per client {report['io_value_frames']['min']}.."
            f"{report['io_value_frames']['max']}; frames per client "
            f"{report['frames_per_client']['min']}..{report['frames_per_client']['max']}",
            f"worker RSS before {report['rss_before_mb']:.1f} MB, peak "
            f"{report['rss_peak_mb']:.1f} MB, after {report['rss_after_mb']:.1f} MB "
            f"(VmHWM {report['rss_hwm_mb']:.1f} MB)",
        ]
    lines.append(f"worker exit code {report.get('worker_exit_code')}")
    problems = report.get("problems", [])
    lines.append(f"problems: {len(problems)}")
    lines += [f"  {p}" for p in problems[:30]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int,
                        default=int(os.environ.get("FUNCNODES_TW_LOAD_CLIENTS", 50)))
    parser.add_argument("--commands", type=int,
                        default=int(os.environ.get("FUNCNODES_TW_LOAD_COMMANDS", 2000)),
                        help="commands per client")
    parser.add_argument("--setters", type=int, default=10,
                        help="clients that also set values (one set_io_value in four commands)")
    parser.add_argument("--drivers", type=int, default=2, help="client processes")
    parser.add_argument("--inflight", type=int, default=16, help="commands in flight per client")
    parser.add_argument("--ping-every", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)
    if args.driver:
        return asyncio.run(driver_main())

    def log(text):
        print(f"[load] {text}", file=sys.stderr, flush=True)

    try:
        report = asyncio.run(run_load(
            args.clients, args.commands, args.setters, args.drivers, args.inflight,
            args.ping_every, args.timeout, args.keep, log,
        ))
    finally:
        kill_all()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(summary(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
