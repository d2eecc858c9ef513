"""
The worker as real processes on 127.0.0.1: twistd, the launcher, signals.

This is how the FuncNodes manager and users run it, so the files on disk, the
liveness probe and the exit codes are checked here, end to end. Every child is
killed in teardown, whatever the test did.
"""

import json
import os
import re
import socket
import sys
import uuid as uuidlib
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import deferLater

from wsclient import connect

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
START_PORT, END_PORT = 9382, 9582
#: Generous bounds: only there so that a broken worker fails instead of hanging.
START_TIMEOUT = 30
EXIT_TIMEOUT = 15


@pytest.fixture(autouse=True)
def _clean(clean_reactor):
    yield


class Child(protocol.ProcessProtocol):
    """
    A child process: its output, and a Deferred for its end.
    """

    def __init__(self, name):
        self.name = name
        self.out = bytearray()
        self.err = bytearray()
        self.reason = None
        self._ended = []
        self._output_waiters = []

    def outReceived(self, data):
        self.out += data
        self._check_output()

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.reason = reason.value
        for d in self._ended:
            d.callback(self.reason)
        for pattern, d in self._output_waiters:
            if not d.called:
                d.errback(RuntimeError(f"{self.name} exited\n{self.tail()}"))

    @property
    def running(self):
        return self.reason is None

    @property
    def exit_code(self):
        return getattr(self.reason, "exitCode", None)

    def ended(self, timeout=EXIT_TIMEOUT):
        if not self.running:
            return defer.succeed(self.reason)
        d = defer.Deferred()
        self._ended.append(d)
        return d.addTimeout(timeout, reactor)

    def wait_output(self, pattern, timeout=START_TIMEOUT):
        """
        Fire with the first match of C{pattern} (bytes regex) on stdout.
        """
        d = defer.Deferred()
        self._output_waiters.append((re.compile(pattern), d))
        self._check_output()
        if not self.running and not d.called:
            d.errback(RuntimeError(f"{self.name} exited\n{self.tail()}"))
        return d.addTimeout(timeout, reactor)

    def _check_output(self):
        for pattern, d in list(self._output_waiters):
            match = pattern.search(self.out)
            if match and not d.called:
                self._output_waiters.remove((pattern, d))
                d.callback(match)

    def tail(self):
        return (
            f"--- {self.name} stdout ---\n{bytes(self.out[-3000:]).decode(errors='replace')}\n"
            f"--- {self.name} stderr ---\n{bytes(self.err[-3000:]).decode(errors='replace')}"
        )


def child_env(config_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCNODES_")}
    env["FUNCNODES_CONFIG_DIR"] = str(config_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def spawn(tmp_path):
    """
    Start children (with extra environment variables if asked); teardown
    kills whatever still runs and waits for it.
    """
    children = []

    def start(name, argv, config_dir, env=None):
        child = Child(name)
        environment = child_env(config_dir)
        environment.update(env or {})
        child.transport = reactor.spawnProcess(
            child, argv[0], argv, env=environment, path=str(tmp_path)
        )
        child.pid = child.transport.pid
        children.append(child)
        return child

    yield start
    for child in children:
        if child.running:
            try:
                child.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            pytest_twisted.blockon(child.ended())


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_argv(prefix, port, data_path, worker_uuid):
    return prefix + [
        "--host", "127.0.0.1",
        "--port", str(port),
        "--data-path", str(data_path),
        "--uuid", worker_uuid,
    ]


def launcher_argv(*options):
    return [sys.executable, "-m", "funcnodes_tw", *options]


def wait_ready(child, port):
    """
    Fire once the child logged that it listens on C{port}; by then the
    registration file and the runstate are written. (The port itself accepts
    connections a moment earlier, which is why it is not polled.)
    """
    return child.wait_output(rb"listening on ws://127\.0\.0\.1:%d\b" % port)


@defer.inlineCallbacks
def wait_gone(*paths):
    """
    The files a stopping worker removes are gone by the time it exited, but
    give the file system a moment for good measure.
    """
    for _ in range(20):
        if not any(p.exists() for p in paths):
            return
        yield deferLater(reactor, 0.05, lambda: None)


def worker_files(config_dir, worker_uuid):
    workers = Path(config_dir) / "workers"
    return (
        workers / f"worker_{worker_uuid}.json",
        workers / f"worker_{worker_uuid}.p",
        workers / f"worker_{worker_uuid}.runstate",
    )


@pytest_twisted.inlineCallbacks
def test_twistd_worker_lifecycle(tmp_path, spawn):
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    pidfile = tmp_path / "twistd.pid"
    worker_uuid = f"tw_{uuidlib.uuid4().hex[:12]}"
    port = free_port()
    twistd = [str(TWISTD), "-n", f"--pidfile={pidfile}", "funcnodes-worker"]
    argv = worker_argv(twistd, port, data_path, worker_uuid)
    child = spawn("twistd", argv, config_dir)
    yield wait_ready(child, port)

    assert pidfile.read_text().strip() == str(child.pid)
    config_file, process_file, runstate_file = worker_files(config_dir, worker_uuid)
    config = json.loads(config_file.read_text())
    assert config["type"] == "WSWorker"
    assert (config["uuid"], config["host"], config["port"]) == (worker_uuid, "127.0.0.1", port)
    assert config["data_path"] == str(data_path)
    assert process_file.read_text() == str(child.pid)
    assert runstate_file.read_text() == "running"

    # The manager's liveness probe: no id, and the very first frame is the answer.
    client = yield connect(reactor, f"ws://127.0.0.1:{port}")
    client.send_json({"type": "cmd", "cmd": "uuid"})
    yield client.wait_for(lambda msg: True, timeout=10)
    assert client.transcript[0] == {"type": "result", "result": worker_uuid, "id": None}

    stopped = yield client.call("stop_worker")
    assert stopped is True
    reason = yield child.ended()
    assert isinstance(reason, error.ProcessDone), child.tail()
    yield client.when_closed()
    yield wait_gone(process_file, runstate_file)
    assert not process_file.exists()
    assert not runstate_file.exists()
    assert not pidfile.exists()
    assert config_file.exists(), "the registration survives a stop"
    assert (data_path / "nodespace.json").exists()
    assert b"Traceback" not in child.out + child.err, child.tail()


@pytest_twisted.inlineCallbacks
def test_launcher_without_options_finds_a_free_port(tmp_path, spawn):
    config_dir = tmp_path / "config"
    # Hold the default port, so the launcher must move on to the next free one.
    try:
        held = reactor.listenTCP(START_PORT, protocol.Factory(), interface="127.0.0.1")
    except error.CannotListenError:
        held = None  # something else already holds it: just as good
    try:
        child = spawn("launcher", launcher_argv(), config_dir)
        match = yield child.wait_output(rb"listening on ws://127\.0\.0\.1:(\d+)")
        port = int(match[1])
        assert (START_PORT if held is None else START_PORT + 1) <= port <= END_PORT
        client = yield connect(reactor, f"ws://127.0.0.1:{port}")
        worker_uuid = yield client.call("uuid")
        yield client.close()
    finally:
        if held is not None:
            yield held.stopListening()

    config_file, process_file, _ = worker_files(config_dir, worker_uuid)
    assert json.loads(config_file.read_text())["port"] == port
    assert process_file.read_text() == str(child.pid)
    assert (config_dir / "workers" / f"worker_{worker_uuid}").is_dir(), "default data path"
    child.transport.signalProcess("TERM")
    reason = yield child.ended()
    assert isinstance(reason, error.ProcessDone), child.tail()


@pytest.mark.parametrize(
    "options, complaint",
    [
        (["--bogus"], b"--bogus"),
        (["--port", "notaport"], b"notaport"),
        (["--uuid", "../../etc"], b"--uuid"),
        (["--required-heartbeat", "-1"], b"positive"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_launcher_bad_option_gives_usage(tmp_path, spawn, options, complaint):
    child = spawn("launcher", launcher_argv(*options), tmp_path / "config")
    yield child.ended()
    assert child.exit_code == 2, child.tail()
    assert child.err.startswith(b"Usage: funcnodes-tw [options]\n"), child.tail()
    last = child.err.rstrip().splitlines()[-1]
    assert last.startswith(b"funcnodes-tw: ") and complaint in last, child.tail()
    assert b"Traceback" not in child.err + child.out, child.tail()
    assert not list((tmp_path / "config").glob("workers/*")), "nothing was started"


@pytest_twisted.inlineCallbacks
def test_sigterm_saves_the_graph(tmp_path, spawn):
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = f"tw_{uuidlib.uuid4().hex[:12]}"
    port = free_port()
    argv = worker_argv(launcher_argv(), port, data_path, worker_uuid)

    child = spawn("first", argv, config_dir)
    yield wait_ready(child, port)
    client = yield connect(reactor, f"ws://127.0.0.1:{port}")
    node = yield client.call("add_node", id="add_node")
    yield client.call("update_node_view", nid=node["id"], data={"pos": [120, 45]})
    # No wait for the 1 s save timer: SIGTERM itself must save.
    child.transport.signalProcess("TERM")
    yield client.when_closed()
    reason = yield child.ended()
    assert isinstance(reason, error.ProcessDone), child.tail()
    _, process_file, runstate_file = worker_files(config_dir, worker_uuid)
    yield wait_gone(process_file, runstate_file)
    assert not process_file.exists() and not runstate_file.exists()

    child = spawn("second", argv, config_dir)
    yield wait_ready(child, port)
    client = yield connect(reactor, f"ws://127.0.0.1:{port}")
    nodes = yield client.call("get_nodes", with_frontend=True)
    yield client.close()
    assert [(n["id"], n["node_id"]) for n in nodes] == [(node["id"], "add_node")]
    assert nodes[0]["frontend"]["pos"] == [120, 45]
    child.transport.signalProcess("TERM")
    yield child.ended()



@pytest_twisted.inlineCallbacks
def test_launcher_runs_nodes_on_uvloop(tmp_path, spawn):
    pytest.importorskip("uvloop")
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    port = free_port()
    argv = worker_argv(launcher_argv("--uvloop"), port, data_path, "tw_uvloop")
    child = spawn("uvloop", argv, config_dir)
    yield wait_ready(child, port)
    assert b"Running on uvloop" in child.out, child.tail()

    client = yield connect(reactor, f"ws://127.0.0.1:{port}")
    add = (yield client.call("add_node", id="add_node"))["id"]
    yield client.call("set_io_value", nid=add, ioid="b", value=2)
    yield client.call("set_io_value", nid=add, ioid="a", value=3)

    def preview_of_out(msg):
        header = msg.get("header", {}) if msg.get("binary") else {}
        return header.get("type") == "io_value" and (header.get("node"), header.get("io")) == (
            add,
            "out",
        )

    yield client.wait_for(preview_of_out, timeout=10)  # the node ran as a task on uvloop
    assert (yield client.call("get_io_value", nid=add, ioid="out")) == 5
    child.transport.signalProcess("TERM")
    yield client.when_closed()
    reason = yield child.ended()
    assert isinstance(reason, error.ProcessDone), child.tail()
    assert b"Traceback" not in child.out + child.err, child.tail()
