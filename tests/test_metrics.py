"""
C{GET /metrics}: scraped over real sockets and read with prometheus_client's
own parser, before and after real traffic; its token; turning it off; a
host application's registry.
"""

from time import perf_counter

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer

from funcnodes_tw import commands
from funcnodes_tw.metrics import Histogram, Metrics, Read
from funcnodes_tw.protocol import frame_header, payload_length
from funcnodes_tw.service import create
from inprocess import TOKEN, failing, sleeper, start, texts  # noqa: F401 (fixture)
from test_faults import is_event


def samples(text):
    """
    C{{(name, frozenset(labels)): value}} of an exposition text.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


@pytest_twisted.inlineCallbacks
def scrape(worker, **kw):
    response = yield worker.http.get(worker.url("/metrics"), **kw)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    return samples((yield response.text()))


def value(found, name, **labels):
    return found.get((name, frozenset(labels.items())), 0)


@pytest_twisted.inlineCallbacks
def test_counters_move_with_real_traffic(start, monkeypatch):
    texts(monkeypatch)
    failing(monkeypatch)
    worker = yield start(name="metrics")
    client = yield worker.connect()  # sends one uuid
    before = yield scrape(worker)
    assert value(before, "funcnodes_clients") == 1
    assert value(before, "process_resident_memory_bytes") > 10e6
    assert value(before, "process_open_fds") > 0

    for _ in range(5):
        yield client.call("uuid")
    client.send_json({"type": "cmd", "cmd": "test_text", "kwargs": {"size": 1_200_000}, "id": 1})
    yield client.wait_for(lambda message: message.get("type") == "large_message")
    with pytest.raises(Exception):
        yield client.call("test_fail")
    with pytest.raises(Exception):
        yield client.call("no such command")
    yield client.call("save")
    yield client.call("add_shelf", src="fault_nodes")
    nid = (yield client.call("add_node", id="faults.raise"))["id"]
    yield client.call("set_io_value", nid=nid, ioid="message", value="boom")
    yield client.wait_for(is_event("node_trigger_error", nid), timeout=5)
    after = yield scrape(worker)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("funcnodes_commands_total", command="uuid", outcome="ok") == 5
    assert moved("funcnodes_command_duration_seconds_count", command="uuid") == 5
    assert moved("funcnodes_command_duration_seconds_bucket", command="uuid", le="+Inf") == 5
    assert moved("funcnodes_commands_total", command="test_fail", outcome="error") == 1
    assert moved("funcnodes_commands_total", command="unknown", outcome="error") == 1
    assert moved("funcnodes_commands_total", command="save", outcome="ok") == 1
    assert moved("funcnodes_saves_total") >= 1
    assert value(after, "funcnodes_save_failures_total") == 0
    assert moved("funcnodes_save_duration_seconds_count") == moved("funcnodes_saves_total")
    assert moved("funcnodes_sent_messages_total", kind="large") == 1
    assert moved("funcnodes_sent_bytes_total", kind="large") > 1_200_000
    assert moved("funcnodes_sent_messages_total", kind="json") >= 9
    assert moved("funcnodes_sent_bytes_total", kind="json") > 9 * 20
    assert moved("funcnodes_node_triggers_total") >= 1
    assert moved("funcnodes_node_trigger_errors_total") == 1
    assert value(after, "funcnodes_client_queue_max_bytes") == 0
    assert value(after, "funcnodes_large_message_store_bytes") > 1_200_000
    assert value(after, "funcnodes_process_pool_busy") == 0
    assert value(after, "funcnodes_reactor_stalls_total") == 0
    assert 0 <= value(after, "funcnodes_reactor_lag_seconds") < 1


@pytest_twisted.inlineCallbacks
def test_messages_and_bytes_sent_are_what_the_client_received(start):
    """
    Each connection counts what it sends; a closed one's counts stay in
    the totals. Bytes are the messages' payloads, as the client gets them.
    """
    worker = yield start(name="sent")
    client = yield worker.connect()
    yield client.wait_quiet()
    received = []
    proto = client._proto
    on_message = proto.onMessage
    proto.onMessage = lambda payload, binary: (
        received.append((binary, len(payload))), on_message(payload, binary)
    )
    before = yield scrape(worker)
    for _ in range(3):
        yield client.call("uuid")
    yield client.call("uuid", as_bytes=True)
    client.send_json({"type": "ping"})  # the pong is a prepared frame
    yield client.wait_for(lambda message: message.get("type") == "pong")
    yield client.call("add_shelf", src="fault_nodes")  # broadcasts, prepared too
    yield client.wait_quiet()
    after = yield scrape(worker)
    yield client.close()
    closed = yield scrape(worker)

    json_frames = [size for binary, size in received if not binary]
    binary_frames = [size for binary, size in received if binary]
    assert len(json_frames) >= 6 and len(binary_frames) == 1
    for found in (after, closed):
        def moved(name, kind):
            return value(found, name, kind=kind) - value(before, name, kind=kind)

        assert moved("funcnodes_sent_messages_total", "json") == len(json_frames)
        assert moved("funcnodes_sent_bytes_total", "json") == sum(json_frames)
        assert moved("funcnodes_sent_messages_total", "binary") == 1
        assert moved("funcnodes_sent_bytes_total", "binary") == binary_frames[0]


@pytest_twisted.inlineCallbacks
def test_a_command_waiting_behind_a_slow_one_is_timed_from_its_read(start, monkeypatch):
    sleeper(monkeypatch)
    worker = yield start(name="waiting")
    client = yield worker.connect()
    before = yield scrape(worker)
    slow = client.call("test_sleep", seconds=0.3)
    quick = client.call("uuid")  # runs once test_sleep has replied
    yield defer.gatherResults([slow, quick])
    after = yield scrape(worker)

    def moved(command, le):
        name = "funcnodes_command_duration_seconds_bucket"
        return value(after, name, command=command, le=le) - value(
            before, name, command=command, le=le
        )

    for command in ("test_sleep", "uuid"):
        assert moved(command, "0.25") == 0, command
        assert moved(command, "0.5") == 1, command


def test_the_replies_of_one_read_are_timed_together():
    metrics = Metrics(commands.COMMANDS)
    read = Read(perf_counter() - 0.03)
    read.replied += ["uuid", "add_node", "uuid"]
    metrics.read_done(read)
    assert not read.open
    uuid, add_node = metrics.command_seconds["uuid"], metrics.command_seconds["add_node"]
    assert sum(uuid.counts) == 2 and sum(add_node.counts) == 1
    assert uuid.counts.index(2) == add_node.counts.index(1)
    assert uuid.sum == 2 * add_node.sum >= 0.06
    assert metrics.commands == {("uuid", "ok"): 2, ("add_node", "ok"): 1}


def test_the_payload_length_of_a_prepared_frame_is_read_from_its_header():
    for size in (0, 125, 126, 65535, 65536):
        frame = frame_header(size, False) + b"x" * size
        assert payload_length(frame) == size


@pytest_twisted.inlineCallbacks
def test_clients_cut_off_are_counted_by_reason(start):
    worker = yield start("--max-incoming-size", "1000", name="cutoff")
    client = yield worker.connect()
    client.send_text("x" * 5000)  # more than a client may send: 1009
    yield client.when_closed()
    found = yield scrape(worker)
    assert value(found, "funcnodes_clients_cut_off_total", reason="message_too_big") == 1
    assert value(found, "funcnodes_clients") == 0


@pytest_twisted.inlineCallbacks
def test_metrics_need_the_token_and_health_does_not(start):
    worker = yield start("--token", TOKEN, name="guarded")
    response = yield worker.new_http().get(worker.url("/metrics"))
    assert response.code == 401
    found = yield scrape(worker, headers={"Authorization": f"Bearer {TOKEN}"})
    assert "funcnodes_clients" in {name for name, _ in found}
    response = yield worker.new_http().get(worker.url("/health"))
    assert response.code == 200
    assert TOKEN not in (yield response.text())


@pytest_twisted.inlineCallbacks
def test_without_metrics_there_is_no_endpoint_and_no_counting(start):
    worker = yield start("--no-metrics", name="nometrics")
    yield worker.connect()
    response = yield worker.http.get(worker.url("/metrics"))
    assert response.code == 404
    assert worker.service.metrics is None and worker.service.factory.metrics is None
    response = yield worker.http.get(worker.url("/health"))
    assert response.code == 200


def test_a_host_registry_gets_the_metrics_labelled_by_worker(tmp_path):
    registry = CollectorRegistry()
    service = create("host", data_path=tmp_path / "d", workers_dir=tmp_path / "w", registry=registry)
    service.metrics.command("uuid", "ok", 0)
    found = samples(generate_latest(registry).decode())
    assert value(found, "funcnodes_commands_total", worker="host", command="uuid", outcome="ok") == 1
    assert value(found, "funcnodes_clients", worker="host") == 0
    # Not the process metrics: the host's registry has its own, if it wants them.
    assert not any(name.startswith("process_") for name, _ in found)


def test_command_names_from_clients_do_not_become_labels():
    metrics = Metrics(commands.COMMANDS)
    for name in ("uuid", "bogus", ["a", "list"], None):
        metrics.command(name, "ok", 0)
    assert metrics.commands == {("uuid", "ok"): 1, ("unknown", "ok"): 3}


def test_histogram_buckets_are_cumulative_with_inf():
    histogram = Histogram((0.1, 1))
    for seconds in (0.05, 0.1, 0.5, 7):
        histogram.observe(seconds)
    assert histogram.buckets() == [("0.1", 2), ("1", 3), ("+Inf", 4)]
    assert histogram.sum == pytest.approx(7.65)
