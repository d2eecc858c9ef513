"""The harness every figure shares: two worker processes, clients, /proc readings.

A ``Bench`` starts funcnodes_tw and the reference worker (funcnodes-worker 1.6.0) as
subprocesses with identical environments, each with its own ``FUNCNODES_CONFIG_DIR``,
data path and ``TMPDIR`` under one run directory, and connects one WebSocket client to
each. Figures talk to the workers only through ``Bench.workers`` (a ``Worker`` per side)
and read their memory and CPU from ``/proc/<pid>/status`` and ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
REFWORKER = ROOT / "tests" / "refworker.py"

#: Display order of the two sides; "tw" is funcnodes_tw, "ref" the reference.
SIDES = ("tw", "ref")
TITLES = {"tw": "funcnodes_tw", "ref": "reference"}
ARGV = {
    "tw": ["-m", "funcnodes_tw"],
    "ref": [str(REFWORKER)],
}

MB = 1_000_000
STOP_TIMEOUT = 10.0

#: Every worker process started and not yet reaped, for ``kill_all``.
_LIVE: "set[Worker]" = set()


def kill_all():
    """Stop every worker this process started (the CLI's last resort, also at exit)."""
    for worker in list(_LIVE):
        worker.kill()


# -- /proc readings ---------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    """Resident set size (``VmRSS``) of ``pid`` in bytes."""
    return _status_field(pid, "VmRSS")


def hwm_bytes(pid: int) -> int:
    """Peak resident set size (``VmHWM``) of ``pid`` in bytes."""
    return _status_field(pid, "VmHWM")


def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(name.encode() + b":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    raise KeyError(f"{name} not in /proc/{pid}/status")


def reset_hwm(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5); False if not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (``/proc/<pid>/stat`` utime + stime)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name is in parentheses and may contain spaces: split after it.
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def sched_seconds(pid: int) -> float:
    """CPU time of all threads of ``pid`` from ``/proc/<pid>/task/*/schedstat`` (ns
    resolution; a cross-check of ``cpu_seconds``, whose 10 ms ticks are coarse for
    idle figures). Threads that ended are not counted."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


class RssSampler:
    """Sample ``VmRSS`` of some pids in a thread, every ``interval`` seconds.

    Use as a context manager; ``peak[pid]`` is the largest sample (including one taken
    on entry and one on exit), ``samples[pid]`` the ``(t, rss)`` series.
    """

    def __init__(self, pids: List[int], interval: float = 0.02):
        self.pids = list(pids)
        self.interval = interval
        self.peak: Dict[int, int] = {}
        self.samples: Dict[int, List[tuple]] = {pid: [] for pid in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def _sample(self):
        now = time.perf_counter() - self._t0
        for pid in self.pids:
            try:
                rss = rss_bytes(pid)
            except (OSError, KeyError):
                continue
            self.samples[pid].append((now, rss))
            if rss > self.peak.get(pid, 0):
                self.peak[pid] = rss

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False


# -- the WebSocket client ---------------------------------------------------------------
def parse_binary_frame(data: bytes) -> tuple:
    """Split a binary frame (``chunk=1/1;msgid=..;node=..; io=..; ..\\r\\n\\r\\n<bytes>``,
    both workers) into its header fields and payload."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return {}, data
    header = {}
    for part in data[:end].decode("utf-8", "replace").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            header[key] = value
    return header, data[end + 4:]


class CommandError(Exception):
    """The worker answered a command with an ``error`` message."""


class Client:
    """One WebSocket connection to a worker, speaking PROTOCOL.md §2.

    ``call`` returns a command's JSON result; ``call_large`` expects the reply to come
    as a ``large_message`` hint and fetches it with ``GET /message/<id>``.
    """

    def __init__(self, worker: "Worker", ws: aiohttp.ClientWebSocketResponse):
        self.worker = worker
        self.ws = ws
        self.pending: Dict[str, asyncio.Future] = {}
        self.hints: asyncio.Queue = asyncio.Queue()
        #: Called with ``(header, payload, arrival_time)`` for every binary frame.
        self.binary_watchers: List[Callable[[Dict[str, str], bytes, float], None]] = []
        self.pongs = 0
        #: Size of each plain reply, by message id (read by ``call_auto``).
        self.reply_bytes: Dict[str, int] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self):
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                if self.binary_watchers:
                    now = time.perf_counter()
                    header, payload = parse_binary_frame(msg.data)
                    for watcher in list(self.binary_watchers):
                        watcher(header, payload, now)
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                data = json.loads(msg.data)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            kind = data.get("type")
            if kind == "pong":
                self.pongs += 1
                continue
            if kind == "large_message":
                self.hints.put_nowait(data)
                continue
            future = self.pending.pop(data.get("id"), None) if kind in ("result", "error") else None
            if future is None or future.done():
                continue
            self.reply_bytes[data.get("id")] = len(msg.data)
            if kind == "result":
                future.set_result(data.get("result"))
            else:
                future.set_exception(CommandError(data.get("error")))
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"{self.worker.title}: socket closed"))

    def _send(self, cmd: str, kwargs: dict, as_bytes: bool = False) -> tuple:
        msg_id = uuidlib.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        message = {"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": msg_id, "as_bytes": as_bytes}
        return msg_id, future, json.dumps(message)

    async def call(self, cmd: str, timeout: float = 30.0, **kwargs) -> Any:
        msg_id, future, text = self._send(cmd, kwargs)
        await self.ws.send_str(text)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.pending.pop(msg_id, None)
            self.reply_bytes.pop(msg_id, None)

    async def ping(self):
        """What the UI sends every 2 s (``{"type": "ping"}``)."""
        await self.ws.send_str('{"type": "ping"}')

    async def call_auto(self, cmd: str, timeout: float = 60.0, **kwargs) -> Dict[str, Any]:
        """Send ``cmd``; the reply comes as a plain result or, when too big for a
        frame, as a ``large_message`` hint that is fetched. Returns the result,
        the reply's size in bytes, whether it was large and the seconds taken."""
        self.drain_hints()
        msg_id, future, text = self._send(cmd, kwargs)
        marker = json.dumps(msg_id).encode()
        t0 = time.perf_counter()
        await self.ws.send_str(text)
        deadline = t0 + timeout
        try:
            while True:
                getter = asyncio.ensure_future(self.hints.get())
                done, _ = await asyncio.wait(
                    {getter, future}, timeout=max(deadline - time.perf_counter(), 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if future in done:
                    getter.cancel()
                    result = future.result()
                    seconds = time.perf_counter() - t0
                    return {"result": result, "seconds": seconds, "large": False,
                            "bytes": self.reply_bytes.pop(msg_id, 0)}
                if getter not in done:
                    getter.cancel()
                    raise TimeoutError(f"{self.worker.title}: no reply to {cmd} in time")
                body = await self.worker.get(f"/message/{getter.result()['msg_id']}")
                if marker in body[-200:]:
                    seconds = time.perf_counter() - t0
                    return {"result": json.loads(body).get("result"), "seconds": seconds,
                            "large": True, "bytes": len(body)}
        finally:
            self.pending.pop(msg_id, None)
            self.reply_bytes.pop(msg_id, None)

    def drain_hints(self) -> int:
        """Forget ``large_message`` hints received so far (e.g. broadcasts); their count."""
        n = 0
        while not self.hints.empty():
            self.hints.get_nowait()
            n += 1
        return n

    async def call_large(self, cmd: str, timeout: float = 120.0, **kwargs) -> Dict[str, float]:
        """Send ``cmd``, wait for the hint, fetch the message; return timings and size.

        Hints of other messages (broadcasts) are fetched and skipped: a message is ours
        when our id is at its end (``result`` then ``id``, both workers).
        """
        self.drain_hints()
        msg_id, future, text = self._send(cmd, kwargs)
        t0 = time.perf_counter()
        await self.ws.send_str(text)
        marker = json.dumps(msg_id).encode()
        deadline = t0 + timeout
        try:
            while True:
                hint = await self._next_hint(future, deadline - time.perf_counter())
                t_hint = time.perf_counter()
                body = await self.worker.get(f"/message/{hint['msg_id']}")
                if marker in body[-200:]:
                    break
            t1 = time.perf_counter()
        finally:
            self.pending.pop(msg_id, None)
            self.reply_bytes.pop(msg_id, None)
        return {"seconds": t1 - t0, "hint_seconds": t_hint - t0, "bytes": len(body)}

    async def _next_hint(self, future: asyncio.Future, timeout: float) -> dict:
        getter = asyncio.ensure_future(self.hints.get())
        done, _ = await asyncio.wait(
            {getter, future}, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
        )
        if getter in done:
            return getter.result()
        getter.cancel()
        if future in done:
            future.result()  # raises CommandError for an error reply
            raise RuntimeError(f"{self.worker.title}: expected a large_message, got a plain result")
        raise TimeoutError(f"{self.worker.title}: no large_message within the timeout")

    async def close(self):
        await self.ws.close()
        self.reader.cancel()


# -- one worker process -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Worker:
    """A worker subprocess (``side`` "tw" or "ref") and the bench's client to it."""

    def __init__(self, side: str, run_dir: Path, env: Dict[str, str], options=(),
                 prefix=(), cpus=None):
        """``prefix``: a command the worker runs under (e.g. valgrind); ``cpus``: the
        CPUs it (and every thread it starts) may run on."""
        self.side = side
        self.title = TITLES[side]
        self.base = run_dir / side
        self.config_dir = self.base / "config"
        self.data_path = self.base / "data"
        self.tmp_dir = self.base / "tmp"
        for folder in (self.config_dir, self.data_path, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_base = f"http://127.0.0.1:{self.port}"
        self.uuid = f"bench_{side}_{uuidlib.uuid4().hex[:12]}"
        self.env = dict(env)
        self.env.update(
            FUNCNODES_CONFIG_DIR=str(self.config_dir),
            TMPDIR=str(self.tmp_dir),
            PYTHONUNBUFFERED="1",
        )
        self.cpus = cpus
        self.argv = [*prefix, sys.executable, *ARGV[side], "--host", "127.0.0.1",
                     "--port", str(self.port)]
        self.argv += ["--data-path", str(self.data_path), "--uuid", self.uuid, *options]
        self.proc: Optional[subprocess.Popen] = None
        self.session: Optional[aiohttp.ClientSession] = None
        self.client: Optional[Client] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def files_dir(self) -> Path:
        return self.data_path / "files"

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def spawn(self):
        out_path, err_path = self.base / "stdout.log", self.base / "stderr.log"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.base, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err,
                preexec_fn=None if self.cpus is None else lambda: os.sched_setaffinity(0, self.cpus),
            )
        _LIVE.add(self)

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("stdout.log", "stderr.log"):
            try:
                text = (self.base / name).read_text(errors="replace")
            except OSError:
                text = ""
            parts.append(f"--- {self.side} {name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    async def wait_listening(self, timeout: float = 60.0, poll: float = 0.1):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.title} exited ({self.proc.returncode})\n{self.log_tail()}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.title} not listening after {timeout} s\n{self.log_tail()}"
                    )
                await asyncio.sleep(poll)
            else:
                writer.close()
                return

    async def connect(self) -> Client:
        if self.session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
            self.session = aiohttp.ClientSession(timeout=timeout)
        ws = await self.session.ws_connect(
            f"ws://127.0.0.1:{self.port}/", max_msg_size=0, autoping=True, heartbeat=None
        )
        return Client(self, ws)

    async def connect_listening(self, n: int) -> List[Client]:
        """``n`` more clients, each of which sent a ``uuid`` (so both workers send
        them broadcasts, like a UI that is open)."""
        clients = list(await asyncio.gather(*(self.connect() for _ in range(n))))
        await asyncio.gather(*(c.call("uuid") for c in clients))
        return clients

    async def ensure_client(self):
        """(Re)connect the bench's main client if a figure closed it."""
        if self.client is None or self.client.ws.closed:
            self.client = await self.connect()
            await self.client.call("uuid")

    async def start(self):
        self.spawn()
        await self.wait_listening()
        await self.ready()

    async def ready(self):
        """Connect the bench's client to a listening worker; both get funcnodes-basic."""
        self.client = await self.connect()
        # Our first message also makes funcnodes_tw send us broadcasts (§10.5).
        await self.client.call("uuid")
        if self.side == "ref":
            # The reference starts with an empty library; ours ships funcnodes-basic.
            await self.client.call("add_package_dependency", timeout=120, name="funcnodes-basic")

    async def get(self, path: str) -> bytes:
        async with self.session.get(self.http_base + path) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{self.title}: GET {path} -> {resp.status} {body[:200]!r}")
            return body

    async def post(self, path: str, data, headers=None) -> tuple:
        async with self.session.post(self.http_base + path, data=data, headers=headers) as resp:
            return resp.status, await resp.read()

    async def post_command(self, cmd: str, **kwargs) -> None:
        """Run a command through ``POST /message/`` (for frames above the WS limit)."""
        body = json.dumps({"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": uuidlib.uuid4().hex})
        status, text = await self.post(
            "/message/", body.encode(), headers={"Content-Type": "application/json"}
        )
        if status != 200:
            raise RuntimeError(f"{self.title}: POST /message/ -> {status} {text[:200]!r}")

    async def settle(self, seconds: float = 1.0):
        await asyncio.sleep(seconds)

    async def stop(self):
        """Close the client, SIGTERM the process, SIGKILL after ``STOP_TIMEOUT``."""
        if self.client is not None:
            try:
                await asyncio.wait_for(self.client.close(), 5)
            except Exception:
                pass
            self.client = None
        if self.session is not None:
            await self.session.close()
            self.session = None
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.kill()

    def kill(self):
        """Synchronous stop: safe to call more than once, and from ``finally``/atexit."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _LIVE.discard(self)


class Bench:
    """Both workers of one figure; ``workers[side]`` is a started ``Worker``."""

    def __init__(self, run_dir: Path, config, env: Optional[Dict[str, str]] = None):
        self.run_dir = run_dir
        self.config = config
        self.env = dict(os.environ if env is None else env)
        self.workers: Dict[str, Worker] = {}

    async def start(self, name: str):
        base = self.run_dir / name
        options = {"tw": self.config.tw_options, "ref": ()}
        self.workers = {side: Worker(side, base, self.env, options[side]) for side in SIDES}
        try:
            await asyncio.gather(*(w.start() for w in self.workers.values()))
        except BaseException:
            await self.stop()
            raise

    async def stop(self):
        await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)
        for w in self.workers.values():
            w.kill()

    def kill(self):
        for w in self.workers.values():
            w.kill()

    async def reset(self):
        """Make workers a previous figure used fit for the next one (``--quick``
        shares them): main client connected, node space cleared, no files."""
        for w in self.workers.values():
            await w.ensure_client()
            await w.client.call("clear")
            if w.files_dir.is_dir():
                for entry in w.files_dir.iterdir():
                    if entry.is_file():
                        entry.unlink()
            await asyncio.sleep(0.1)
            w.client.drain_hints()

    def order(self, round_no: int) -> List[Worker]:
        """Both workers, the first one alternating with the round number."""
        sides = SIDES if round_no % 2 == 0 else SIDES[::-1]
        return [self.workers[s] for s in sides]

    async def alternate(self, rounds: int, measure: Callable[[Worker, int], Awaitable[Any]]):
        """Run ``measure(worker, round)`` for ``rounds`` rounds, alternating which side
        goes first; return ``{side: [result per round]}``."""
        results: Dict[str, List[Any]] = {side: [] for side in SIDES}
        for r in range(rounds):
            for w in self.order(r):
                results[w.side].append(await measure(w, r))
        return results
