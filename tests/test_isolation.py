"""
Process isolation: C{separate_process} / C{separate_thread} nodes, the process
pool, external commands, and that nothing outlives the worker.

In-process tests run a worker service on 127.0.0.1 (L{inprocess.Served});
the orphan test runs C{python -m funcnodes_tw} as a child and watches its
descendants in /proc. The test nodes live in C{tests/isolation_nodes.py}.

No test asserts on latency (timed assertions are flaky); the WebSocket ping
round trips measured during isolated work are reported (C{record_property},
printed with C{-s}); the benchmark's C{isolation} figure has the numbers.
"""

import asyncio
import functools
import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

import funcnodes_core as fn

from funcnodes_tw import aio, isolation, processes  # before isolation_nodes: installs
import isolation_nodes  # noqa: E402
from inprocess import Served
from workers import start_ours
from wsclient import connect

TESTS = Path(__file__).resolve().parent
PY = sys.executable
#: A command printing 0..4, one line every 0.1 s.
COUNT = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.1)"
#: A command that starts a grandchild, prints its pid and waits.
FAMILY = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(p.pid, flush=True)\n"
    "time.sleep(60)"
)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def in_loop(function):
    """
    Run an C{async def} test as an asyncio task on the reactor's loop (it
    awaits asyncio futures, which C{pytest_twisted.ensureDeferred} cannot).
    """

    @pytest_twisted.inlineCallbacks
    @functools.wraps(function)
    def test(*args, **kwargs):
        return (yield aio.as_deferred(function(*args, **kwargs)))

    return test


# region /proc


def alive(pid):
    """
    Whether C{pid} runs (a zombie does not count: it is only waiting to be reaped).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
            found.append(int(entry))
    return found


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        found += kids
        todo += kids
    return found


@defer.inlineCallbacks
def wait_gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        yield sleep(0.05)
    return [p for p in pids if alive(p)]


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


# endregion
# region WebSocket helpers


def value_of(msg):
    payload, mime = msg["payload"], msg["header"].get("mime", "")
    if mime.startswith("application/json"):
        return json.loads(payload)
    if mime.startswith("application/fn.struct."):
        return struct.unpack(mime.removeprefix("application/fn.struct."), payload)[0]
    return payload.decode()


def is_value(nid, io):
    def match(msg):
        header = msg.get("header", {}) if msg.get("binary") else {}
        where = (header.get("node"), header.get("io"))
        return header.get("type") == "io_value" and where == (nid, io)

    return match


def values(client, nid, io):
    return [value_of(m) for m in client.transcript if is_value(nid, io)(m)]


class Pinger:
    """
    WebSocket pings every C{interval} s; C{rtts} holds (sent, round trip) pairs.
    """

    def __init__(self, client, interval=0.01):
        self.proto = client._proto
        self.proto.onPong = self._pong
        self.interval = interval
        self.sent = {}
        self.rtts = []
        self.seq = 0
        self.loop = task.LoopingCall(self._ping)

    def start(self):
        self.loop.start(self.interval)

    def stop(self):
        if self.loop.running:
            self.loop.stop()

    def _ping(self):
        self.seq += 1
        payload = str(self.seq).encode()
        self.sent[payload] = time.time()
        self.proto.sendPing(payload)

    def _pong(self, payload):
        sent = self.sent.pop(payload, None)
        if sent is not None:
            self.rtts.append((sent, time.time() - sent))

    def between(self, start, end):
        return sorted(rtt for sent, rtt in self.rtts if start <= sent <= end)


def percentile(values, p):
    """Nearest rank."""
    rank = max(1, -(-len(values) * p // 100))
    return values[int(rank) - 1]


# endregion
# region fixtures


@pytest.fixture
def start(tmp_path, monkeypatch, clean_reactor):
    """
    C{yield start()}: a listening in-process worker, stopped after the test;
    every process it started must be gone by then.
    """
    from funcnodes_tw import persistence

    monkeypatch.setattr(persistence, "workers_dir", lambda: tmp_path / "workers")
    running = []

    def _start(name="iso"):
        worker = Served(tmp_path, name, [])
        running.append(worker)
        return worker.start()

    yield _start
    for worker in reversed(running):
        pytest_twisted.blockon(worker.stop())
    left = processes.live_pids()
    kill_all(left)
    assert not left, f"children left after the worker stopped: {left}"


@pytest.fixture
def service(clean_reactor):
    """
    A started L{isolation.Isolation} on an empty node space: the pool is on.
    """
    svc = isolation.Isolation(fn.NodeSpace())
    svc.startService()
    yield svc
    if svc.running:
        pytest_twisted.blockon(svc.stopService())
    left = processes.live_pids()
    kill_all(left)
    assert not left, f"children left: {left}"


# endregion
# region the process pool


@in_loop
async def test_pool_runs_calls_in_other_processes(service):
    pool = isolation.current_pool()
    pid = await aio.as_future(pool.submit(isolation_nodes.where))
    assert pid != os.getpid() and pid in pool.pids()
    assert await aio.as_future(pool.submit(isolation_nodes.add, (2, 3))) == 5
    assert await aio.as_future(pool.submit(isolation_nodes.coroutine, (21,))) == 42
    # Calls run side by side, one per process.
    pids = await aio.as_future(
        defer.gatherResults([pool.submit(isolation_nodes.spin, (0.3,)) for _ in range(2)])
    )
    assert len(set(pids)) == 2 or pool.size == 1


@in_loop
async def test_pool_errors_carry_the_child_traceback(service):
    pool = isolation.current_pool()
    with pytest.raises(ValueError, match="bad") as info:
        await aio.as_future(pool.submit(isolation_nodes.fail.o_func, ("bad",)))
    assert any("Raised in process" in note for note in info.value.__notes__)
    with pytest.raises(isolation.ProcessDied):
        await aio.as_future(pool.submit(isolation_nodes.crash))
    # A new process takes the dead one's place.
    assert await aio.as_future(pool.submit(isolation_nodes.add, (1, 1))) == 2


@in_loop
async def test_cancelling_a_call_kills_its_process(service):
    pool = isolation.current_pool()
    pid = await aio.as_future(pool.submit(isolation_nodes.where))
    d = pool.submit(isolation_nodes.spin, (60,))
    await aio.as_future(sleep(0.2))
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await aio.as_future(d)
    assert await aio.as_future(wait_gone([pid])) == []


@in_loop
async def test_stop_ends_busy_and_idle_processes(service):
    pool = isolation.current_pool()
    pool.size = 2
    idle = await aio.as_future(pool.submit(isolation_nodes.where))
    busy = pool.submit(isolation_nodes.spin, (60,))
    queued = pool.submit(isolation_nodes.spin, (60,))
    queued2 = pool.submit(isolation_nodes.spin, (60,))
    await aio.as_future(sleep(0.3))
    pids = pool.pids()
    assert idle in pids
    await aio.as_future(service.stopService())
    assert [p for p in pids if alive(p)] == []
    for d in (busy, queued, queued2):
        with pytest.raises(defer.CancelledError):
            await aio.as_future(d)
    assert isolation.current_pool() is None


@in_loop
async def test_a_process_that_ignores_sigterm_is_killed(service):
    pool = isolation.current_pool()
    pool.size = 1
    pid = await aio.as_future(pool.submit(isolation_nodes.ignore_sigterm))
    busy = pool.submit(isolation_nodes.spin, (60,))
    busy.addErrback(lambda failure: None)
    (child,) = pool.children
    await aio.as_future(sleep(0.2))
    await aio.as_future(pool.stop(timeout=0.5))
    assert child.returncode == -9 and not alive(pid)  # SIGKILL, after SIGTERM did nothing


@in_loop
async def test_node_functions_that_cannot_be_pickled_run_in_a_thread(service):
    # A generator cannot be pickled. (The function is not from this module: the
    # child would import it, and this module's imports would install a reactor.)
    wrapper = isolation.make_run_in_new_process(isolation_nodes.first)
    assert await wrapper(x for x in [7]) == (os.getpid(), 7)
    # Outside a worker service everything runs in threads, as in funcnodes-core.
    await aio.as_future(service.stopService())
    assert await isolation.make_run_in_new_process(isolation_nodes.where)() == os.getpid()


@in_loop
async def test_thread_pools_are_shut_down_and_replaced(service):
    node = isolation_nodes.nap()
    node.inputs["seconds"].value = 0.01
    await node
    wrapper = type(node).func.__wrapped__
    old = wrapper.executor
    assert wrapper in isolation.executor_wrappers()
    await aio.as_future(service.stopService())
    assert old._shutdown and wrapper.executor is not old
    node.inputs["seconds"].value = 0.01
    await node  # still works, in a fresh pool
    assert node.outputs["out"].value["pid"] == os.getpid()


# endregion
# region commands


@in_loop
async def test_run_command_streams_lines(clean_reactor):
    async with processes.run_command([PY, "-c", COUNT]) as cmd:
        lines = []
        async for line in cmd:
            lines.append((line, time.monotonic()))
    assert [line for line, _ in lines] == [processes.Line("stdout", str(i)) for i in range(5)]
    assert lines[-1][1] - lines[0][1] > 0.3  # as they came, not all at the end
    assert cmd.returncode == 0 and not cmd.running


@in_loop
async def test_run_command_stderr_and_failures(clean_reactor):
    script = (
        "import sys; print('out'); print('err', file=sys.stderr); print('tail', end=''); "
        "sys.exit(4)"
    )
    cmd = processes.run_command([PY, "-c", script])
    got = [line async for line in cmd]
    assert sorted(got) == [("stderr", "err"), ("stdout", "out"), ("stdout", "tail")]
    assert await cmd.wait() == 4
    missing = processes.run_command("no-such-command-here --flag")
    got = [line async for line in missing]
    assert missing.returncode == 127 and got[0].stream == "stderr"
    with pytest.raises(ValueError):
        processes.run_command("")


@in_loop
async def test_a_slow_reader_pauses_the_command(clean_reactor, monkeypatch):
    monkeypatch.setattr(processes, "HIGH_WATER", 50)
    monkeypatch.setattr(processes, "LOW_WATER", 10)
    cmd = processes.run_command([PY, "-c", "for i in range(3000): print(i)"])
    paused = False
    got = []
    async for line in cmd:
        got.append(int(line.text))
        paused = paused or cmd._paused
        if len(got) % 500 == 0:
            await asyncio.sleep(0.05)  # let the output pile up
    assert got == list(range(3000)) and paused
    assert len(cmd._lines) == 0 and cmd.returncode == 0


@in_loop
async def test_leaving_a_command_early_kills_its_process_group(clean_reactor):
    async with processes.run_command([PY, "-c", FAMILY]) as cmd:
        async for line in cmd:
            grandchild = int(line.text)
            break
    assert cmd.returncode == -15
    assert await aio.as_future(wait_gone([cmd.pid, grandchild])) == []


@in_loop
async def test_cancelling_the_reader_kills_the_command(clean_reactor):
    seen = []

    async def read():
        async with processes.run_command([PY, "-c", FAMILY]) as cmd:
            seen.append(cmd)
            async for line in cmd:
                seen.append(int(line.text))

    reading = aio.event_loop().create_task(read())
    while len(seen) < 2:
        await aio.as_future(sleep(0.05))
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    cmd, grandchild = seen
    assert await aio.as_future(wait_gone([cmd.pid, grandchild])) == []


# endregion
# region a real worker


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_isolated_nodes_run_concurrently_beside_the_reactor(start, record_property):
    """
    A node burns CPU for 2 s in a process while another sleeps 2 s in a
    thread; the worker answers pings meanwhile (round trips reported).
    """
    worker = yield start()
    client = yield worker.connect()
    yield client.call("add_shelf", src="isolation_nodes")
    burn = (yield client.call("add_node", id="isolation.burn"))["id"]
    nap = (yield client.call("add_node", id="isolation.nap"))["id"]
    pinger = Pinger(client)
    pinger.start()
    try:
        yield sleep(0.5)
        began = time.time()
        yield client.call("set_io_value", nid=burn, ioid="seconds", value=2.0)
        yield client.call("set_io_value", nid=nap, ioid="seconds", value=2.0)
        burned = value_of((yield client.wait_for(is_value(burn, "out"), timeout=30)))
        napped = value_of((yield client.wait_for(is_value(nap, "out"), timeout=30)))
        ended = time.time()
    finally:
        pinger.stop()
    assert burned["pid"] != os.getpid()  # a real process...
    assert burned["pid"] in isolation.current_pool().pids()
    assert napped["pid"] == os.getpid()
    assert napped["thread"] != isolation_nodes.threading.main_thread().ident
    for run in (burned, napped):
        assert run["end"] - run["start"] >= 1.9
    # ...and both at the same time: each started before the other ended.
    assert burned["start"] < napped["end"] and napped["start"] < burned["end"]

    both = (max(burned["start"], napped["start"]), min(burned["end"], napped["end"]))
    window = pinger.between(*both)
    assert window, "the worker answered no pings during the work"
    idle = pinger.between(0, began)
    figures = {
        "pings_during_work": len(window),
        "ping_p50_ms": round(1000 * percentile(window, 50), 2),
        "ping_p99_ms": round(1000 * percentile(window, 99), 2),
        "ping_max_ms": round(1000 * window[-1], 2),
        "ping_p99_idle_ms": round(1000 * percentile(idle, 99), 2) if idle else None,
        "wall_s": round(ended - began, 2),
    }
    for key, value in figures.items():
        record_property(key, value)
    print(f"\nisolated work, in-process worker and client: {figures}")
    pids = isolation.current_pool().pids()
    yield worker.stop()
    assert [p for p in pids if alive(p)] == []


@pytest_twisted.inlineCallbacks
def test_command_node_streams_lines_to_clients(start):
    worker = yield start()
    client = yield worker.connect()
    yield client.call("add_shelf", src="funcnodes_tw.processes")
    nid = (yield client.call("add_node", id="funcnodes_tw.command"))["id"]
    yield client.call("set_io_value", nid=nid, ioid="command", value=[PY, "-c", COUNT])
    code = yield client.wait_for(is_value(nid, "returncode"), timeout=15)
    assert value_of(code) == 0
    assert values(client, nid, "line") == [str(i) for i in range(5)]


@pytest.mark.parametrize("how", ["remove_node", "stop"])
@pytest_twisted.inlineCallbacks
def test_a_running_command_ends_with_its_node_or_worker(start, how):
    worker = yield start()
    client = yield worker.connect()
    yield client.call("add_shelf", src="funcnodes_tw.processes")
    nid = (yield client.call("add_node", id="funcnodes_tw.command"))["id"]
    yield client.call("set_io_value", nid=nid, ioid="command", value=[PY, "-c", FAMILY])
    grandchild = int(value_of((yield client.wait_for(is_value(nid, "line"), timeout=15))))
    (pid,) = processes.live_pids()
    assert alive(pid) and alive(grandchild)
    try:
        if how == "remove_node":
            yield client.call("remove_node", id=nid)
        else:
            yield worker.stop()
        assert (yield wait_gone([pid, grandchild])) == []
    finally:
        kill_all([pid, grandchild])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "stop_worker"])
@pytest_twisted.inlineCallbacks
def test_no_orphans_after_the_worker_stops(tmp_path, clean_reactor, how):
    """
    A worker process with a busy pool process and a command (with a child of
    its own) leaves no process behind, however it is stopped.
    """
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    proc = yield start_ours(tmp_path, env={"PYTHONPATH": path})
    family = []
    client = None
    try:
        client = yield connect(reactor, proc.url)
        yield client.call("uuid")
        yield client.call("add_shelf", src="isolation_nodes")
        yield client.call("add_shelf", src="funcnodes_tw.processes")
        burn = (yield client.call("add_node", id="isolation.burn"))["id"]
        nid = (yield client.call("add_node", id="funcnodes_tw.command"))["id"]
        yield client.call("set_io_value", nid=burn, ioid="seconds", value=60.0)
        yield client.call("set_io_value", nid=nid, ioid="command", value=[PY, "-c", FAMILY])
        yield client.wait_for(is_value(nid, "line"), timeout=30)
        # The pool process, the command and the command's child.
        for _ in range(100):
            family = descendants(proc.pid)
            if len(family) >= 3:
                break
            yield sleep(0.1)
        assert len(family) >= 3, f"expected 3 descendants, found {family}"
        if how == "SIGTERM":
            proc._transport.signalProcess("TERM")
        else:
            yield client.call("stop_worker")
        reason = yield proc.when_ended().addTimeout(20, reactor)
        assert getattr(reason, "signal", None) is None, f"worker did not exit by itself: {reason}"
        assert (yield wait_gone(family)) == [], "orphans: " + proc.output_tail()
    finally:
        if client is not None and not client.is_closed:
            client._proto.dropConnection(abort=True)
            yield client.when_closed()
        yield proc.stop()
        kill_all(family)


# endregion
