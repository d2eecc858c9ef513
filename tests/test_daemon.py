"""
The worker among other processes: the FuncNodes worker manager, kill -9,
signals, a parent's stdin, systemd (notify, socket activation, unit files)
and its own log file.

Everything here runs real processes against real files, like
L{test_process}, whose L{Child} protocol and helpers are reused. Every child
is killed in teardown, whatever the test did. Figures (kill counts, shutdown
times) are printed: run with C{-rP} to see them.
"""

import configparser
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel

from test_process import (
    EXIT_TIMEOUT,
    START_TIMEOUT,
    TWISTD,
    child_env,
    free_port,
    launcher_argv,
    spawn,  # noqa: F401  (the fixture)
    wait_gone,
    wait_ready,
    worker_argv,
    worker_files,
)
from wsclient import CommandError, connect

pytestmark = pytest.mark.slow

UNITS = Path(__file__).resolve().parent.parent / "docs" / "systemd"
#: A clean shutdown (save, close clients, remove files) must take less than this.
SHUTDOWN_LIMIT = 5.0


@pytest.fixture(autouse=True)
def _clean(clean_reactor):
    yield


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


def twistd_argv(*options):
    return [str(TWISTD), "-n", "--pidfile=", "funcnodes-worker", *options]


RUNNERS = {"launcher": launcher_argv, "twistd": twistd_argv}


def new_uuid():
    return f"d_{uuidlib.uuid4().hex[:12]}"


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def exited_cleanly(reason, signum=None):
    """
    Exit code 0; or, for twistd, death by the very signal that stopped it:
    twistd re-raises its stop signal after a clean shutdown (Twisted's own
    behaviour, which systemd counts as success for SIGTERM and SIGINT).
    """
    if isinstance(reason, error.ProcessDone):
        return True
    return signum is not None and getattr(reason, "signal", None) == signum


# region the FuncNodes worker manager

#: Drives the installed FuncNodes worker manager (PyPI funcnodes 1.7.1) with
#: its own code, without starting its server: funcnodes-core reads
#: FUNCNODES_CONFIG_DIR at import, hence a separate process.
MANAGER_SCRIPT = r"""
import asyncio, json, sys, time
from funcnodes.worker.worker_manager import WorkerManager

def view(manager):
    return {
        "active": [w["uuid"] for w in manager._active_workers],
        "inactive": [w["uuid"] for w in manager._inactive_workers],
        "configs": {w["uuid"]: w for w in manager._active_workers + manager._inactive_workers},
    }

async def main(action, uuid):
    manager = WorkerManager()  # run_forever (its WebSocket server) is never called
    report = {}
    await manager.reload_workers()  # discovery: json + .p files, pid check, uuid probe
    report["before"] = view(manager)
    if action == "stop":
        # What run_forever runs besides the server: the loop that re-checks
        # workers, which stop_worker waits on after the worker said true.
        manager._is_running = True
        checking = asyncio.ensure_future(manager._checking_worker_loop())
        started = time.monotonic()
        await asyncio.wait_for(manager.stop_worker(uuid), 30)
        report["stop_seconds"] = time.monotonic() - started
        manager._is_running = False
        await checking
        report["after"] = view(manager)
    print("REPORT " + json.dumps(report), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@defer.inlineCallbacks
def run_manager(spawn, tmp_path, config_dir, action, worker_uuid):
    script = tmp_path / "manager.py"
    script.write_text(MANAGER_SCRIPT)
    argv = [sys.executable, str(script), action, worker_uuid]
    manager = spawn(f"manager-{action}", argv, config_dir)
    reason = yield manager.ended(timeout=60)
    assert isinstance(reason, error.ProcessDone), manager.tail()
    line = [l for l in bytes(manager.out).splitlines() if l.startswith(b"REPORT ")][-1]
    return json.loads(line[len(b"REPORT "):])


@pytest_twisted.inlineCallbacks
def test_the_manager_sees_our_worker_and_stops_it(tmp_path, spawn):
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = new_uuid()
    config_file, process_file, runstate_file = worker_files(config_dir, worker_uuid)
    # A crash left a process file with a dead pid, and a runstate: no obstacle.
    process_file.parent.mkdir(parents=True)
    stale = dead_pid()
    process_file.write_text(str(stale))
    runstate_file.write_text("running")

    port = free_port()
    child = spawn("worker", worker_argv(launcher_argv(), port, data_path, worker_uuid), config_dir)
    yield wait_ready(child, port)
    assert process_file.read_text() == str(child.pid) != str(stale)

    report = yield run_manager(spawn, tmp_path, config_dir, "stop", worker_uuid)
    before = report["before"]
    assert before["active"] == [worker_uuid], report
    assert before["inactive"] == []
    seen = before["configs"][worker_uuid]
    assert (seen["type"], seen["host"], seen["port"]) == ("WSWorker", "127.0.0.1", port)
    assert seen["pid"] == child.pid, "the manager reads the pid from .p"

    # stop_worker returned, so the worker answered true and then left the
    # manager's active list; the manager's own re-check now calls it inactive.
    assert report["after"]["active"] == [], report
    assert report["after"]["inactive"] == [worker_uuid], report
    reason = yield child.ended()
    assert isinstance(reason, error.ProcessDone), child.tail()
    yield wait_gone(process_file, runstate_file)
    assert not process_file.exists() and not runstate_file.exists()
    registration = json.loads(config_file.read_text())
    assert (registration["uuid"], registration["port"]) == (worker_uuid, port)

    # A fresh manager finds the stopped worker's registration: inactive, kept.
    later = yield run_manager(spawn, tmp_path, config_dir, "status", worker_uuid)
    assert later["before"]["active"] == [] and later["before"]["inactive"] == [worker_uuid]
    assert config_file.exists()
    print(f"FIGURES manager: stop_worker returned after {report['stop_seconds']:.2f} s")


# endregion
# region kill -9 durability

#: A fork server: it imports everything a worker imports, then forks one
#: worker process per request, each running the launcher's main() as
#: C{python -m funcnodes_tw} does. A start costs ~0.1 s instead of ~1.5 s,
#: and every kill -9 still hits a real, separate worker process.
FORK_SERVER = r"""
import gc, json, os, select, signal, sys

import funcnodes_basic
import funcnodes_react_flow
import funcnodes_tw.commands
import funcnodes_tw.launcher
import funcnodes_tw.protocol
import funcnodes_tw.resources
import funcnodes_tw.service

assert "twisted.internet.reactor" not in sys.modules, "the fork server must not install a reactor"


def say(**message):
    os.write(1, (json.dumps(message) + "\n").encode())


def run(request):
    code = 70
    try:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        code = funcnodes_tw.launcher.main(request["argv"])
    except BaseException as exc:
        os.write(2, f"worker failed: {exc!r}\n".encode())
    finally:
        os._exit(code)


def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        say(
            exited=pid,
            signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        )


gc.freeze()  # forked workers' gc.collect() need not walk the server's objects
say(ready=True)
buffer = b""
while True:
    readable, _, _ = select.select([0], [], [], 0.005)
    reap()
    if not readable:
        continue
    data = os.read(0, 65536)
    if not data:
        break
    buffer += data
    while b"\n" in buffer:
        line, buffer = buffer.split(b"\n", 1)
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run(request)
        say(started=pid, tag=request["tag"])
"""


class ForkServer(protocol.ProcessProtocol):
    """
    The test's end of L{FORK_SERVER}: start workers, learn how they ended.
    """

    def __init__(self):
        self.ready = defer.Deferred()
        self.live = set()
        self.reason = None
        self.err = bytearray()
        self._buffer = b""
        self._starting = {}
        self._exited = {}
        self._exit_waiters = {}
        self._tags = 0

    def outReceived(self, data):
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if "ready" in message:
                self.ready.callback(None)
            elif "started" in message:
                self.live.add(message["started"])
                self._starting.pop(message["tag"]).callback(message["started"])
            elif "exited" in message:
                pid = message["exited"]
                self.live.discard(pid)
                self._exited[pid] = message
                waiter = self._exit_waiters.pop(pid, None)
                if waiter is not None:
                    waiter.callback(message)

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.reason = reason.value
        gone = RuntimeError(f"fork server ended: {self.err[-3000:].decode(errors='replace')}")
        for d in [self.ready, *self._starting.values(), *self._exit_waiters.values()]:
            if not d.called:
                d.errback(gone)

    def start(self, argv, log):
        self._tags += 1
        d = defer.Deferred()
        self._starting[self._tags] = d
        request = {"tag": self._tags, "argv": argv, "log": str(log)}
        self.transport.write(json.dumps(request).encode() + b"\n")
        return d.addTimeout(EXIT_TIMEOUT, reactor)

    def has_exited(self, pid):
        return pid in self._exited

    def exited(self, pid, timeout=EXIT_TIMEOUT):
        if pid in self._exited:
            return defer.succeed(self._exited[pid])
        d = defer.Deferred()
        self._exit_waiters[pid] = d
        return d.addTimeout(timeout, reactor)


@pytest.fixture
def fork_server(tmp_path):
    server = ForkServer()
    script = tmp_path / "forkserver.py"  # no "funcnodes" in its cmdline: see _alive()
    script.write_text(FORK_SERVER)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    server.config_dir = config_dir
    reactor.spawnProcess(server, sys.executable, [sys.executable, str(script)],
                         env=child_env(config_dir), path=str(tmp_path))
    pytest_twisted.blockon(server.ready.addTimeout(START_TIMEOUT, reactor))
    yield server
    for pid in list(server.live):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if server.reason is None:
        ended = defer.Deferred()
        original = server.processEnded

        def processEnded(reason):
            original(reason)
            ended.callback(None)

        server.processEnded = processEnded
        server.transport.closeStdin()
        pytest_twisted.blockon(ended.addTimeout(EXIT_TIMEOUT, reactor))


class Lane:
    """
    One worker identity (uuid, port, data folder) that is killed and
    restarted over and over; two lanes run side by side.
    """

    def __init__(self, index, tmp_path, config_dir):
        self.index = index
        self.uuid = f"kill{index}_{uuidlib.uuid4().hex[:8]}"
        self.port = free_port()
        self.data = tmp_path / f"lane{index}"
        self.workers = config_dir / "workers"
        self.log = tmp_path / f"lane{index}.log"
        self.kills = 0
        self.torn = 0  # kills that left a half-written temporary file behind
        self.expected = None  # (node ids, edge count) of the state on disk
        self.left = 0  # temporary files on disk after the last kill
        self.command_errors = 0

    def argv(self):
        return [
            "--host", "127.0.0.1", "--port", str(self.port), "--data-path", str(self.data),
            "--uuid", self.uuid, "--log-level", "warn",
        ]

    def tail(self):
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def temporaries(self):
        return sorted(self.data.glob(".nodespace.json.*.tmp")) + sorted(
            self.workers.glob(f".worker_{self.uuid}.*.tmp")
        )

    def check_files(self):
        """
        What a kill -9 left: every file whole, at most one temporary per kill.
        """
        state_file = self.data / "nodespace.json"
        if state_file.exists():
            state = json.loads(state_file.read_bytes())
            assert isinstance(state, dict) and isinstance(state["backend"], dict), state
            nodes = {node["id"] for node in state["backend"]["nodes"]}
            self.expected = (nodes, len(state["backend"]["edges"]))
        backup = state_file.with_name("nodespace.json.bu")
        if backup.exists():
            assert isinstance(json.loads(backup.read_bytes())["backend"], dict)
        registration = self.workers / f"worker_{self.uuid}.json"
        if registration.exists():
            assert json.loads(registration.read_bytes())["uuid"] == self.uuid
        assert not list(self.data.glob("nodespace.json.corrupt-*")), "a state was unreadable"
        left = self.temporaries()
        assert len(left) <= self.kills, left
        if len(left) > self.left:
            self.torn += 1
        self.left = len(left)

    def listing(self):
        return sorted(p.name for p in [*self.data.iterdir(), *self.workers.glob(f"*{self.uuid}*")])


@defer.inlineCallbacks
def connect_when_up(port, is_dead, describe, timeout=START_TIMEOUT):
    deadline = reactor.seconds() + timeout
    while True:
        try:
            client = yield connect(reactor, f"ws://127.0.0.1:{port}", timeout=5)
        except (error.ConnectError, ConnectionError):
            pass
        else:
            return client
        if is_dead() or reactor.seconds() > deadline:
            raise AssertionError(f"the worker on {port} never listened\n{describe()}")
        yield sleep(0.01)


def edge_kwargs(edge):
    return dict(zip(("src_nid", "src_ioid", "trg_nid", "trg_ioid"), edge))


@defer.inlineCallbacks
def edit(client, lane, nodes, edges, rng, first_save):
    """
    Change the graph in rounds of pipelined commands, each round ending with
    an explicit save, until the connection drops.

    Every command but C{save} asks for a save of its own (the 1 s save loop),
    C{save} writes at once: the worker is writing most of the time.
    """
    while not client.is_closed:
        calls = []  # (what to remember on success, Deferred)

        def call(note, cmd, **kwargs):
            calls.append((note, client.call(cmd, **kwargs)))

        if len(nodes) < 25:
            call("add", "add_node", id=rng.choice(["add_node", "mul_node"]))
        if nodes:
            nid = rng.choice(nodes)
            value = rng.randint(-1000, 1000)
            call(None, "set_default_value", nid=nid, ioid="a", value=value)
            call(None, "set_io_value", nid=nid, ioid="b", value=value, set_default=True)
            pos = [rng.randint(0, 2000), rng.randint(0, 2000)]
            call(None, "update_node_view", nid=nid, data={"pos": pos})
        if len(nodes) >= 2:
            i, j = sorted(rng.sample(range(len(nodes)), 2))  # forward edges only: no cycles
            edge = (nodes[i], "out", nodes[j], rng.choice("ab"))
            call(edge, "add_edge", replace=True, **edge_kwargs(edge))
        if edges and rng.random() < 0.3:
            edge = rng.choice(sorted(edges))
            edges.discard(edge)
            call(None, "remove_edge", **edge_kwargs(edge))
        if len(nodes) > 15 and rng.random() < 0.3:
            victim = nodes.pop(rng.randrange(len(nodes)))
            for edge in [e for e in edges if victim in (e[0], e[2])]:
                edges.discard(edge)
            call(None, "remove_node", id=victim)
        call("save", "save")
        results = yield defer.DeferredList([d for _, d in calls], consumeErrors=True)
        for (note, _), (ok, value) in zip(calls, results):
            if not ok:
                if value.check(CommandError):
                    lane.command_errors += 1  # e.g. an edge to a node removed meanwhile
                    continue
                if client.is_closed:
                    return
                value.raiseException()
            if note == "add":
                nodes.append(value["id"])
            elif note == "save" and not first_save.called:
                first_save.callback(None)
            elif isinstance(note, tuple):
                edges.add(note)


@defer.inlineCallbacks
def kill_cycle(server, lane, rng, figures):
    pid = yield server.start(lane.argv(), lane.log)
    client = yield connect_when_up(
        lane.port, lambda: server.has_exited(pid), lambda: lane.tail()
    )
    nodes = yield client.call("get_nodes")
    edges = yield client.call("get_edges")
    if lane.expected is not None:
        # The restarted worker serves exactly what the killed one left.
        assert ({n["id"] for n in nodes}, len(edges)) == lane.expected, (
            f"kill {lane.kills}: {lane.listing()}\n{lane.tail()}")
    first_save = defer.Deferred()
    nodes, edges = [n["id"] for n in nodes], {tuple(e) for e in edges}
    editing = edit(client, lane, nodes, edges, rng, first_save)
    yield first_save.addTimeout(10, reactor)
    delay = rng.uniform(0.05, 0.6)
    yield sleep(delay)
    os.kill(pid, signal.SIGKILL)
    lane.kills += 1
    ended = yield server.exited(pid)
    assert ended["signal"] == signal.SIGKILL, (ended, lane.tail())
    yield client.when_closed()
    yield editing
    lane.check_files()
    figures["delays"].append(delay)


@pytest_twisted.inlineCallbacks
def test_kill_9_never_corrupts_the_saved_graph(tmp_path, fork_server, spawn):
    total = int(os.environ.get("FUNCNODES_TW_TEST_KILLS", "200"))
    rng = random.Random(os.environ.get("FUNCNODES_TW_TEST_SEED", "kill-9"))
    lanes = [Lane(i, tmp_path, fork_server.config_dir) for i in range(2)]
    figures = {"delays": []}
    remaining = [total]
    started = time.monotonic()

    @defer.inlineCallbacks
    def run(lane):
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                yield kill_cycle(fork_server, lane, rng, figures)
        except BaseException:
            remaining[0] = 0  # the other lane finishes its cycle and stops
            raise

    outcomes = yield defer.DeferredList([run(lane) for lane in lanes], consumeErrors=True)
    for ok, failure in outcomes:
        if not ok:
            failure.raiseException()
    elapsed = time.monotonic() - started
    kills = sum(lane.kills for lane in lanes)
    assert kills == total

    # Finally a plain `python -m funcnodes_tw` (no fork server) serves what
    # the last kill left behind.
    lane = lanes[0]
    child = spawn("after-kills", launcher_argv(*lane.argv()[:-2]), fork_server.config_dir)
    yield wait_ready(child, lane.port)
    client = yield connect(reactor, f"ws://127.0.0.1:{lane.port}")
    nodes = yield client.call("get_nodes")
    edges = yield client.call("get_edges")
    yield client.close()
    if lane.expected is not None:
        assert ({n["id"] for n in nodes}, len(edges)) == lane.expected
    child.transport.signalProcess("TERM")
    reason = yield child.ended()
    assert isinstance(reason, error.ProcessDone), child.tail()

    torn = sum(lane.torn for lane in lanes)
    temporaries = sum(len(lane.temporaries()) for lane in lanes)
    print(
        f"FIGURES kill -9: {kills} kills in {elapsed:.1f} s ({elapsed / kills * 1000:.0f} ms per "
        f"kill and restart, 2 lanes), 0 corrupt files; {torn} kills left a half-written "
        f"temporary file; {temporaries} temporaries on disk at the end; delays "
        f"{min(figures['delays']) * 1000:.0f}-{max(figures['delays']) * 1000:.0f} ms after "
        f"the first save; final graph {len(nodes)} nodes, {len(edges)} edges; "
        f"{sum(lane.command_errors for lane in lanes)} commands refused"
    )


# endregion
# region signals and stdin


@pytest.mark.parametrize("signame", ["TERM", "INT"])
@pytest.mark.parametrize("runner", ["launcher", "twistd"])
@pytest_twisted.inlineCallbacks
def test_signal_saves_says_stopping_and_cleans_up(tmp_path, spawn, runner, signame):
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = new_uuid()
    port = free_port()
    child = spawn(runner, worker_argv(RUNNERS[runner](), port, data_path, worker_uuid), config_dir)
    yield wait_ready(child, port)
    client = yield connect(reactor, f"ws://127.0.0.1:{port}")
    node = yield client.call("add_node", id="add_node")
    pos = [random.randint(1, 999), random.randint(1, 999)]
    yield client.call("update_node_view", nid=node["id"], data={"pos": pos})

    sent = reactor.seconds()
    child.transport.signalProcess(signame)
    stopping = yield client.wait_for(
        lambda m: m.get("type") == "workerevent" and m.get("event") == "stopping",
        timeout=EXIT_TIMEOUT,
    )
    yield client.when_closed()
    reason = yield child.ended()
    took = reactor.seconds() - sent
    signum = getattr(signal, f"SIG{signame}") if runner == "twistd" else None
    assert exited_cleanly(reason, signum), (reason, child.tail())
    assert took < SHUTDOWN_LIMIT
    assert stopping["data"] == {"data": {}}
    assert client.close_code == 1001, (client.close_code, client.close_reason)

    _, process_file, runstate_file = worker_files(config_dir, worker_uuid)
    yield wait_gone(process_file, runstate_file)
    assert not process_file.exists() and not runstate_file.exists()
    state = json.loads((data_path / "nodespace.json").read_bytes())
    [saved] = state["backend"]["nodes"]
    assert saved["id"] == node["id"] and saved["properties"]["frontend:pos"] == pos
    assert b"Traceback" not in child.out + child.err, child.tail()
    exit_text = "exit 0" if isinstance(reason, error.ProcessDone) else f"killed by SIG{signame}"
    print(f"FIGURES {runner} SIG{signame}: stopped in {took:.3f} s ({exit_text})")


@pytest.mark.parametrize("runner", ["launcher", "twistd"])
@pytest_twisted.inlineCallbacks
def test_exit_on_stdin_close(tmp_path, spawn, runner):
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = new_uuid()
    port = free_port()
    argv = worker_argv(RUNNERS[runner]("--exit-on-stdin-close"), port, data_path, worker_uuid)
    child = spawn(runner, argv, config_dir)
    yield wait_ready(child, port)
    yield sleep(0.2)
    assert child.running, "stdin is still open"

    closed = reactor.seconds()
    child.transport.closeStdin()
    reason = yield child.ended()
    took = reactor.seconds() - closed
    assert isinstance(reason, error.ProcessDone), child.tail()
    assert took < SHUTDOWN_LIMIT
    assert b"Standard input closed" in child.out, child.tail()
    config_file, process_file, runstate_file = worker_files(config_dir, worker_uuid)
    yield wait_gone(process_file, runstate_file)
    assert not process_file.exists() and not runstate_file.exists()
    assert config_file.exists()
    print(f"FIGURES {runner} stdin closed: exit 0 after {took:.3f} s")


@pytest.mark.parametrize("runner", ["launcher", "twistd"])
@pytest_twisted.inlineCallbacks
def test_a_port_in_use_stops_the_worker_at_once(tmp_path, spawn, runner):
    """
    Listening is refused before the reactor runs; the worker must still stop
    instead of hanging with its files claimed.
    """
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = new_uuid()
    held = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    try:
        port = held.getHost().port
        argv = worker_argv(RUNNERS[runner](), port, data_path, worker_uuid)
        child = spawn(runner, argv, config_dir)
        reason = yield child.ended()
    finally:
        yield held.stopListening()
    assert b"Cannot listen" in child.out, child.tail()
    # The launcher exits 1; twistd (in Twisted 26.10) does not pass the
    # service's exit code on and exits 0.
    assert child.exit_code in ((1,) if runner == "launcher" else (0, 1)), (reason, child.tail())
    _, process_file, runstate_file = worker_files(config_dir, worker_uuid)
    assert not process_file.exists() and not runstate_file.exists()


# endregion
# region systemd


class Notifications(protocol.DatagramProtocol):
    """
    The receiving end of C{NOTIFY_SOCKET}, as systemd binds it.
    """

    def __init__(self, port):
        self.port = port
        self.messages = []
        self._waiters = []

    def datagramReceived(self, data, address):
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        fields["_at"] = reactor.seconds()
        if fields.get("READY") == "1":
            fields["_port_accepts"] = accepts(self.port)
        self.messages.append(fields)
        for key, d in list(self._waiters):
            if key in fields:
                self._waiters.remove((key, d))
                d.callback(fields)

    def wait(self, key, timeout=START_TIMEOUT):
        for fields in self.messages:
            if key in fields:
                return defer.succeed(fields)
        d = defer.Deferred()
        self._waiters.append((key, d))
        return d.addTimeout(timeout, reactor)


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def notify_socket():
    folder = tempfile.mkdtemp(prefix="fn-notify-")  # AF_UNIX paths are short
    path = os.path.join(folder, "notify")
    listening = []

    def bind(port):
        notifications = Notifications(port)
        listening.append(reactor.listenUNIXDatagram(path, notifications))
        return path, notifications

    yield bind
    for port in listening:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    shutil.rmtree(folder, ignore_errors=True)


@pytest_twisted.inlineCallbacks
def test_systemd_notify_ready_and_stopping(tmp_path, spawn, notify_socket):
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = new_uuid()
    port = free_port()
    path, notifications = notify_socket(port)
    started = reactor.seconds()
    child = spawn("twistd", worker_argv(twistd_argv(), port, data_path, worker_uuid), config_dir,
                  env={"NOTIFY_SOCKET": path})
    ready = yield notifications.wait("READY")
    assert ready["_port_accepts"], "READY=1 came before the port accepted connections"
    assert ready["STATUS"] == f"listening on ws://127.0.0.1:{port}"
    _, process_file, runstate_file = worker_files(config_dir, worker_uuid)
    assert process_file.read_text() == str(child.pid)
    assert runstate_file.read_text() == "running"
    assert not [m for m in notifications.messages if "STOPPING" in m]

    child.transport.signalProcess("TERM")
    stopping = yield notifications.wait("STOPPING")
    assert stopping["STOPPING"] == "1"
    reason = yield child.ended()
    assert exited_cleanly(reason, signal.SIGTERM), child.tail()
    print(f"FIGURES notify: READY=1 {ready['_at'] - started:.2f} s after spawn")


def unit_files():
    parse = lambda: configparser.ConfigParser(interpolation=None, strict=True)  # noqa: E731
    service, sock = parse(), parse()
    for parser in (service, sock):
        parser.optionxform = str  # systemd keys are case-sensitive
    service.read(UNITS / "funcnodes-worker@.service")
    sock.read(UNITS / "funcnodes-worker@.socket")
    return service, sock


def activated_command(worker_uuid, config_dir, port):
    """
    The unit's own ExecStart and ListenStream, run by systemd-socket-activate
    the way systemd would run them (LISTEN_FDNAMES included).
    """
    service, sock = unit_files()
    argv = shlex.split(service["Service"]["ExecStart"].replace("%i", worker_uuid))
    argv[0] = str(TWISTD)
    listen = sock["Socket"]["ListenStream"]
    host = listen.rsplit(":", 1)[0]
    return [
        shutil.which("systemd-socket-activate"),
        "-l", f"{host}:{port}",
        f"--fdname=funcnodes-worker@{worker_uuid}.socket",
        "-E", f"FUNCNODES_CONFIG_DIR={config_dir}",
        "-E", "PYTHONUNBUFFERED=1",
        *argv,
    ]


@pytest_twisted.inlineCallbacks
def test_systemd_socket_activation(tmp_path, spawn):
    if not shutil.which("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate is not installed")
    config_dir = tmp_path / "config"
    worker_uuid = new_uuid()
    port = free_port()
    child = spawn("activated", activated_command(worker_uuid, config_dir, port), config_dir)
    for _ in range(100):  # the activator reports on stderr
        if b"Listening on" in child.err:
            break
        yield sleep(0.05)
    assert b"Listening on" in child.err, child.tail()
    config_file, process_file, _ = worker_files(config_dir, worker_uuid)
    yield sleep(0.3)
    assert not process_file.exists(), "the worker starts on the first connection, not before"

    connected = reactor.seconds()
    client = yield connect(reactor, f"ws://127.0.0.1:{port}", timeout=START_TIMEOUT)
    client.send_json({"type": "cmd", "cmd": "uuid"})
    yield client.wait_for(lambda msg: True, timeout=10)
    first = reactor.seconds() - connected
    assert client.transcript[0] == {"type": "result", "result": worker_uuid, "id": None}
    registration = json.loads(config_file.read_text())
    assert (registration["host"], registration["port"]) == ("127.0.0.1", port)
    assert process_file.read_text() == str(child.pid), "the activator exec'd the worker in place"
    yield client.close()
    child.transport.signalProcess("TERM")
    reason = yield child.ended()
    assert exited_cleanly(reason, signal.SIGTERM), child.tail()
    print(f"FIGURES socket activation: first answer {first:.2f} s after the first connection")


@pytest_twisted.inlineCallbacks
def test_systemd_socket_activation_without_fd_names_fails_fast(tmp_path, spawn):
    """
    Twisted's C{systemd:} endpoint needs LISTEN_FDNAMES (systemd >= 227 always
    sets it; systemd-socket-activate only with --fdname). Without it the
    worker must say so and stop, not hang.
    """
    if not shutil.which("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate is not installed")
    config_dir = tmp_path / "config"
    worker_uuid = new_uuid()
    port = free_port()
    argv = activated_command(worker_uuid, config_dir, port)
    argv = [a for a in argv if not a.startswith("--fdname")]
    child = spawn("activated", argv, config_dir)
    for _ in range(100):
        if b"Listening on" in child.err:
            break
        yield sleep(0.05)
    probe = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        yield child.ended()
    finally:
        probe.close()
    assert b"Cannot listen" in child.out, child.tail()
    _, process_file, runstate_file = worker_files(config_dir, worker_uuid)
    assert not process_file.exists() and not runstate_file.exists()


def test_unit_files_say_what_the_worker_needs():
    service, sock = unit_files()
    assert service["Service"]["Type"] == "notify"
    assert service["Service"]["NotifyAccess"] in ("main", "all")
    argv = shlex.split(service["Service"]["ExecStart"])
    assert argv[0].endswith("/twistd")
    assert "--nodaemon" in argv or "-n" in argv, "systemd supervises a foreground process"
    assert "--pidfile=" in argv
    assert argv[argv.index("funcnodes-worker") + 1:] == [
        "--uuid", "%i", "--listen", "systemd:domain=INET:index=0",
    ]
    assert "funcnodes-worker@%i.socket" in service["Unit"]["Requires"].split()
    assert sock["Socket"]["ListenStream"]
    # The worker accepts the options the unit gives it.
    from funcnodes_tw.tap import Options

    options = Options()
    options.parseOptions([a.replace("%i", "u1") for a in argv[argv.index("funcnodes-worker") + 1:]])
    assert options["listen"] == "systemd:domain=INET:index=0"


def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (test_unit_files_say_what_the_worker_needs "
                    "still checks the files)")
    service_text = (UNITS / "funcnodes-worker@.service").read_text()
    lines = []
    for line in service_text.splitlines():
        if line.startswith("User="):
            continue  # no such user here
        if line.startswith("ExecStart="):
            line = "ExecStart=" + str(TWISTD) + " " + line.split(None, 1)[1]
        lines.append(line)
    service = tmp_path / "funcnodes-worker@test.service"
    sock = tmp_path / "funcnodes-worker@test.socket"
    service.write_text("\n".join(lines) + "\n")
    shutil.copy(UNITS / "funcnodes-worker@.socket", sock)
    result = subprocess.run(
        [analyze, "verify", str(service), str(sock)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    ours = [l for l in (result.stdout + result.stderr).splitlines() if "funcnodes-worker@" in l]
    if result.returncode != 0 and not ours:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()[:500]}")
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


# endregion
# region the log file


@pytest_twisted.inlineCallbacks
def test_worker_log_has_the_startup_lines(tmp_path, spawn):
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = new_uuid()
    port = free_port()
    child = spawn("worker", worker_argv(launcher_argv(), port, data_path, worker_uuid), config_dir)
    yield wait_ready(child, port)
    # stdout's observer may run first: give worker.log's a moment.
    ui_line = f"Open the UI: http://127.0.0.1:{port}/"
    for _ in range(100):
        log = (data_path / "worker.log").read_text()
        if ui_line in log:
            break
        yield sleep(0.02)
    assert f"Worker {worker_uuid} listening on ws://127.0.0.1:{port}" in log
    assert ui_line in log
    child.transport.signalProcess("TERM")
    yield child.ended()
    assert f"Worker {worker_uuid} stopped" in (data_path / "worker.log").read_text()


@pytest_twisted.inlineCallbacks
def test_log_level_warn_keeps_info_out(tmp_path, spawn):
    """
    The heartbeat watchdog gives a warning without any client: the worker
    stops itself after one silent second.
    """
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = new_uuid()
    argv = worker_argv(launcher_argv("--log-level", "warn", "--required-heartbeat", "1"),
                       free_port(), data_path, worker_uuid)
    child = spawn("worker", argv, config_dir)
    reason = yield child.ended(timeout=START_TIMEOUT)
    assert isinstance(reason, error.ProcessDone), child.tail()
    log = (data_path / "worker.log").read_text()
    assert "No heartbeat for 1.0 s: stopping" in log
    assert "#info]" not in log and "listening on" not in log, log
    assert b"#info]" not in child.out, child.tail()


def test_worker_log_rotates_at_100_kb_keeping_5(tmp_path):
    from funcnodes_tw.logs import ROTATE_LENGTH, ROTATED_FILES, WorkerLog

    log = WorkerLog(tmp_path, LogLevel.info)
    emit = Logger(namespace="test_daemon.rotation")
    log.start()
    try:
        line = "x" * 200
        for i in range(ROTATE_LENGTH * (ROTATED_FILES + 3) // 250):
            emit.info("line {i} {line}", i=i, line=line)
            emit.debug("debug {i}", i=i)
    finally:
        log.stop()
    emit.info("after stop")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["worker.log"] + [f"worker.log.{n}" for n in range(1, ROTATED_FILES + 1)]
    for path in tmp_path.iterdir():
        text = path.read_text()
        assert len(text.encode()) <= ROTATE_LENGTH + 300
        assert "debug " not in text and "after stop" not in text
    # The newest lines are in worker.log, the oldest kept in worker.log.5.
    newest = (tmp_path / "worker.log").read_text().splitlines()[-1]
    oldest = (tmp_path / "worker.log.5").read_text().splitlines()[0]
    assert int(newest.split("line ")[1].split()[0]) > int(oldest.split("line ")[1].split()[0])


# endregion
