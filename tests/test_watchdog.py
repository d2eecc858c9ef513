"""
A reactor that stops turning: the stall detector names the node that holds
it, and systemd's watchdog pings stop. Real reactor, real sockets.
"""

import os
import socket
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from funcnodes_tw import systemd
from inprocess import sleep, start  # noqa: F401 (fixture)
from test_faults import is_event, logged  # noqa: F401 (fixture)
from test_metrics import scrape, value


def stall_warnings(logged):
    return [text for _, text, _ in logged if "reactor has not turned" in text]


@pytest_twisted.inlineCallbacks
def test_a_node_that_busy_loops_gets_one_warning_naming_it(start, logged):
    worker = yield start(name="stall")
    client = yield worker.connect()
    yield client.call("add_shelf", src="stall_nodes")
    nid = (yield client.call("add_node", id="stall.busy"))["id"]
    yield sleep(1.2)  # quiet so far
    assert stall_warnings(logged) == []
    yield client.call("set_io_value", nid=nid, ioid="seconds", value=3)
    yield client.wait_for(is_event("triggerdone", nid), timeout=10)
    yield sleep(1.5)  # a probe or two after the stall
    (warning,) = stall_warnings(logged)
    assert f"node {nid} (stall.busy, 'Busy loop')" in warning
    assert "stall_nodes.py" in warning and "in busy" in warning  # the reactor thread's stack
    found = yield scrape(worker)
    assert value(found, "funcnodes_reactor_stalls_total") == 1
    assert value(found, "funcnodes_reactor_lag_seconds") < 1


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """
    A fake systemd: the datagrams sent to C{NOTIFY_SOCKET}, each with the
    time it arrived, read by a thread (the reactor is what gets blocked).
    """
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    received, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                data = sock.recv(1024)
                received.append((time.monotonic(), data.decode()))
            except socket.timeout:
                pass

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    yield received
    done.set()
    thread.join()
    sock.close()


@pytest_twisted.inlineCallbacks
def test_watchdog_pings_arrive_and_stop_while_the_reactor_is_blocked(notify_socket):
    interval = systemd.watchdog_interval({"WATCHDOG_USEC": "200000"})
    assert interval == 0.1
    service = systemd.watchdog(interval, reactor)
    service.startService()
    try:
        yield sleep(0.55)
        blocked_at = time.monotonic()
        time.sleep(1.0)  # the reactor does not turn
        unblocked_at = time.monotonic()
        yield sleep(0.35)
    finally:
        yield service.stopService()
    pings = [at for at, text in notify_socket if text == "WATCHDOG=1"]
    before = [at for at in pings if at < blocked_at]
    after = [at for at in pings if at > unblocked_at]
    assert len(before) >= 4 and len(after) >= 2
    assert not [at for at in pings if blocked_at + 0.01 < at < unblocked_at]
    assert max(b - a for a, b in zip(pings, pings[1:])) >= 0.9  # the gap systemd would see


@pytest.mark.parametrize(
    "environ, interval",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_the_watchdog_interval_is_half_what_systemd_asks(environ, interval):
    assert systemd.watchdog_interval(environ) == interval
