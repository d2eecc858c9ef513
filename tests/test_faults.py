"""
Faults the worker must survive: clients that vanish or stop answering, nodes
that raise, hang or eat memory, and a disk that fills up while saving.

In-process workers (L{inprocess.Served}, through its C{start} fixture) where the test needs to look inside
(the hub's clients, the save state, the log); real subprocesses where the
process itself is the point (stopping with a hung node, a memory limit, a
real full file system on a small tmpfs).

A port already in use is covered elsewhere: with an explicit port the worker
exits 1 saying "Cannot listen" (L{test_daemon.test_a_port_in_use_stops_the_worker_at_once},
launcher and twistd), without one it takes the next free port
(L{test_process.test_launcher_without_options_finds_a_free_port}).
"""

import errno
import json
import os
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from inprocess import sleep, start  # noqa: F401 (fixture)
from test_process import (
    EXIT_TIMEOUT,
    free_port,
    launcher_argv,
    spawn,  # noqa: F401 (fixture)
    wait_ready,
    worker_argv,
    worker_files,
)
from wsclient import CommandError, connect

TESTS = Path(__file__).resolve().parent
# Subprocess workers import L{fault_nodes} from the tests folder.
NODES_ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


# region fixtures and helpers


@pytest.fixture
def logged():
    """
    Log events at warn level and above while the test runs, as text.
    """
    events = []

    def observe(event):
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            events.append((event["log_level"], formatEvent(event) or "", event.get("log_failure")))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def errors_in(events):
    return [(text, failure) for level, text, failure in events if level >= LogLevel.error]


class Lane:
    """
    One subprocess worker's identity: port, folders, uuid.
    """

    def __init__(self, root, *prefix):
        self.root = Path(root)
        self.config = self.root / "config"
        self.data = self.root / "data"
        self.uuid = f"faults_{uuidlib.uuid4().hex[:12]}"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.argv = list(prefix) + worker_argv(launcher_argv(), self.port, self.data, self.uuid)
        self.state = self.data / "nodespace.json"
        self.registration, self.process_file, self.runstate = worker_files(self.config, self.uuid)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def nodes_on_disk(path):
    try:
        return sorted(n["id"] for n in json.loads(path.read_text())["backend"]["nodes"])
    except (OSError, ValueError):
        return None


@defer.inlineCallbacks
def until(condition, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        yield sleep(interval)


HANDSHAKE = (
    "GET / HTTP/1.1\r\n"
    "Host: 127.0.0.1:{port}\r\n"
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "\r\n"
)


class RawClient(Protocol):
    """
    A TCP client that speaks just enough WebSocket to misbehave.
    """

    def __init__(self, port, handshake=True):
        self.port = port
        self.handshake = handshake
        self.head = b""
        self.received = 0
        self.upgraded = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        if self.handshake:
            self.transport.write(HANDSHAKE.format(port=self.port).encode())

    def dataReceived(self, data):
        if self.upgraded.called:
            self.received += len(data)
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.head, _, rest = self.head.partition(b"\r\n\r\n")
            self.received += len(rest)  # a first ping may come with the 101
            status = self.head.split(b"\r\n", 1)[0]
            if b" 101 " in status:
                self.upgraded.callback(None)
            else:
                self.upgraded.errback(AssertionError(f"handshake refused: {status!r}"))

    def connectionLost(self, reason):
        self.lost.callback(reason.value)


def raw_connect(port, handshake=True):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    return connectProtocol(endpoint, RawClient(port, handshake))


def masked_text_frame_start(length, sent):
    """
    The first C{sent} payload bytes of a masked text frame of C{length} bytes.
    """
    assert length < 126
    mask = b"\x01\x02\x03\x04"
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"x" * sent))
    return bytes([0x81, 0x80 | length]) + mask + payload


def gone(raw):
    if not raw.lost.called:
        raw.transport.abortConnection()
    return raw.lost


# endregion
# region clients that vanish


@pytest.mark.parametrize("how", ["close", "reset", "mid-handshake"])
@pytest_twisted.inlineCallbacks
def test_a_client_vanishing_mid_message_harms_nobody(start, logged, how):
    """
    Half a frame (or half an upgrade request), then the socket closes (FIN) or
    resets (RST): the worker forgets that client and serves the others.
    """
    worker = yield start()
    other = yield worker.connect()
    hub = worker.service.hub
    raw = yield raw_connect(worker.port, handshake=how != "mid-handshake")
    if how == "mid-handshake":
        raw.transport.write(HANDSHAKE.format(port=worker.port).encode()[:40])
    else:
        yield raw.upgraded
        yield until(lambda: len(hub.clients) == 2, what="the raw client joined")
        raw.transport.write(masked_text_frame_start(100, 30))
    yield sleep(0.1)  # the half frame is in the worker's buffer
    if how == "reset":
        raw.transport.abortConnection()
    else:
        raw.transport.loseConnection()
    yield raw.lost
    yield until(lambda: len(hub.clients) == 1, what="the worker dropped the vanished client")

    assert (yield other.call("uuid")) == "http_w"
    late = yield worker.connect()
    assert (yield late.call("uuid")) == "http_w"
    assert errors_in(logged) == []


# endregion
# region half-open connections


@pytest.mark.parametrize(
    "reading", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["not-reading", "reading"]
)
@pytest_twisted.inlineCallbacks
def test_a_silent_client_is_dropped_by_auto_ping(start, logged, reading):
    """
    A client that completed the handshake and then went silent (a half-open
    connection: the peer vanished without FIN or RST) never answers pings:
    auto-ping drops it within interval + timeout. A live client answering
    pings stays connected all along.

    Autobahn's timers only have whole-second resolution and may fire up to a
    second early (txaio's batched timer truncates C{now + delay} to seconds),
    hence 1 s and 2 s: the ping goes out 0-1 s after the handshake, the
    timeout fires 1-2 s after the ping.
    """
    interval, timeout = 1.0, 2.0
    worker = yield start("--ping-interval", str(interval), "--ping-timeout", str(timeout))
    factory = worker.service.factory
    assert (factory.autoPingInterval, factory.autoPingTimeout) == (interval, timeout)
    live = yield worker.connect()  # Autobahn answers pings by itself
    hub = worker.service.hub
    raw = yield raw_connect(worker.port)
    yield raw.upgraded
    opened = time.monotonic()
    if not reading:
        raw.transport.pauseProducing()
    yield until(lambda: len(hub.clients) == 2, what="the raw client joined")
    yield until(lambda: len(hub.clients) == 1, timeout=interval + timeout + 3,
                what="the silent client dropped")
    took = time.monotonic() - opened
    print(f"FIGURES silent client ({'reading' if reading else 'not reading'}) dropped after "
          f"{took:.2f} s (ping interval {interval} s, timeout {timeout} s)")
    assert took >= interval
    if reading:
        assert raw.received > 0, "pings were sent"
        yield raw.lost
    else:
        yield gone(raw)
    yield sleep(interval + timeout)
    assert not live.is_closed and len(hub.clients) == 1
    assert (yield live.call("uuid")) == "http_w"
    assert errors_in(logged) == []


def test_ping_settings_come_from_options_and_config(tmp_path):
    from funcnodes_tw.tap import Options

    options = Options()
    options.parseOptions(["--data-path", str(tmp_path), "--uuid", "p", "--ping-timeout", "4"])
    assert (options.settings.ping_interval, options.settings.ping_timeout) == (10.0, 4.0)
    from funcnodes_tw import settings

    resolved = settings.resolve({}, {"ping_interval": 2.5})
    assert (resolved.ping_interval, resolved.ping_timeout) == (2.5, 20.0)
    with pytest.raises(ValueError):
        settings.resolve({}, {"ping_timeout": 0})


# endregion
# region nodes that raise, hang or eat memory


def is_event(name, node=None):
    def match(msg):
        return (
            isinstance(msg, dict)
            and msg.get("type") == "nsevent"
            and msg.get("event") == name
            and (node is None or (msg.get("data") or {}).get("node") == node)
        )

    return match


def is_value(node, io):
    def match(msg):
        header = msg.get("header", {}) if msg.get("binary") else {}
        key = (header.get("node"), header.get("io"))
        return header.get("type") == "io_value" and key == (node, io)

    return match


@pytest_twisted.inlineCallbacks
def test_a_raising_node_is_an_error_event_and_nothing_more(start, logged):
    worker = yield start()
    client = yield worker.connect()
    other = yield worker.connect()
    yield client.call("add_shelf", src="fault_nodes")
    nid = (yield client.call("add_node", id="faults.raise"))["id"]
    yield client.call("set_io_value", nid=nid, ioid="message", value="boom")
    for c in (client, other):
        event = yield c.wait_for(is_event("node_trigger_error", nid), timeout=5)
        assert "boom" in json.dumps(event["data"])
    # The worker is fine: both clients are served, other nodes run.
    assert (yield other.call("uuid")) == "http_w"
    add = (yield client.call("add_node", id="add_node"))["id"]
    yield client.call("set_io_value", nid=add, ioid="b", value=2)
    yield client.call("set_io_value", nid=add, ioid="a", value=3)
    yield client.wait_for(is_value(add, "out"), timeout=5)
    assert (yield client.call("get_io_value", nid=add, ioid="out")) == 5
    # ...and it can fail again.
    start_at = len(client.transcript)
    yield client.call("set_io_value", nid=nid, ioid="message", value="again")
    yield client.wait_for(is_event("node_trigger_error", nid), timeout=5, start=start_at)
    assert errors_in(logged) == [], "a node's failure is a warning, not a worker error"
    assert any("boom" in text for level, text, _ in logged)


@pytest_twisted.inlineCallbacks
def test_a_node_that_never_finishes_blocks_nothing(start, logged):
    """
    An async node awaits forever: every client's commands are still answered,
    other nodes run, the hung node can be removed, and the worker stops.
    """
    worker = yield start()
    client = yield worker.connect()
    other = yield worker.connect()
    yield client.call("add_shelf", src="fault_nodes")
    hung = (yield client.call("add_node", id="faults.hang"))["id"]
    yield client.call("set_io_value", nid=hung, ioid="tag", value="forever")
    yield client.wait_for(is_event("triggerstart", hung), timeout=5)
    yield sleep(0.3)
    node = worker.service.worker.nodespace.get_node_by_id(hung)
    assert node.in_trigger
    t0 = time.monotonic()
    for c in (client, other):
        for _ in range(20):
            assert (yield c.call("uuid", timeout=2)) == "http_w"
    took = time.monotonic() - t0
    assert (yield other.call("get_node_status", nid=hung))
    add = (yield other.call("add_node", id="add_node"))["id"]
    yield other.call("set_io_value", nid=add, ioid="b", value=1)
    yield other.call("set_io_value", nid=add, ioid="a", value=41)
    yield other.wait_for(is_value(add, "out"), timeout=5)
    full = yield client.call("full_state")
    assert {n["id"] for n in full["backend"]["nodes"]} == {hung, add}
    print(f"FIGURES 40 uuid round trips beside a hung node: {took * 1000:.0f} ms")
    # A hung trigger holds no trigger request: the drain does not tick beside it.
    triggers = worker.service.triggers
    yield until(lambda: not triggers._call.running, timeout=2, what="the trigger drain idled")
    yield client.call("remove_node", id=hung)
    yield worker.stop()
    assert errors_in(logged) == []


@pytest_twisted.inlineCallbacks
def test_a_hung_node_that_stays_does_not_stop_the_worker_stopping(start):
    worker = yield start()
    client = yield worker.connect()
    yield client.call("add_shelf", src="fault_nodes")
    hung = (yield client.call("add_node", id="faults.hang"))["id"]
    yield client.call("set_io_value", nid=hung, ioid="tag", value="forever")
    yield client.wait_for(is_event("triggerstart", hung), timeout=5)
    t0 = time.monotonic()
    yield worker.stop()
    assert time.monotonic() - t0 < 5
    state = json.loads((worker.data / "nodespace.json").read_text())
    assert [n["id"] for n in state["backend"]["nodes"]] == [hung]


# endregion


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "stop_worker"])
@pytest_twisted.inlineCallbacks
def test_a_worker_process_with_a_hung_node_still_stops(tmp_path, spawn, how):
    lane = Lane(tmp_path)
    child = spawn("hang", lane.argv, lane.config, NODES_ENV)
    yield wait_ready(child, lane.port)
    client = yield connect(reactor, lane.url)
    yield client.call("add_shelf", src="fault_nodes")
    hung = (yield client.call("add_node", id="faults.hang"))["id"]
    yield client.call("set_io_value", nid=hung, ioid="tag", value="forever")
    yield client.wait_for(is_event("triggerstart", hung), timeout=5)
    assert (yield client.call("uuid")) == lane.uuid
    t0 = time.monotonic()
    if how == "SIGTERM":
        child.transport.signalProcess("TERM")
    else:
        assert (yield client.call("stop_worker")) is True
    reason = yield child.ended()
    took = time.monotonic() - t0
    print(f"FIGURES worker with a hung node stopped by {how} in {took:.2f} s")
    assert isinstance(reason, error.ProcessDone), child.tail()
    assert took < 5, child.tail()
    assert not lane.process_file.exists() and not lane.runstate.exists()
    assert nodes_on_disk(lane.state) == [hung]
    assert b"Traceback" not in child.out + child.err, child.tail()


#: Address space of the worker in the memory test: ~300 MB are mapped at start.
MEMORY_LIMIT = 1536 * 1024 * 1024


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_node_eating_memory_leaves_the_worker_alive(tmp_path, spawn):
    """
    Under an address-space limit (C{prlimit --as}, as a container's memory
    limit would be), a node keeps 300 MB, then asks for 4 GB more: the first
    works, the second is the node's C{MemoryError}, and the worker goes on.
    """
    lane = Lane(tmp_path, "prlimit", f"--as={MEMORY_LIMIT}", "--")
    child = spawn("leak", lane.argv, lane.config, NODES_ENV)
    yield wait_ready(child, lane.port)
    client = yield connect(reactor, lane.url)
    yield client.call("add_shelf", src="fault_nodes")
    leak = (yield client.call("add_node", id="faults.leak"))["id"]
    yield client.call("uuid")
    before = rss_mb(child.pid)

    yield client.call("set_io_value", nid=leak, ioid="mb", value=300)
    yield client.wait_for(is_event("triggerdone", leak), timeout=20)
    assert (yield client.call("get_io_value", nid=leak, ioid="out")) == 300
    kept = rss_mb(child.pid)
    assert kept - before > 250

    start_at = len(client.transcript)
    yield client.call("set_io_value", nid=leak, ioid="mb", value=4096)
    yield client.wait_for(is_event("node_trigger_error", leak), timeout=20, start=start_at)
    # funcnodes-core's NodeTriggerError keeps only str(error), which is empty
    # for a MemoryError: the event does not say what failed, core's log does.
    yield until(lambda: b"MemoryError" in child.out + child.err, timeout=5, what="logged")
    after = rss_mb(child.pid)
    print(f"FIGURES leaking node: worker RSS {before:.0f} MB, {kept:.0f} MB with 300 MB kept, "
          f"{after:.0f} MB after a refused 4 GB")
    assert child.running
    assert (yield client.call("uuid")) == lane.uuid
    full = yield client.call("full_state")
    assert [n["id"] for n in full["backend"]["nodes"]] == [leak]
    other = yield connect(reactor, lane.url)
    assert (yield other.call("uuid")) == lane.uuid
    child.transport.signalProcess("TERM")
    reason = yield child.ended()
    assert isinstance(reason, error.ProcessDone), child.tail()


# endregion
# region a full disk


@pytest.fixture
def disk_full(monkeypatch):
    """
    Make C{fsync} of temporary files under C{disk_full["under"]} fail with
    ENOSPC while C{disk_full["full"]} is set: write_atomic's temporary file
    never becomes the saved state, as on a disk that just filled up.
    """
    real = os.fsync
    state = {"full": False, "under": None, "hits": 0}

    def fsync(fd):
        if state["full"] and state["under"] is not None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if path.startswith(str(state["under"])) and path.endswith(".tmp"):
                state["hits"] += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return state


def is_progress(status):
    def match(msg):
        return (
            isinstance(msg, dict) and msg.get("type") == "progress" and msg.get("status") == status
        )

    return match


@pytest_twisted.inlineCallbacks
def test_a_full_disk_keeps_the_graph_in_memory_and_the_file_intact(start, logged, disk_full):
    worker = yield start()
    state_file = worker.data / "nodespace.json"
    disk_full["under"] = worker.data
    client = yield worker.connect()
    first = (yield client.call("add_node", id="add_node"))["id"]
    yield until(lambda: nodes_on_disk(state_file) == [first], what="the first save")
    saved = state_file.read_bytes()

    disk_full["full"] = True
    start_at = len(client.transcript)
    second = (yield client.call("add_node", id="add_node"))["id"]
    report = yield client.wait_for(is_progress("error"), timeout=5, start=start_at)
    assert "No space left on device" in report["message"], report
    assert report["blocking"] is False
    assert state_file.read_bytes() == saved
    assert list(worker.data.glob(".nodespace.json.*.tmp")) == []
    core = worker.service.worker
    assert core.save_requested and "No space left" in core.save_error
    full = yield client.call("full_state")
    assert {n["id"] for n in full["backend"]["nodes"]} == {first, second}
    assert full["progress_state"]["status"] == "error", "new clients see it too"
    with pytest.raises(CommandError, match="No space left on device"):
        yield client.call("save")
    # Retried every second, reported and logged once.
    hits = disk_full["hits"]
    yield sleep(2.5)
    assert disk_full["hits"] >= hits + 2
    assert state_file.read_bytes() == saved
    errors = errors_in(logged)
    assert len(errors) == 1 and "Saving the worker state failed" in errors[0][0], errors
    assert len([m for m in client.transcript[start_at:] if is_progress("error")(m)]) == 1

    disk_full["full"] = False
    start_at = len(client.transcript)
    report = yield client.wait_for(is_progress("success"), timeout=5, start=start_at)
    assert report["message"] == "Worker state saved"
    assert nodes_on_disk(state_file) == sorted([first, second])
    assert not core.save_requested and core.save_error is None
    assert json.loads(state_file.with_name("nodespace.json.bu").read_bytes()) == json.loads(saved)


# endregion


@pytest.fixture
def tiny_disk(tmp_path):
    """
    A 2 MiB tmpfs (needs root; skipped otherwise), unmounted after the test.
    """
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
        capture_output=True, text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder):
    """
    Write a file until the file system is full; return it.
    """
    filler = folder / "filler"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return filler


@pytest.mark.slow
@pytest.mark.parametrize("then", ["space-comes-back", "stop-while-full"])
@pytest_twisted.inlineCallbacks
def test_a_really_full_disk(tiny_disk, spawn, then):
    """
    The worker's config and data on a small tmpfs that fills up: the graph
    stays in memory, the saved file stays whole, clients are told; when
    space comes back the next save lands; a stop on the full disk still ends
    the process and leaves the last good file.
    """
    lane = Lane(tiny_disk)
    child = spawn("full", lane.argv, lane.config, NODES_ENV)
    yield wait_ready(child, lane.port)
    client = yield connect(reactor, lane.url)
    first = (yield client.call("add_node", id="add_node"))["id"]
    yield until(lambda: nodes_on_disk(lane.state) == [first], what="the first save")
    saved = lane.state.read_bytes()

    filler = fill(tiny_disk)
    start_at = len(client.transcript)
    second = (yield client.call("add_node", id="add_node"))["id"]
    report = yield client.wait_for(is_progress("error"), timeout=5, start=start_at)
    assert "No space left on device" in report["message"], report
    yield sleep(1.5)  # a retry or two
    assert lane.state.read_bytes() == saved
    assert list(lane.data.glob(".nodespace.json.*.tmp")) == []
    assert (yield client.call("uuid")) == lane.uuid
    full = yield client.call("full_state")
    assert {n["id"] for n in full["backend"]["nodes"]} == {first, second}

    if then == "space-comes-back":
        filler.unlink()
        yield client.wait_for(is_progress("success"), timeout=5, start=start_at)
        assert nodes_on_disk(lane.state) == sorted([first, second])
        child.transport.signalProcess("TERM")
        reason = yield child.ended()
        assert isinstance(reason, error.ProcessDone), child.tail()
        assert not lane.process_file.exists()
    else:
        t0 = time.monotonic()
        child.transport.signalProcess("TERM")
        reason = yield child.ended(EXIT_TIMEOUT)
        took = time.monotonic() - t0
        print(f"FIGURES stop on a full disk: {reason!r} after {took:.2f} s")
        assert isinstance(reason, error.ProcessDone), child.tail()
        assert took < 5, child.tail()
        assert lane.state.read_bytes() == saved, "the last good state is kept"
        # The stop went all the way (runstate, save and log failures aside).
        assert b"Unhandled error" not in child.out + child.err, child.tail()
        assert b"Saving on shutdown failed" in child.out, child.tail()
        assert not lane.process_file.exists() and not lane.runstate.exists(), child.tail()
        yield client.when_closed()
        assert client.close_code == 1001, child.tail()
        filler.unlink()
        # The next start, with space again, finds that state.
        child = spawn("again", lane.argv, lane.config, NODES_ENV)
        yield wait_ready(child, lane.port)
        client = yield connect(reactor, lane.url)
        full = yield client.call("full_state")
        assert [n["id"] for n in full["backend"]["nodes"]] == [first]
        child.transport.signalProcess("TERM")
        yield child.ended()
