"""
Periodic jobs and the large-message store, driven by a fake clock.

An idle worker must not wake up (the reference polls every 100 ms forever),
saves must only happen when something changed, and the heartbeat must stop
the worker exactly when clients went quiet for too long.
"""

import base64
import json

import asyncio

import funcnodes_core as fn
import pytest
import pytest_twisted
from funcnodes_core import BytesEncdata
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock, deferLater

from funcnodes_tw import commands, loops, wire
from funcnodes_tw.messages import LargeMessageStore
from funcnodes_tw.persistence import WorkerFiles
from funcnodes_tw.settings import Settings
from funcnodes_tw.service import WorkerService
from funcnodes_tw.worker import Worker


class FakeNode:
    """
    A node whose trigger work is scripted: C{work} ticks of pending triggers.
    """

    def __init__(self, work=0, fail=False):
        self.work = work
        self.fail = fail
        self.ticks = 0
        self.in_trigger = False
        self._requests_trigger = False

    def trigger_if_requested(self):
        self.ticks += 1
        if self.fail:
            raise RuntimeError("node broke")
        if self.work:
            self.work -= 1
            return True
        return False


class FakeNodeSpace:
    def __init__(self, *nodes):
        self.nodes = list(nodes)

    def get_node_by_id(self, nid):
        if nid not in range(len(self.nodes)):
            raise ValueError(nid)
        return self.nodes[nid]


def started_drain(clock, *nodes):
    drain = loops.TriggerDrain(FakeNodeSpace(*nodes), clock)
    drain.startService()
    return drain


# region trigger drain


def test_drain_ticks_while_there_is_work_then_sleeps():
    clock = Clock()
    node = FakeNode(work=3)
    drain = started_drain(clock, node)
    assert len(clock.getDelayedCalls()) == 1
    clock.pump([loops.DRAIN_INTERVAL] * 10)
    # Three busy ticks, one that finds nothing: then no timer is left at all.
    assert node.ticks == 4
    assert clock.getDelayedCalls() == []
    drain.stopService()


def test_idle_drain_does_not_wake_up():
    clock = Clock()
    node = FakeNode()
    started_drain(clock, node)
    clock.advance(loops.DRAIN_INTERVAL)
    assert clock.getDelayedCalls() == []
    clock.advance(3600)
    assert node.ticks == 1


def test_kick_restarts_an_idle_drain_once():
    clock = Clock()
    node = FakeNode()
    drain = started_drain(clock, node)
    clock.advance(loops.DRAIN_INTERVAL)
    node.work = 2
    drain.kick()
    drain.kick()
    assert len(clock.getDelayedCalls()) == 1
    clock.pump([loops.DRAIN_INTERVAL] * 5)
    assert node.ticks == 1 + 3
    assert clock.getDelayedCalls() == []


def test_a_request_waiting_for_a_running_trigger_keeps_the_drain_awake():
    clock = Clock()
    node = FakeNode()
    node.in_trigger = node._requests_trigger = True
    started_drain(clock, node)
    clock.pump([loops.DRAIN_INTERVAL] * 5)
    assert node.ticks == 5
    node.in_trigger = False
    clock.pump([loops.DRAIN_INTERVAL] * 5)
    assert node.ticks == 6
    assert clock.getDelayedCalls() == []


def test_a_running_trigger_alone_lets_the_drain_sleep():
    # A graph at work (a chain sleeping its pretrigger delays) runs its own
    # triggers: ticking beside it only wakes the worker up.
    clock = Clock()
    node = FakeNode()
    node.in_trigger = True
    started_drain(clock, node)
    clock.pump([loops.DRAIN_INTERVAL] * 5)
    assert node.ticks == 1
    assert clock.getDelayedCalls() == []


def test_only_a_node_holding_a_request_starts_the_drain():
    clock = Clock()
    busy, idle = FakeNode(), FakeNode()
    drain = started_drain(clock, busy, idle)
    clock.advance(loops.DRAIN_INTERVAL)
    for nid in (1, 7, None, {"id": "a node_added event"}):
        drain.node_event(nid)
    assert clock.getDelayedCalls() == []
    busy._requests_trigger = True
    drain.node_event(0)
    assert len(clock.getDelayedCalls()) == 1
    drain.stopService()


def test_kick_before_start_and_after_stop_does_nothing():
    clock = Clock()
    node = FakeNode(work=100)
    drain = loops.TriggerDrain(FakeNodeSpace(node), clock)
    drain.kick()
    assert clock.getDelayedCalls() == []
    drain.startService()
    clock.advance(loops.DRAIN_INTERVAL)
    drain.stopService()
    assert clock.getDelayedCalls() == []
    drain.kick()
    assert clock.getDelayedCalls() == []


def test_a_failing_node_does_not_stop_the_others():
    clock = Clock()
    broken, fine = FakeNode(fail=True), FakeNode(work=2)
    started_drain(clock, broken, fine)
    clock.pump([loops.DRAIN_INTERVAL] * 5)
    assert fine.ticks == 3 and broken.ticks == 3


def test_node_events_reach_the_drain(tmp_path):
    """
    The service wires node-space events to the drain.
    """
    clock = Clock()
    files = WorkerFiles("loopworker", root=tmp_path)
    worker = Worker(files, "loopworker", clock=clock)
    service = WorkerService(worker, clock, Settings(max_message_size=1024 * 1024))
    service.triggers.startService()
    clock.advance(loops.DRAIN_INTERVAL)
    node = worker.nodespace.add_node_instance(_Gated())
    node.emit("after_request_trigger")
    assert not service.triggers._call.running, "no request held"
    node._requests_trigger = True
    node.emit("after_request_trigger")
    assert service.triggers._call.running
    service.triggers.stopService()


def test_a_running_graph_s_other_events_skip_the_drain_check(tmp_path):
    """
    Only events after which a node may hold a request look its node up:
    most of a running graph's events (four of seven per node) need none.
    """
    worker = Worker(WorkerFiles("checks", root=tmp_path), "checks", clock=Clock())
    checked = []
    worker.on_node_event = checked.append
    node = worker.nodespace.add_node_instance(_Gated())
    for event in ("before_request_trigger", "before_trigger", "after_trigger", "triggerfast"):
        node.emit(event)
    assert checked == []
    node.emit("after_request_trigger")
    node.emit("triggerdone")
    assert checked == [node.uuid, node.uuid]
    worker.nodespace.clear()


_GATE = []


@fn.NodeDecorator("tw_test_gated", name="Gated")
async def _gated(a: int) -> int:
    """
    Returns C{a} once the test opens the gate (an asyncio event).
    """
    await _GATE[-1].wait()
    return a


_Gated = _gated


@pytest_twisted.ensureDeferred
async def test_a_request_made_while_the_node_runs_is_run_after_it(tmp_path):
    from twisted.internet import reactor

    worker = Worker(WorkerFiles("gated", root=tmp_path), "gated", clock=reactor)
    triggers = loops.TriggerDrain(worker.nodespace, reactor)
    worker.on_node_event = triggers.node_event
    triggers.startService()
    _GATE.append(asyncio.Event())
    node = worker.nodespace.add_node_instance(_Gated(pretrigger_delay=0))
    try:
        while triggers._call.running:  # the tick that startService asks for
            await deferLater(reactor, loops.DRAIN_INTERVAL, lambda: None)
        node.inputs["a"].value = 1
        await deferLater(reactor, 0, lambda: None)
        assert node.in_trigger and not triggers._call.running, "ran at once, no drain"
        node.inputs["a"].value = 2  # busy: funcnodes-core only notes the request
        assert triggers._call.running
        _GATE[-1].set()
        for _ in range(200):
            if node.outputs["out"].value == 2 and not node.in_trigger:
                break
            await deferLater(reactor, loops.DRAIN_INTERVAL, lambda: None)
        assert node.outputs["out"].value == 2
    finally:
        _GATE[-1].set()
        triggers.stopService()
        worker.nodespace.clear()


# endregion
# region timers


class FakeWorker:
    def __init__(self, clock):
        self.clock = clock
        self.save_requested = False
        self.saves = []
        self.stops = []
        self.last_heartbeat = clock.seconds()

    def save(self):
        self.save_requested = False
        self.saves.append(self.clock.seconds())
        return succeed(None)

    def stop(self):
        self.stops.append(self.clock.seconds())


def test_saver_writes_a_second_after_a_request_and_sleeps_otherwise():
    clock = Clock()
    worker = FakeWorker(clock)
    saver = loops.saver(worker, clock)
    saver.startService()
    clock.pump([loops.SAVE_INTERVAL] * 10)
    assert worker.saves == []
    assert clock.getDelayedCalls() == [], "an idle saver keeps a timer"
    worker.save_requested = True
    saver.kick()
    saver.kick()  # a burst of requests: one timer
    assert len(clock.getDelayedCalls()) == 1
    clock.pump([loops.SAVE_INTERVAL] * 10)
    assert worker.saves == [11 * loops.SAVE_INTERVAL]
    assert clock.getDelayedCalls() == []
    saver.stopService()


def test_saver_retries_every_second_while_saving_fails():
    clock = Clock()
    worker = FakeWorker(clock)
    failures = [OSError("No space left on device")] * 3

    def save():
        worker.saves.append(clock.seconds())
        if failures:
            return fail(failures.pop())  # the worker asks for the save again
        worker.save_requested = False
        return succeed(None)

    worker.save = save
    saver = loops.saver(worker, clock)
    saver.startService()
    worker.save_requested = True
    saver.kick()
    clock.pump([loops.SAVE_INTERVAL] * 10)
    assert worker.saves == [1.0, 2.0, 3.0, 4.0]
    assert clock.getDelayedCalls() == []
    saver.stopService()


def test_a_failing_timer_keeps_running():
    clock = Clock()
    runs = []

    def flaky():
        runs.append(clock.seconds())
        raise OSError("disk full")

    timer = loops.timer("flaky", 1.0, flaky, clock)
    timer.startService()
    clock.pump([1.0] * 3)
    assert runs == [0, 1, 2, 3]
    timer.stopService()


def heartbeat_service(tmp_path, clock, required):
    files = WorkerFiles("hbworker", root=tmp_path)
    worker = Worker(files, "hbworker", clock=clock)
    service = WorkerService(worker, clock, Settings(max_message_size=1024 * 1024, required_heartbeat=required))
    stops = []
    worker.stop = lambda: stops.append(clock.seconds())
    timer = service.getServiceNamed("heartbeat")
    timer.startService()
    return worker, timer, stops


def test_heartbeat_stops_the_worker_after_silence_and_not_before(tmp_path):
    clock = Clock()
    worker, timer, stops = heartbeat_service(tmp_path, clock, required=10)
    clock.pump([0.5] * 20)  # t = 10: exactly the limit is still fine
    assert stops == []
    commands.run(worker, "heartbeat", {})
    clock.pump([0.5] * 20)  # t = 20: 10 s since the heartbeat
    assert stops == []
    clock.pump([0.5] * 2)
    assert stops and stops[0] == 21
    timer.stopService()


def test_heartbeat_silence_counts_from_the_start_not_from_construction(tmp_path):
    """
    Loading packages and the graph may take longer than the heartbeat limit.
    """
    clock = Clock()
    files = WorkerFiles("hbworker", root=tmp_path)
    worker = Worker(files, "hbworker", clock=clock)
    service = WorkerService(worker, clock, Settings(max_message_size=1024 * 1024, required_heartbeat=2))
    stops = []
    worker.stop = lambda: stops.append(clock.seconds())
    clock.advance(30)  # a slow start
    service.prepare()
    timer = service.getServiceNamed("heartbeat")
    timer.startService()
    assert stops == []
    clock.pump([0.1] * 25)
    assert stops and stops[0] > 32
    timer.stopService()


def test_heartbeats_keep_the_worker_alive(tmp_path):
    clock = Clock()
    worker, timer, stops = heartbeat_service(tmp_path, clock, required=3)
    for _ in range(50):
        clock.advance(2.5)
        commands.run(worker, "heartbeat", {})
    assert stops == []
    timer.stopService()


def test_no_heartbeat_timer_unless_asked(tmp_path):
    clock = Clock()
    files = WorkerFiles("hbworker", root=tmp_path)
    service = WorkerService(Worker(files, "hbworker", clock=clock), clock, Settings(max_message_size=1024))
    with pytest.raises(KeyError):
        service.getServiceNamed("heartbeat")


# endregion
# region large messages


def store(clock, **kwargs):
    return LargeMessageStore(clock, base_url=lambda: "http://127.0.0.1:9382", **kwargs)


def test_store_keeps_and_serves_messages():
    messages = store(Clock())
    msgid = messages.put(b"payload")
    assert messages.url(msgid) == f"http://127.0.0.1:9382/message/{msgid}"
    assert _read(messages, msgid) == b"payload"
    assert _read(messages, "no-such-id") is None
    assert messages.size == len(b"payload")


def test_store_evicts_the_oldest_when_full():
    messages = store(Clock(), max_bytes=100)
    first = messages.put(b"a" * 40)
    second = messages.put(b"b" * 40)
    third = messages.put(b"c" * 40)
    assert _read(messages, first) is None
    assert _read(messages, second) == b"b" * 40
    assert _read(messages, third) == b"c" * 40
    assert messages.size == 80


def test_store_bytes_never_grow_past_the_bound():
    messages = store(Clock(), max_bytes=1000)
    for n in range(200):
        messages.put(bytes([n % 256]) * 37)
        assert messages.size <= 1000
    assert messages.size == sum(e.size for e in messages._entries.values())


def test_store_expires_after_ttl():
    clock = Clock()
    messages = store(clock, ttl=60.0)
    msgid = messages.put(b"x")
    clock.advance(59.0)
    messages.expire()
    assert messages.size == 1
    clock.advance(1.0)
    assert _read(messages, msgid) is None
    messages.expire()
    assert messages.size == 0


def test_store_grace_after_first_fetch():
    clock = Clock()
    messages = store(clock, ttl=60.0, grace=5.0)
    msgid = messages.put(b"x")
    clock.advance(10)
    assert _read(messages, msgid) == b"x"
    clock.advance(4.9)
    assert _read(messages, msgid) == b"x", "a retry within the grace period works"
    clock.advance(0.1)
    assert _read(messages, msgid) is None, "a second fetch does not extend the grace"


def test_store_grace_never_extends_the_ttl():
    clock = Clock()
    messages = store(clock, ttl=60.0, grace=5.0)
    msgid = messages.put(b"x")
    clock.advance(58)
    assert _read(messages, msgid) == b"x"
    clock.advance(2)
    assert _read(messages, msgid) is None


def test_service_expires_parked_messages(tmp_path):
    clock = Clock()
    files = WorkerFiles("msgworker", root=tmp_path)
    service = WorkerService(Worker(files, "msgworker", clock=clock), clock, Settings(max_message_size=1024))
    timer = service.getServiceNamed("messages")
    timer.startService()
    clock.advance(loops.EXPIRE_INTERVAL)  # one look at startup
    assert clock.getDelayedCalls() == [], "no message parked, yet a timer"
    service.store.put(b"z" * 100)
    clock.pump([loops.EXPIRE_INTERVAL] * 13)
    assert service.store.size == 0
    assert clock.getDelayedCalls() == [], "the store is empty, yet a timer"
    timer.stopService()


# endregion


def _read(store, msgid):
    message = store.open(msgid)
    return None if message is None else b"".join(message.chunks())


def test_store_spills_large_entries_to_a_file_and_deletes_it(tmp_path):
    """
    Big entries wait on disk, not in RAM, and their file goes with the entry.
    """
    clock = Clock()
    messages = LargeMessageStore(
        clock, lambda: "http://h:1", spill_size=10, folder=tmp_path, resident_bytes=0
    )
    small, big = messages.put(b"tiny"), messages.put(b"x" * 100)
    assert [p.name.startswith("fn-message-") for p in tmp_path.iterdir()] == [True]
    assert _read(messages, small) == b"tiny" and _read(messages, big) == b"x" * 100
    clock.advance(messages.grace + 0.1)
    messages.expire()
    assert list(tmp_path.iterdir()) == []
    assert messages.size == 0


def _value_reply(data, msgid):
    return wire.dumps_lazy(wire.result(BytesEncdata(data, True, "text/plain"), msgid))


def test_store_holds_the_same_value_once_and_serves_each_reply(tmp_path):
    """
    Replies with equal raw data (the same value fetched twice) share it in
    RAM; each is still served with its own id, base64'd while sent.
    """
    messages = LargeMessageStore(Clock(), lambda: "http://h:1", spill_size=10, folder=tmp_path)
    value = bytes(range(256)) * 40
    first = messages.put(_value_reply(value, "a"))
    held = messages.resident
    second = messages.put(_value_reply(bytes(value), "b"))
    assert held > len(value)
    assert messages.resident - held < 100, "the second copy is not held"
    assert list(tmp_path.iterdir()) == []
    for msgid, reply_id in [(first, "a"), (second, "b")]:
        reply = json.loads(_read(messages, msgid))
        assert reply["id"] == reply_id
        assert base64.b64decode(reply["result"]["data"]) == value
    messages.clear()
    assert (messages.size, messages.resident, messages._held) == (0, 0, {})


def test_store_moves_the_oldest_big_entries_to_disk(tmp_path):
    """
    Past C{resident_bytes}, older big entries go to disk first: the newest is
    the one a client is about to fetch.
    """
    clock = Clock()
    messages = LargeMessageStore(
        clock, lambda: "http://h:1", spill_size=100, folder=tmp_path, resident_bytes=2500
    )
    small = messages.put(b"s" * 50)
    old = messages.put(_value_reply(b"o" * 1200, "old"))
    new = messages.put(_value_reply(b"n" * 1200, "new"))
    assert messages.resident <= 2500
    assert [e.path is None for e in messages._entries.values()] == [True, False, True]
    assert json.loads(_read(messages, old))["id"] == "old"
    assert json.loads(_read(messages, new))["id"] == "new"
    assert _read(messages, small) == b"s" * 50
    newest = messages.put(_value_reply(b"m" * 3000, "too big for RAM"))
    assert messages._entries[newest].path is not None
    assert json.loads(_read(messages, newest))["id"] == "too big for RAM"
    clock.advance(messages.ttl)
    messages.expire()
    assert (messages.size, messages.resident, list(tmp_path.iterdir())) == (0, 0, [])
