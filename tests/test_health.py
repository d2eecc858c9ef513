"""
C{GET /health}: 200 and a small JSON body while the worker runs, 503 while
it starts, stops or its reactor lags; over real sockets where it can be.
"""

import json

import pytest_twisted
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from funcnodes_tw.service import create
from inprocess import TOKEN, sleep, start  # noqa: F401 (fixture)


@pytest_twisted.inlineCallbacks
def get_health(worker):
    response = yield worker.new_http().get(worker.url("/health"))
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    return response.code, json.loads((yield response.text()))


@pytest_twisted.inlineCallbacks
def test_a_running_worker_is_healthy_and_says_little(start):
    worker = yield start("--token", TOKEN, name="health")
    code, body = yield get_health(worker)
    assert code == 200
    assert set(body) == {"status", "uptime", "clients"}
    assert body["status"] == "running" and body["clients"] == 0
    assert 0 <= body["uptime"] < 60
    yield worker.connect(f"/?token={TOKEN}")
    code, body = yield get_health(worker)
    assert (code, body["clients"]) == (200, 1)


@pytest_twisted.inlineCallbacks
def test_a_lagging_reactor_is_unhealthy(start):
    worker = yield start("--stall-threshold", "0.5", name="lagging")
    watch = worker.service.watch
    watch.stopService()  # no probe overwrites the lag set below
    yield sleep(0.1)
    watch.lag = 0.7  # what the watch measured after a stall
    code, body = yield get_health(worker)
    assert (code, body["status"]) == (503, "stalled")
    worker.service.watch.lag = 0.01
    code, body = yield get_health(worker)
    assert (code, body["status"]) == (200, "running")


@pytest_twisted.inlineCallbacks
def test_a_stopping_worker_is_unhealthy(start):
    worker = yield start(name="stopping")
    stopped = worker.service.stopService()  # sets the runstate before it waits for anything
    code, body = worker.service.health()
    assert (code, body["status"]) == (False, "stopped")
    yield stopped


def test_a_starting_worker_answers_503(tmp_path):
    service = create("starting", data_path=tmp_path / "d", workers_dir=tmp_path / "w")
    service.worker.set_runstate("starting", "Loading nodespace")
    request = DummyRequest([b"health"])
    body = getChildForRequest(service.resource, request).render(request)
    assert request.responseCode == 503
    assert json.loads(body)["status"] == "starting"
