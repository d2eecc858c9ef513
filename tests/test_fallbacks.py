"""
The worker without the private attributes it reads of Twisted, asyncio and
Autobahn (L{funcnodes_tw.internals}), as after an upgrade that renamed them:
key tests of the protocol, write-path, HTTP and upload modules run again
while the probes of one library report every attribute missing. The worker
must stay right, only slower, and warn once per probe, naming what it misses.
"""

import json
import os

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from funcnodes_tw import aio
from funcnodes_tw.internals import Internals
from funcnodes_tw.protocol import send_now
from inprocess import TOKEN, add_command, multipart, start  # noqa: F401 (fixture)
from test_http import (  # noqa: F401 (collected here again)
    test_a_client_that_stops_reading_is_cut_off_while_others_keep_up,
    test_binary_results_arrive_in_chunks,
    test_large_result_is_parked_and_served_exactly,
    test_post_message_runs_a_command_too_big_for_a_frame,
    test_upload_a_folder,
    test_upload_one_file,
    test_upload_size_limit,
    test_websocket_origin_check,
)
from test_protocol import (  # noqa: F401
    session,
    slow,
    test_a_client_that_went_silent_is_pinged_then_dropped,
    test_as_bytes_result_is_one_binary_frame,
    test_binary_frames_may_exceed_the_inbound_limit,
    test_commands_of_one_client_run_in_order,
    test_invalid_json_gets_an_error_and_the_connection_stays,
    test_nsevents_go_to_every_client_that_spoke,
    test_ping_answered_while_a_slow_command_runs,
    test_result_and_error_only_to_requester,
    test_result_comes_before_the_events_it_caused,
)
from test_uploads import (  # noqa: F401
    connect,
    files,
    test_an_upload_no_resource_took_is_dropped,
    test_other_routes_keep_their_multipart_body,
    threads,
)
from test_write_path import (  # noqa: F401
    queued,
    tcp_pair,
    test_a_big_binary_result_arrives_whole_before_the_next_reply,
    test_a_paused_producer_keeps_frames_queued,
    test_other_transports_take_the_ordinary_write,
)

LIBRARIES = ["Twisted", "Autobahn", "asyncio"]


def _key(probe):
    return probe.owner, probe.fallback


@pytest.fixture(autouse=True, params=LIBRARIES)
def taken_away(request, monkeypatch, clean_reactor):
    """
    The probes of one library report all their attributes missing; yields
    those probes. Afterwards each one that was used has warned exactly once,
    naming every attribute, and no other probe has warned.
    """
    taken = [p for p in Internals.made if request.param in p.owner]
    real_missing = Internals.missing
    monkeypatch.setattr(
        Internals, "missing", lambda self, obj: list(self.names) if self in taken else real_missing(self, obj)
    )
    for probe in Internals.made:
        monkeypatch.setattr(probe, "present", None)
    warnings = []

    def observe(event):
        if event.get("log_namespace") == "funcnodes_tw.internals":
            warnings.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield taken
    finally:
        globalLogPublisher.removeObserver(observe)
    for probe in Internals.made:
        mine = [e for e in warnings if (e["owner"], e["fallback"]) == _key(probe)]
        expected = 1 if probe in taken and probe.present is False else 0
        assert len(mine) == expected, (probe.owner, probe.names, mine)
        assert all(e["missing"] == ", ".join(probe.names) for e in mine)
        assert all(e["log_level"].name == "warn" for e in mine)


@pytest_twisted.inlineCallbacks
def test_every_probe_is_used_and_warns_once(start, monkeypatch, taken_away):
    """
    A worker's everyday work (two WebSocket clients, a big binary result each,
    uploads, the end of a burst) meets every probe of the library.
    """
    payload = os.urandom(4 * 2**20)

    def test_big(worker):
        return payload

    add_command(monkeypatch, test_big)
    served = yield start()
    for _ in range(2):
        client = yield served.connect()
        frame = yield client.call("test_big", as_bytes=True, timeout=30)
        assert frame["payload"] == payload
        body, content_type = multipart("a.txt", b"content")
        response = yield served.http.post(
            served.url("/upload/"), data=body, headers={b"content-type": [content_type.encode()]}
        )
        assert response.code == 200
        yield response.content()
        idle = defer.Deferred()
        aio.call_when_idle(lambda: idle.callback(None), 1.0)
        yield idle
    assert (served.files / "a.txt").read_bytes() == b"content"
    assert all(probe.present is False for probe in taken_away), "a probe was never used"


@pytest_twisted.inlineCallbacks
def test_a_token_in_the_query_still_lets_an_upload_in(start, taken_away):
    served = yield start("--token", TOKEN)
    body, content_type = multipart("b.txt", b"guarded")
    headers = {b"content-type": [content_type.encode()]}
    refused = yield served.http.post(served.url("/upload/"), data=body, headers=headers)
    assert refused.code == 401
    yield refused.content()
    assert not (served.files / "b.txt").exists()
    response = yield served.http.post(served.url(f"/?token={TOKEN}/upload/"), data=body, headers=headers)
    assert response.code == 200, (yield response.content())
    assert json.loads((yield response.content())) == {"file": "b.txt"}
    assert (served.files / "b.txt").read_bytes() == b"guarded"


@pytest_twisted.inlineCallbacks
def test_frames_keep_their_order_through_any_write(tcp_pair):
    transport, receiver = tcp_pair
    head, payload, second = b"head", os.urandom(8 * 2**20), b"second"
    send_now(transport, head, payload)
    send_now(transport, second)
    received = yield receiver.wait_for(len(head) + len(payload) + len(second))
    assert received == head + payload + second
    assert queued(transport) == 0


@pytest.mark.parametrize("max_wait", [0, 60])
@pytest_twisted.ensureDeferred
async def test_call_when_idle_still_calls(max_wait):
    calls, done = [], defer.Deferred()
    aio.call_when_idle(lambda: calls.append(1), max_wait)
    aio.call_when_idle(lambda: done.callback(calls.append(2)), max_wait)
    await done
    assert calls == [1, 2]
