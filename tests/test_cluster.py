"""
Heavy nodes on a Dask cluster (funcnodes_tw.cluster): the settings, and a
worker (in this process, L{inprocess.Served}) beside real C{dask scheduler}
and C{dask worker} processes on 127.0.0.1, through each failure: a dask
worker killed mid-task, no scheduler at start, the scheduler lost mid-run,
a node removed or the worker stopped mid-task, a large result.

The dask workers import the test nodes from C{tests/cluster_nodes.py}
(C{PYTHONPATH}). Every wait is bounded; every process is stopped at the end.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage

from funcnodes_tw import aio, isolation, metrics, persistence
from funcnodes_tw.tap import Options
from inprocess import sleep, start  # noqa: F401 (fixture)
from test_isolation import is_value, value_of
from workers import WorkerProcess, free_port

distributed = pytest.importorskip("distributed")
from funcnodes_tw import cluster  # noqa: E402  (needs distributed)

TESTS = Path(__file__).resolve().parent
PY = sys.executable


# region settings


def options(tmp_path, monkeypatch, *args, config=None):
    monkeypatch.setattr(persistence, "workers_dir", lambda: tmp_path / "workers")
    if config is not None:
        path = tmp_path / "workers" / "worker_c.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
    parsed = Options()
    parsed.parseOptions(["--uuid", "c", "--data-path", str(tmp_path / "data"), *args])
    return parsed.settings


def test_cluster_settings_from_the_command_line_and_the_config(tmp_path, monkeypatch):
    plain = options(tmp_path, monkeypatch)
    assert (plain.cluster, plain.cluster_nodes, plain.cluster_fallback) == (None, None, "error")
    config = {
        "cluster": "tcp://10.0.0.1:8786",
        "cluster_nodes": ["funcnodes_sklearn.*"],
        "cluster_fallback": "local",
    }
    from_config = options(tmp_path, monkeypatch, config=config)
    assert from_config.cluster == "tcp://10.0.0.1:8786"
    assert from_config.cluster_nodes == ["funcnodes_sklearn.*"]
    assert from_config.cluster_fallback == "local"
    both = options(tmp_path, monkeypatch, "--cluster", "tls://sched.example:9000", config=config)
    assert both.cluster == "tls://sched.example:9000"


@pytest.mark.parametrize(
    "args, config, message",
    [
        (["--cluster", "sched:8786"], None, "tcp://host:8786"),
        (["--cluster", "tcp://sched"], None, "tcp://host:8786"),
        ([], {"cluster": 8786}, "tcp://host:8786"),
        ([], {"cluster_nodes": "funcnodes_sklearn.*"}, "list of node id patterns"),
        ([], {"cluster_nodes": [""]}, "list of node id patterns"),
        ([], {"cluster_fallback": "thread"}, "error, local"),
    ],
)
def test_bad_cluster_settings_are_usage_errors(tmp_path, monkeypatch, args, config, message):
    with pytest.raises(usage.UsageError, match=message):
        options(tmp_path, monkeypatch, *args, config=config)


def test_a_cluster_without_distributed_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "distributed" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(usage.UsageError, match=r"pip install 'funcnodes-tw\[cluster\]'"):
        options(tmp_path, monkeypatch, "--cluster", "tcp://127.0.0.1:8786")
    # Without a cluster, distributed is not needed.
    assert options(tmp_path, monkeypatch).cluster is None


def test_without_a_cluster_dask_is_never_imported(tmp_path):
    script = (
        "import sys\n"
        "from funcnodes_tw.tap import Options, makeService\n"
        "o = Options()\n"
        f"o.parseOptions(['--uuid', 'nd', '--data-path', {str(tmp_path / 'd')!r}])\n"
        "makeService(o)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))\n"
    )
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    out = subprocess.run([PY, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# endregion
# region dask processes


class Dask:
    """
    A C{dask scheduler} and C{dask worker}s, each a process, on 127.0.0.1 or
    in a network namespace (C{netns}, at C{host}); the workers import the
    test nodes (and see C{extra_path} first).
    """

    def __init__(self, tmp_path, host="127.0.0.1"):
        self.base = tmp_path / "dask"
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"tcp://{host}:{self.port}"
        self.host = host
        self.scheduler = None
        self.workers = []
        self.count = 0

    @defer.inlineCallbacks
    def _start(self, name, argv, port, host, netns=None, extra_path=None, env=None):
        self.count += 1
        name = f"{name}{self.count}"
        folder = self.base / name
        folder.mkdir()
        path = [str(p) for p in (extra_path, TESTS) if p] + [os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)), **(env or {}))
        if netns is not None:
            argv = [shutil.which("ip"), "netns", "exec", netns, *argv]
        proc = WorkerProcess(name, reactor, argv, env, port, folder, folder, name, self.base)
        proc.host = host
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=1)
        deadline = time.monotonic() + 60
        while True:
            if not proc.running or time.monotonic() > deadline:
                yield proc.stop()
                raise RuntimeError(f"{name} not listening on {host}:{port}\n{proc.output_tail()}")
            try:
                connection = yield endpoint.connect(Factory.forProtocol(Protocol))
            except (ConnectError, defer.TimeoutError):
                yield sleep(0.2)
            else:
                connection.transport.loseConnection()
                return proc

    @defer.inlineCallbacks
    def start_scheduler(self, netns=None, env=None):
        argv = [PY, "-m", "distributed.cli.dask_scheduler", "--host", self.host]
        argv += ["--port", str(self.port), "--no-dashboard"]
        self.scheduler = yield self._start("scheduler", argv, self.port, self.host, netns, env=env)

    @defer.inlineCallbacks
    def start_worker(self, extra_path=None, host="127.0.0.1", netns=None):
        port = free_port()
        name = f"worker{self.count + 1}"
        argv = [PY, "-m", "distributed.cli.dask_worker", self.address, "--host", host]
        argv += ["--worker-port", str(port), "--nthreads", "1", "--no-nanny", "--no-dashboard"]
        argv += ["--name", name, "--local-directory", str(self.base / f"{name}-space")]
        worker = yield self._start("worker", argv, port, host, netns, extra_path)
        self.workers.append(worker)
        return worker

    def worker_address(self, worker):
        return f"tcp://{worker.host}:{worker.port}"

    def stop(self):
        running = [p for p in [*self.workers, self.scheduler] if p is not None]
        return defer.gatherResults([p.stop() for p in running], consumeErrors=True)


@pytest.fixture
def dask(tmp_path, monkeypatch):
    """
    C{yield dask(workers=1)}: a scheduler and that many workers, all stopped
    after the test. Retries and timeouts of the cluster service are short.
    """
    monkeypatch.setattr(cluster, "RETRY_DELAY", 0.3)
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 2.0)
    monkeypatch.setattr(cluster, "WATCH_INTERVAL", 0.2)
    made = []

    @defer.inlineCallbacks
    def _dask(workers=1, scheduler=True):
        processes = Dask(tmp_path)
        made.append(processes)
        if scheduler:
            yield processes.start_scheduler()
        for _ in range(workers):
            yield processes.start_worker()
        return processes

    yield _dask
    for processes in made:
        pytest_twisted.blockon(processes.stop())


@defer.inlineCallbacks
def wait_until(predicate, timeout=30, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        yield sleep(0.05)


@defer.inlineCallbacks
def connected(served, workers, timeout=60):
    """
    The worker's cluster service, once it sees C{workers} dask workers.
    """
    service = served.service.getServiceNamed("cluster")
    yield wait_until(lambda: service.connected, timeout, "a connection to the scheduler")
    yield aio.as_deferred(asyncio.wait_for(service.client.wait_for_workers(workers), timeout))
    return service


@defer.inlineCallbacks
def run_node(client, node_id, timeout=60, **inputs):
    """
    Add a node and set its inputs; fire with (node id, message index) once set.
    """
    nid = (yield client.call("add_node", id=node_id))["id"]
    start = len(client.transcript)
    for name, value in inputs.items():
        yield client.call("set_io_value", nid=nid, ioid=name, value=value)
    return nid, start


def output(client, nid, start=0, timeout=60):
    return client.wait_for(is_value(nid, "out"), timeout=timeout, start=start).addCallback(
        value_of
    )


def trigger_error(nid):
    def match(msg):
        return (
            msg.get("type") == "nsevent"
            and msg.get("event") == "node_trigger_error"
            and msg["data"].get("node") == nid
        )

    return match


def progress_texts(client, nid):
    return [
        m["data"]["info"].get("prefix")
        for m in client.transcript
        if m.get("type") == "nsevent"
        and m.get("event") == "progress"
        and m["data"].get("node") == nid
    ]


def marked(path):
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


# endregion
# region running on the cluster


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_separate_process_nodes_run_on_a_dask_worker(start, dask):  # noqa: F811
    procs = yield dask(workers=1)
    served = yield start("--cluster", procs.address, name="on")
    service = yield connected(served, 1)
    client = yield served.connect()
    yield client.call("add_shelf", src="cluster_nodes")
    nid, at = yield run_node(client, "cluster_test.double", x=21)
    ran = yield output(client, nid, at)
    (worker,) = procs.workers
    assert ran == {"pid": worker.pid, "worker": procs.worker_address(worker), "value": 42}
    assert isolation.current_pool().pids() == []  # nothing ran in the local pool
    # Its progress said where it went, then went idle.
    yield client.wait_for(lambda m: progress_texts(client, nid)[-1:] == ["idle"], timeout=10)
    assert f"queued on dask scheduler {procs.address}" in progress_texts(client, nid)
    # The versions match: no error was reported.
    assert (yield aio.as_deferred(service.check_versions())) == []
    assert not [m for m in client.transcript if m.get("type") == "error_event"]
    # A node without separate_process still runs in the worker.
    local, at = yield run_node(client, "cluster_test.local", x=1)
    assert (yield output(client, local, at))["pid"] == os.getpid()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_cluster_nodes_patterns_send_other_nodes_there(start, dask):  # noqa: F811
    procs = yield dask(workers=1)
    served = yield start(
        "--cluster", procs.address, name="patterns", config={"cluster_nodes": ["cluster_test.loc*"]}
    )
    yield connected(served, 1)
    client = yield served.connect()
    yield client.call("add_shelf", src="cluster_nodes")
    nid, at = yield run_node(client, "cluster_test.local", x=5)
    ran = yield output(client, nid, at)
    assert ran == {"pid": procs.workers[0].pid, "worker": procs.worker_address(procs.workers[0]),
                   "value": 5}
    # Once the worker stops, the class runs where funcnodes-core said again.
    import cluster_nodes

    assert cluster.send_to_cluster(cluster_nodes.local) is None  # already routed
    yield served.stop()
    node = cluster_nodes.local()
    node.inputs["x"].value = 3
    yield aio.as_deferred(node)
    assert node.outputs["out"].value == {"pid": os.getpid(), "worker": None, "value": 3}


def test_nodes_that_cannot_be_routed_stay_in_the_worker():
    import funcnodes_core as fn

    class Own(fn.Node):
        node_id = "cluster_test.own"

        async def func(self):
            return None

    @fn.NodeDecorator("cluster_test.takes_node")
    def takes_node(x: int, node: fn.Node = None) -> int:
        return x

    assert cluster.send_to_cluster(Own) is None
    assert cluster.send_to_cluster(takes_node) is None


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_version_mismatch_is_reported_once(start, dask, tmp_path):  # noqa: F811
    # The dask worker finds a funcnodes-core 9.9.9 before the real one.
    fake = tmp_path / "fake"
    info = fake / "funcnodes_core-9.9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: funcnodes-core\nVersion: 9.9.9\n")
    procs = yield dask(workers=1)
    served = yield start("--cluster", procs.address, name="mismatch")
    client = yield served.connect()
    service = yield connected(served, 1)
    assert (yield aio.as_deferred(service.check_versions())) == []
    # A dask worker joins with another version: compared when it is seen.
    odd = yield procs.start_worker(extra_path=fake)
    found = yield client.wait_for(lambda m: m.get("type") == "error_event", timeout=60)
    assert f"{procs.worker_address(odd)}: funcnodes-core 9.9.9 (here " in found["error"]
    assert procs.worker_address(procs.workers[0]) not in found["error"]
    assert service.address in found["error"]
    state = served.service.worker.progress_state
    assert state["status"] == "error" and "funcnodes-core 9.9.9" in state["message"]
    yield sleep(3 * cluster.WATCH_INTERVAL)
    assert len([m for m in client.transcript if m.get("type") == "error_event"]) == 1


# endregion
# region failures


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_killed_dask_worker_reruns_the_task_elsewhere(start, dask, tmp_path):  # noqa: F811
    procs = yield dask(workers=2)
    served = yield start("--cluster", procs.address, name="kill")
    yield connected(served, 2)
    client = yield served.connect()
    yield client.call("add_shelf", src="cluster_nodes")
    marker = tmp_path / "started"
    nid, at = yield run_node(client, "cluster_test.slow", seconds=2.0, marker=str(marker), x=6)
    yield wait_until(lambda: marked(marker), 60, "the task's start")
    (first,) = marked(marker)
    victim = next(w for w in procs.workers if w.pid == first)
    survivor = next(w for w in procs.workers if w is not victim)
    # The node's progress says where it runs, before and after the kill.
    running = f"running on dask worker {procs.worker_address(victim)}"
    yield wait_until(lambda: running in progress_texts(client, nid), 10, "the first place")
    os.kill(victim.pid, 9)
    ran = yield output(client, nid, at)
    assert f"running on dask worker {procs.worker_address(survivor)}" in progress_texts(client, nid)
    assert ran["value"] == 7
    assert ran["pid"] == survivor.pid and marked(marker) == [first, survivor.pid]
    assert not [m for m in client.transcript if trigger_error(nid)(m)]


@pytest.mark.slow
@pytest.mark.parametrize("fallback", ["error", "local"])
@pytest_twisted.inlineCallbacks
def test_no_scheduler_at_start(start, dask, fallback):  # noqa: F811
    procs = yield dask(workers=0, scheduler=False)
    served = yield start(
        "--cluster", procs.address, name=fallback, config={"cluster_fallback": fallback}
    )
    client = yield served.connect()  # the worker serves
    yield client.call("add_shelf", src="cluster_nodes")
    nid, at = yield run_node(client, "cluster_test.double", x=2)
    if fallback == "error":
        failed = yield client.wait_for(trigger_error(nid), timeout=30, start=at)
        assert f"No connection to the dask scheduler at {procs.address}" in failed["data"]["error"]
    else:
        ran = yield output(client, nid, at)
        assert ran["value"] == 4 and ran["pid"] in isolation.current_pool().pids()
    # The scheduler comes: the worker connects without a restart.
    yield procs.start_scheduler()
    yield procs.start_worker()
    yield connected(served, 1)
    at = len(client.transcript)
    yield client.call("set_io_value", nid=nid, ioid="x", value=3)
    ran = yield output(client, nid, at)
    assert ran["value"] == 6 and ran["pid"] == procs.workers[0].pid


@pytest_twisted.inlineCallbacks
def test_stopping_while_the_scheduler_does_not_answer(start, recwarn):  # noqa: F811
    # A port that takes connections and never speaks: the client is still
    # connecting when the worker stops, and is closed, not left to the collector.
    import gc
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        served = yield start("--cluster", address, name="silent")
        service = served.service.getServiceNamed("cluster")
        yield wait_until(lambda: [o for o in gc.get_objects() if isinstance(o, distributed.Client)],
                         10, "a client connecting")
        began = time.monotonic()
        yield served.stop()
        assert time.monotonic() - began < 5
        assert service.client is None
        gc.collect()
        yield sleep(0.1)
        gc.collect()
        clients = [o for o in gc.get_objects() if isinstance(o, distributed.Client)]
        assert all(c.status == "closed" for c in clients), [c.status for c in clients]
        never_awaited = [str(w.message) for w in recwarn if "never awaited" in str(w.message)]
        assert never_awaited == []
    finally:
        silent.close()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_the_scheduler_lost_mid_run(start, dask, tmp_path):  # noqa: F811
    procs = yield dask(workers=1)
    served = yield start("--cluster", procs.address, name="lost")
    service = yield connected(served, 1)
    client = yield served.connect()
    yield client.call("add_shelf", src="cluster_nodes")
    marker = tmp_path / "started"
    nid, at = yield run_node(client, "cluster_test.slow", seconds=10.0, marker=str(marker), x=1)
    yield wait_until(lambda: marked(marker), 60, "the task's start")
    procs.scheduler._transport.signalProcess("KILL")
    yield procs.scheduler.when_ended()
    failed = yield client.wait_for(trigger_error(nid), timeout=20, start=at)
    assert f"The dask scheduler at {procs.address} was lost" in failed["data"]["error"]
    assert (yield client.call("uuid")) == served.uuid  # still answering
    assert not service.connected
    # A dask worker without a nanny stops with its scheduler (once its thread
    # is done); both come back, as systemd would restart them, and the next
    # trigger runs there.
    yield procs.start_scheduler()
    yield procs.start_worker()
    # The client reconnects by itself, or the service makes a new one.
    yield connected(served, 1)
    at = len(client.transcript)
    yield client.call("set_io_value", nid=nid, ioid="seconds", value=0.1)
    ran = yield output(client, nid, at)
    assert ran["value"] == 2 and ran["worker"] == procs.worker_address(procs.workers[-1])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["remove_node", "stop"])
@pytest_twisted.inlineCallbacks
def test_a_node_removed_or_the_worker_stopped_cancels_the_task(
    start, dask, tmp_path, how  # noqa: F811
):
    procs = yield dask(workers=1)
    served = yield start("--cluster", procs.address, name=how)
    service = yield connected(served, 1)
    client = yield served.connect()
    yield client.call("add_shelf", src="cluster_nodes")
    marker = tmp_path / "started"
    nid, at = yield run_node(client, "cluster_test.slow", seconds=60.0, marker=str(marker), x=1)
    yield wait_until(lambda: marked(marker), 60, "the task's start")
    # The gauge /metrics shows (inputs set one by one may have started a call each).
    assert service.in_flight >= 1 and metrics.cluster_tasks() == service.in_flight
    # A client of the test's own watches the scheduler.
    watcher = yield aio.as_deferred(
        distributed.Client(procs.address, asynchronous=True, set_as_default=False)
    )
    try:
        busy = yield aio.as_deferred(watcher.processing())
        assert any(busy.values()), busy
        began = time.monotonic()
        if how == "remove_node":
            yield client.call("remove_node", id=nid)
        else:
            yield served.stop()
            assert time.monotonic() - began < 10
        for _ in range(100):
            busy = yield aio.as_deferred(watcher.processing())
            if not any(busy.values()):
                break
            yield sleep(0.1)
        assert not any(busy.values()), f"still on the cluster: {busy}"
        yield wait_until(lambda: service.in_flight == 0, 10, "the calls to end")
    finally:
        yield aio.as_deferred(watcher.close())


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_large_result_comes_once_through_dask(start, dask):  # noqa: F811
    import cluster_nodes

    procs = yield dask(workers=1)
    served = yield start("--cluster", procs.address, name="large")
    service = yield connected(served, 1)
    size = 100 * 1024 * 1024
    tracemalloc.start()
    try:
        array = yield aio.as_deferred(service.run(cluster_nodes.big, (100,), {}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert array.shape == (size,) and array[0] == 7 and array[-1] == 9
    assert int(array.sum()) == 7 * (size - 1) + 9
    # One copy here while it arrived (and no pickled one beside it).
    print(f"\npeak traced memory while the result came: {peak / size:.2f}x its size")
    assert peak < 1.5 * size, f"peak {peak / size:.2f}x the result"
    # The dask worker dropped its copy.
    assert not service.client.futures
    for _ in range(100):
        stored = yield aio.as_deferred(service.client.has_what())
        if not any(stored.values()):
            break
        yield sleep(0.05)
    assert not any(stored.values()), stored


# endregion
# region a little network of its own


class Network:
    """
    Three network namespaces on a bridge of their own (10.213.N.0/24), the
    root namespace at .1 on the bridge; 20 ms of latency (tc netem) on each
    namespace's link where the kernel has netem. Everything is removed by
    L{remove}, also after a failure half-way.
    """

    NAMES = ("sched", "a", "b")

    def __init__(self):
        self.tag = f"{os.getpid() % 100000}"
        self.subnet = f"10.213.{os.getpid() % 250}"
        self.bridge = f"fnb{self.tag}"
        self.namespaces = {}
        self.hosts = {}
        self.links = {}
        self.latency = None

    def _ip(self, *args, netns=None):
        prefix = ["ip", "netns", "exec", netns] if netns else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, timeout=20)

    def make(self):
        taken = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        if self.subnet + "." in taken:
            pytest.skip(f"{self.subnet}.0/24 is in use here")
        self._ip("ip", "link", "add", self.bridge, "type", "bridge")
        self._ip("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        self._ip("ip", "link", "set", self.bridge, "up")
        netem = []
        for i, name in enumerate(self.NAMES):
            netns, outside, inside = f"fn{self.tag}{name}", f"fnh{self.tag}{i}", f"fnn{self.tag}{i}"
            self._ip("ip", "netns", "add", netns)
            self.namespaces[name] = netns
            self._ip("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self.links[name] = outside
            self._ip("ip", "link", "set", outside, "master", self.bridge)
            self._ip("ip", "link", "set", outside, "up")
            self._ip("ip", "link", "set", inside, "netns", netns)
            host = self.hosts[name] = f"{self.subnet}.{i + 2}"
            self._ip("ip", "addr", "add", f"{host}/24", "dev", inside, netns=netns)
            self._ip("ip", "link", "set", inside, "up", netns=netns)
            self._ip("ip", "link", "set", "lo", "up", netns=netns)
            try:
                self._ip("tc", "qdisc", "add", "dev", inside, "root", "netem", "delay", "20ms",
                         netns=netns)
            except subprocess.CalledProcessError as exc:
                netem.append(exc.stderr.strip())
        self.latency = None if netem else "20ms"
        return netem

    def cut(self, name):
        self._ip("ip", "link", "set", self.links[name], "down")

    def remove(self):
        for netns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=20)
        for link in self.links.values():  # gone with their namespace's peer, normally
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=20)


@pytest.fixture
def network():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no ip command (iproute2)")
    net = Network()
    try:
        missing = net.make()
    except subprocess.CalledProcessError as exc:
        net.remove()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip() or exc}")
    if missing:
        import warnings

        warnings.warn(f"no tc netem in this kernel ({missing[0]}): the links have no latency")
    yield net
    net.remove()
    left = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert net.bridge not in left and f"fnh{net.tag}" not in left


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_dask_worker_cut_off_mid_task_in_namespaces(
    start, dask, network, tmp_path, record_property  # noqa: F811 (dask: short timeouts)
):
    """
    The scheduler and two dask workers each in a namespace of their own; the
    worker here reaches them over the bridge. The link of the dask worker
    running the node is cut: the scheduler gives up on it after its
    worker-ttl and the node completes on the other one.
    """
    record_property("latency", network.latency or "none (no netem)")
    procs = Dask(tmp_path, host=network.hosts["sched"])
    try:
        yield procs.start_scheduler(
            netns=network.namespaces["sched"],
            env={"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "3s"},
        )
        for name in ("a", "b"):
            yield procs.start_worker(host=network.hosts[name], netns=network.namespaces[name])
        served = yield start("--cluster", procs.address, name="netns")
        yield connected(served, 2)
        client = yield served.connect()
        yield client.call("add_shelf", src="cluster_nodes")
        marker = tmp_path / "started"
        nid, at = yield run_node(client, "cluster_test.slow", seconds=3.0, marker=str(marker), x=8)
        yield wait_until(lambda: marked(marker), 60, "the task's start")
        (first,) = marked(marker)
        victim = next(w for w in procs.workers if w.pid == first)
        survivor = next(w for w in procs.workers if w is not victim)
        network.cut("a" if victim is procs.workers[0] else "b")
        began = time.monotonic()
        ran = yield output(client, nid, at, timeout=90)
        record_property("seconds_to_finish_after_the_cut", round(time.monotonic() - began, 2))
        assert ran == {"pid": survivor.pid, "worker": procs.worker_address(survivor), "value": 9}
        assert marked(marker) == [first, survivor.pid]
        assert (yield client.call("uuid")) == served.uuid
    finally:
        yield procs.stop()


# endregion
# region the real UI


@pytest.mark.browser
@pytest.mark.slow
def test_the_ui_shows_a_result_computed_on_a_dask_worker(tmp_path):
    """
    The real UI on a worker started with --cluster: a heavy node added and
    set in the page shows the value and the address of the dask worker that
    computed it.
    """
    from test_browser import CHROMIUM, _drive_ui
    from uidriver import run_in_thread, stop_process, wait_for_port, ws_command

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed")
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    scheduler, dask_worker, port = free_port(), free_port(), free_port()
    address = f"tcp://127.0.0.1:{scheduler}"
    commands = {
        "scheduler": ["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                      "--port", str(scheduler), "--no-dashboard"],
        "dask-worker": ["distributed.cli.dask_worker", address, "--host", "127.0.0.1",
                        "--worker-port", str(dask_worker), "--nthreads", "1", "--no-nanny",
                        "--no-dashboard", "--local-directory", str(tmp_path / "space")],
        "worker": ["funcnodes_tw", "--host", "127.0.0.1", "--port", str(port), "--data-path",
                   str(tmp_path / "data"), "--uuid", "ui-cluster", "--cluster", address],
    }
    ports = {"scheduler": scheduler, "dask-worker": dask_worker, "worker": port}
    procs = []
    try:
        for name, argv in commands.items():
            with open(tmp_path / f"{name}.log", "wb") as out:
                procs.append(subprocess.Popen([PY, "-m", *argv], env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
            wait_for_port(ports[name], procs[-1], timeout=60)
        log = tmp_path / "worker.log"
        deadline = time.monotonic() + 60
        while "Connected to the dask scheduler" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        ws_command(port, "add_shelf", src="cluster_nodes")

        def scenario(ui, expect, url, shot):
            ui.page.goto(url)
            ui.open_library()
            expect(ui.shelf("cluster tests")).to_be_visible()
            node = ui.place_node("cluster_test.double", "Double remotely")
            ui.set_input(node, "x", "21")
            out = ui.output_value(node, "out")
            # The preview, as the UI shows it: {\"value\":42,\"worker\":\"tcp://...
            expect(out).to_contain_text('\\"value\\":42,', timeout=30_000)
            expect(out).to_contain_text(f"tcp://127.0.0.1:{dask_worker}")
            shot("31-computed-on-a-dask-worker")
            # A slower one: while it runs, its progress line says where.
            ui.open_library()
            slow = ui.add_node("cluster_test.slow", "Slow remotely")
            ui.close_library()
            ui.move_node(slow, 0.4, 0.7)
            ui.set_input(slow, "seconds", "4")
            ui.paste_input(slow, "marker", str(tmp_path / "started"))
            ui.set_input(slow, "x", "1")
            where = slow.get_by_text(f"running on dask worker tcp://127.0.0.1:{dask_worker}")
            expect(where).to_be_visible(timeout=15_000)
            shot("32-running-on-a-dask-worker")
            expect(ui.output_value(slow, "out")).to_contain_text('\\"value\\":2,', timeout=30_000)

        url = f"http://127.0.0.1:{port}/"
        run_in_thread(_drive_ui, CHROMIUM, url, tmp_path, scenario, timeout=120)
    finally:
        for proc in reversed(procs):
            stop_process(proc)


# endregion
