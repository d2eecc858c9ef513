"""Side-by-side wire compatibility: reference aiohttp worker vs funcnodes_tw.

The same scripted two-client session runs against both workers; every frame each client
receives after the setup is recorded, normalised (ids, timings, tracebacks) and the two
transcripts must be equal message for message, once the reference's transcript has had the
deliberate deviations of docs/deviations.md applied (see ``expected_from_reference``). With ``FUNCNODES_TW_COMPAT_SELFCHECK=1``
the reference is compared with a second reference instead, which validates the harness
(the session must be deterministic, otherwise the real comparison means nothing).

Normalised transcripts are written to ``<tmp_path>/<worker>.<client>.json`` for diffing.
"""

from __future__ import annotations

import base64
import difflib
import json
import os
import re
import struct
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, task

from wsclient import Client, CommandError, connect
from workers import start_ours, start_reference

pytestmark = [pytest.mark.reference, pytest.mark.slow]

SELFCHECK = os.environ.get("FUNCNODES_TW_COMPAT_SELFCHECK") == "1"

#: A command is "done" once neither client received anything for this long.
QUIET = 0.25
#: load_data pauses the nodespace loop and resumes it 2 s later (PROTOCOL.md §5.7).
LOAD_RESUME = 2.3
CALL_TIMEOUT = 5


# ---------------------------------------------------------------------------------------
# Normalisation

_HEX32 = re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{32}(?![0-9a-fA-F])")
_UUID4 = re.compile(
    r"(?<![0-9a-fA-F])[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?![0-9a-fA-F])"
)
#: tqdm fields in ``progress`` nsevents that depend on wall-clock time.
_TIMING_KEYS = ("elapsed", "rate")
_TEXT_MIMES = ("text/", "application/json")


class Normalizer:
    """Replace run-specific values by stable placeholders.

    Rules (applied to every received frame, in order of arrival, client A first):
    * every 32-hex id (nodes, groups, nodespace) and dashed uuid4 anywhere in a string or
      dict key -> ``<ID1>``, ``<ID2>`` ... by order of first appearance (so identity is
      still checked: the same node must keep the same placeholder);
    * the worker's uuid, data path, config dir and port -> ``<WORKER_UUID>`` etc.;
    * ``tb`` traceback lists -> ``"<TB>"`` (paths and line numbers differ);
    * ``elapsed``/``rate`` inside ``progress`` nsevent ``info`` -> ``"<T>"`` when numeric;
    * floats that look like epoch timestamps (1e9..1e10, e.g. ``_triggeroutput``) -> ``"<TS>"``;
    * binary frames: ``msgid`` -> dropped (unique per frame), payload -> hex, or decoded text
      for text/JSON mimes (then normalised like any string);
    * ``workerevent repos_update`` frames are dropped: they depend on GitHub being reachable
      and arrive at random times.
    Message ids are chosen by the test (``A1``, ``B1``, ...) and compared verbatim.
    """

    def __init__(self, worker):
        self.ids: Dict[str, str] = {}
        self.literals = {
            worker.uuid: "<WORKER_UUID>",
            str(worker.data_path): "<DATA_PATH>",
            str(worker.config_dir): "<CONFIG_DIR>",
        }
        self.port = worker.port

    def _id(self, match: re.Match) -> str:
        value = match.group(0)
        if value not in self.ids:
            self.ids[value] = f"<ID{len(self.ids) + 1}>"
        return self.ids[value]

    def string(self, s: str) -> str:
        for literal, placeholder in self.literals.items():
            s = s.replace(literal, placeholder)
        s = s.replace(f"127.0.0.1:{self.port}", "127.0.0.1:<PORT>")
        s = _UUID4.sub(self._id, s)
        return _HEX32.sub(self._id, s)

    def value(self, v: Any) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, item in v.items():
                if k == "tb" and isinstance(item, list):
                    out[k] = "<TB>"
                else:
                    out[self.string(k)] = self.value(item)
            return out
        if isinstance(v, list):
            return [self.value(item) for item in v]
        if isinstance(v, str):
            return self.string(v)
        if isinstance(v, float) and 1e9 <= v <= 1e10:
            return "<TS>"
        return v

    def message(self, msg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The normalised message, or None when it is to be dropped."""
        if msg.get("binary"):
            header = dict(msg["header"])
            mime = header.get("mime", "")
            payload = msg["payload"]
            if mime.startswith(_TEXT_MIMES):
                body = payload.decode("utf-8", errors="replace")
            else:
                body = payload.hex()
            return self.value({"binary": True, "chunk": msg["chunk"], "header": header,
                               "payload": body})
        if msg.get("type") == "workerevent" and msg.get("event") == "repos_update":
            return None
        if msg.get("type") == "nsevent" and msg.get("event") == "progress":
            msg = json.loads(json.dumps(msg))
            info = msg.get("data", {}).get("info", {})
            for key in _TIMING_KEYS:
                if isinstance(info.get(key), (int, float)):
                    info[key] = "<T>"
        return self.value(msg)

    def transcript(self, messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [m for m in (self.message(msg) for msg in messages) if m is not None]


def canonical(msg: Any) -> str:
    """One message as sorted-key JSON: ``1`` vs ``1.0`` vs ``true`` stay distinct."""
    return json.dumps(msg, sort_keys=True, ensure_ascii=False)


def describe_difference(name: str, expected: List[Any], actual: List[Any]) -> str:
    """A readable account of the first divergence between two transcripts."""
    exp = [canonical(m) for m in expected]
    act = [canonical(m) for m in actual]
    index = next(
        (i for i, (a, b) in enumerate(zip(exp, act)) if a != b), min(len(exp), len(act))
    )
    lines = [f"{name}: transcripts differ at message {index} "
             f"(reference has {len(exp)} messages, other has {len(act)})"]

    def brief(seq, i):
        return seq[i][:300] if i < len(seq) else "<end of transcript>"

    for i in range(max(0, index - 3), index):
        lines.append(f"  same [{i}] {brief(exp, i)}")
    if index < len(exp) and index < len(act):
        a = json.dumps(expected[index], indent=1, sort_keys=True).splitlines()
        b = json.dumps(actual[index], indent=1, sort_keys=True).splitlines()
        lines.extend(difflib.unified_diff(a, b, "reference", "other", n=2, lineterm=""))
    for i in range(index, index + 4):
        lines.append(f"  ref   [{i}] {brief(exp, i)}")
        lines.append(f"  other [{i}] {brief(act, i)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The scripted session


def _field(result: Any, key: str) -> Any:
    return result.get(key) if isinstance(result, dict) else None


class Session:
    """Runs the scripted session against one worker with two clients, A and B."""

    def __init__(self, reactor, worker):
        self.reactor = reactor
        self.worker = worker
        self.clients: Dict[str, Client] = {}
        self.starts: Dict[str, int] = {}
        self.counters: Dict[str, int] = {}
        #: (msg_id, cmd, result) and label -> result, for sanity checks on the reference
        self.results: List[tuple] = []
        self.labelled: Dict[str, Any] = {}

    def settle(self, period: float = QUIET) -> defer.Deferred:
        return defer.gatherResults([c.wait_quiet(period) for c in self.clients.values()])

    @defer.inlineCallbacks
    def cmd(self, who: str, cmd: str, *, as_bytes: bool = False, label: str = "", **kwargs):
        """Send a command with a predictable id, wait for its reply and its events.

        Errors and timeouts are recorded as values: the transcripts show them, and the
        comparison is more useful than an exception in the middle of the session.
        """
        self.counters[who] = self.counters.get(who, 0) + 1
        msg_id = f"{who}{self.counters[who]}"
        try:
            result = yield self.clients[who].call(
                cmd, as_bytes=as_bytes, msg_id=msg_id, kwargs=kwargs, timeout=CALL_TIMEOUT
            )
        except CommandError as exc:
            result = {"<error>": exc.error}
        except defer.TimeoutError:
            result = {"<timeout>": cmd}
        yield self.settle()
        self.results.append((msg_id, cmd, result))
        if label:
            self.labelled[label] = result
        return result

    @defer.inlineCallbacks
    def setup(self):
        """Not compared: connect A, load funcnodes-basic, then connect B."""
        a = self.clients["A"] = yield connect(self.reactor, self.worker.url)
        # The reference starts with an empty library, ours ships funcnodes-basic: send the
        # same command to both (it also sets full_state's progress_state), ours may refuse.
        try:
            yield a.call(
                "add_package_dependency", msg_id="setup-dep", name="funcnodes-basic", timeout=60
            )
        except CommandError:
            pass
        yield self.settle(0.5)
        b = self.clients["B"] = yield connect(self.reactor, self.worker.url)
        # Like the UI, B talks first: a worker may hold broadcasts back until a client has
        # spoken (PROTOCOL.md §10.5, the manager's uuid probe), which the reference doesn't.
        yield b.call("get_runstate", msg_id="setup-B")
        yield self.settle()
        self.starts = {name: len(c.transcript) for name, c in self.clients.items()}

    @defer.inlineCallbacks
    def run(self):
        """The compared part. Later steps use ids from earlier results; if the worker under
        test fails a step they just get None and the transcripts show where it went wrong.
        """
        yield self.setup()
        cmd = self.cmd

        # identity
        yield cmd("A", "uuid")
        yield cmd("A", "name")
        yield cmd("A", "get_meta")
        yield cmd("A", "get_runstate")
        yield cmd("A", "get_library")

        # nodes and values
        n1 = _field((yield cmd("A", "add_node", id="add_node")), "id")
        n2 = _field((yield cmd("A", "add_node", id="add_node")), "id")
        yield cmd("A", "get_nodes")
        yield cmd("A", "set_io_value", nid=n1, ioid="a", value=2)  # not ready yet: no run
        yield cmd("A", "set_io_value", nid=n1, ioid="b", value=3.5)  # first run: slow path
        yield cmd("A", "get_io_value", nid=n1, ioid="out", label="n1.out")
        yield cmd("A", "get_ios_values", nid=n1)
        yield cmd("A", "get_io_full_value", nid=n1, ioid="out", as_bytes=True,
                  label="n1.out bytes")
        yield cmd("A", "get_io_full_value", nid=n1, ioid="out", label="n1.out json")
        yield cmd("A", "get_node_status", nid=n1)

        # edges and propagation
        yield cmd("A", "add_edge", src_nid=n1, src_ioid="out", trg_nid=n2, trg_ioid="a")
        yield cmd("A", "set_io_value", nid=n2, ioid="b", value=10, set_default=True)
        yield cmd("A", "get_io_value", nid=n2, ioid="out", label="n2.out")
        yield cmd("A", "get_edges")
        yield cmd("A", "trigger_node", nid=n1)  # second run of n1: fast path
        yield cmd("B", "set_io_value", nid=n1, ioid="a", value=7)  # B's result is B's only
        yield cmd("A", "get_io_value", nid=n2, ioid="out", label="n2.out after B")
        yield cmd("A", "add_edge", src_nid=n1, src_ioid="out", trg_nid=n2, trg_ioid="a")
        yield cmd("A", "remove_edge", src_nid=n1, src_ioid="out", trg_nid=n2, trg_ioid="a")
        yield cmd("A", "get_edges")
        yield cmd("A", "add_edge", src_nid=n2, src_ioid="a", trg_nid=n1, trg_ioid="out")
        yield cmd("A", "get_edges")

        # groups
        groups = yield cmd("A", "group_nodes", node_ids=[n1, n2], group_ids=[])
        gid = next(iter(groups), None) if isinstance(groups, dict) else None
        yield cmd("A", "get_groups")
        yield cmd("A", "update_group", gid=gid, data={"position": [10, 20]})
        yield cmd("A", "update_group", gid="0" * 32, data={"position": [1, 2]})
        yield cmd("A", "remove_group", gid=gid)
        yield cmd("A", "get_groups")
        yield cmd("A", "group_nodes", node_ids=[n1], group_ids=[])

        # view and node properties
        yield cmd("A", "update_node_view", nid=n1, data={"pos": [120, 80], "size": [300, 200]})
        yield cmd("A", "update_node", nid=n2, data={"properties": {"frontend:pos": [400, 80]},
                                                   "name": "second"})
        yield cmd("A", "update_node", nid="f" * 32, data={"name": "nobody"})
        yield cmd("A", "view_state")

        # failures: a node that raises, unknown ids and commands (errors are broadcast)
        n3 = _field((yield cmd("A", "add_node", id="div_node")), "id")
        yield cmd("A", "set_io_value", nid=n3, ioid="a", value=1)
        yield cmd("A", "set_io_value", nid=n3, ioid="b", value=0)
        yield cmd("A", "remove_node", id=n3)
        yield cmd("A", "get_node", id="e" * 32)
        yield cmd("B", "no_such_command")
        self.clients["A"].send_json({"type": "ping"})
        yield self.settle()

        # persistence round trip
        state = yield cmd("A", "save")
        yield cmd("A", "get_save_state")
        yield cmd("A", "clear")
        yield cmd("A", "get_nodes")
        yield cmd("A", "load_data", data=state)
        yield task.deferLater(self.reactor, LOAD_RESUME, lambda: None)
        yield self.settle()
        yield cmd("A", "get_nodes")
        yield cmd("A", "get_edges", label="edges after load")
        yield cmd("A", "get_groups")
        yield cmd("A", "view_state")
        yield cmd("B", "get_nodes", with_frontend=True)
        yield cmd("A", "set_io_value", nid=n1, ioid="a", value=1)  # still wired after load
        yield cmd("A", "full_state")

        yield defer.gatherResults([c.close() for c in self.clients.values()])

    def transcripts(self) -> Dict[str, List[Dict[str, Any]]]:
        """Normalised transcripts after the setup, client A first (shared placeholders)."""
        norm = Normalizer(self.worker)
        return {
            name: norm.transcript(client.transcript[self.starts[name]:])
            for name, client in sorted(self.clients.items())
        }


# ---------------------------------------------------------------------------------------
# Deliberate deviations (docs/deviations.md)

_UNKNOWN_COMMAND = re.compile(r"^Unknown command (.+?) , available commands: .*$", re.S)
_NODE_NOT_FOUND = re.compile(r"^Node with id (.+) not found$")


def _deviation(client: str, msg: Dict[str, Any], pingers) -> Optional[Dict[str, Any]]:
    """What funcnodes_tw sends where the reference sends C{msg}, or None for nothing."""
    kind = msg.get("type")
    if kind == "pong" and client not in pingers:
        return None  # §14.11: pong goes to the pinging client only
    if kind == "error":
        msg_id = msg.get("id")
        if isinstance(msg_id, str) and not msg_id.startswith(client):
            return None  # §14.11: errors go to the requesting client only
        error = _UNKNOWN_COMMAND.sub(r"Unknown command '\1'", msg["error"])
        return dict(msg, error=error)  # §14.5: no list of every command
    result = msg.get("result")
    if kind == "result" and isinstance(result, dict) and list(result) == ["error"]:
        nid = _NODE_NOT_FOUND.match(result["error"]).group(1)
        # §14.24: a failure is an error reply, not a result
        return {"type": "error", "error": f"node with id '{nid}' not found in nodespace",
                "tb": "<TB>", "id": msg["id"]}
    return msg


def expected_from_reference(reference: Dict[str, List[Dict[str, Any]]], pingers=("A",)):
    """The reference's transcripts with only our documented deviations applied, so
    that any other difference still fails the comparison."""
    return {
        client: [m for m in (_deviation(client, msg, pingers) for msg in messages) if m]
        for client, messages in reference.items()
    }


# ---------------------------------------------------------------------------------------
# Helpers for the test


@defer.inlineCallbacks
def _start_all(starters):
    """Start workers concurrently; if one fails, stop the others and re-raise."""
    outcomes = yield defer.DeferredList([s() for s in starters], consumeErrors=True)
    failures = [res for ok, res in outcomes if not ok]
    if failures:
        yield defer.DeferredList([res.stop() for ok, res in outcomes if ok])
        failures[0].raiseException()
    return [res for _, res in outcomes]


def _check_reference_sanity(session: Session):
    """The reference must really have done the work, or the comparison proves nothing."""
    got = session.labelled
    for _, cmd, result in session.results:
        assert not (isinstance(result, dict) and "<timeout>" in result), (cmd, result)
    assert got["n1.out"] == 5.5, got
    assert got["n1.out bytes"]["header"]["mime"] == "application/fn.struct.!d", got
    assert got["n1.out bytes"]["payload"] == struct.pack("!d", 5.5), got
    assert got["n1.out json"]["mime"] == "application/fn.struct.!d", got
    assert base64.b64decode(got["n1.out json"]["data"]) == struct.pack("!d", 5.5), got
    assert got["n2.out"] == 15.5, got
    assert got["n2.out after B"] == 20.5, "n2 did not see the value B set upstream"
    assert len(got["edges after load"]) == 1, got
    events = [m.get("event") for m in session.transcripts()["A"]]
    for event in ("triggerstart", "triggerfast", "node_trigger_error", "after_connect",
                  "after_disconnect", "node_removed"):
        assert event in events, f"no {event} seen"


@pytest_twisted.inlineCallbacks
def test_same_session_same_transcript(tmp_path):
    from twisted.internet import reactor

    other_start = (
        (lambda: start_reference(tmp_path, name="reference2", reactor=reactor))
        if SELFCHECK
        else (lambda: start_ours(tmp_path, reactor=reactor))
    )
    workers = yield _start_all(
        [lambda: start_reference(tmp_path, name="reference", reactor=reactor), other_start]
    )
    sessions = [Session(reactor, w) for w in workers]
    try:
        # Concurrent sessions halve the runtime; each waits for its own quiet periods.
        outcomes = yield defer.DeferredList([s.run() for s in sessions], consumeErrors=True)
    finally:
        yield defer.DeferredList([w.stop() for w in workers])

    ref, other = (s.transcripts() for s in sessions)
    for session, transcripts in zip(sessions, (ref, other)):
        for client, messages in transcripts.items():
            path = tmp_path / f"{session.worker.name}.{client}.json"
            path.write_text("\n".join(canonical(m) for m in messages) + "\n")

    ref_ok, ref_outcome = outcomes[0]
    if not ref_ok:
        ref_outcome.raiseException()
    _check_reference_sanity(sessions[0])
    if not SELFCHECK:
        ref = expected_from_reference(ref)
    for client in ("A", "B"):
        if [canonical(m) for m in ref[client]] != [canonical(m) for m in other[client]]:
            pytest.fail(
                describe_difference(f"client {client}", ref[client], other[client])
                + f"\n(normalised transcripts in {tmp_path})",
                pytrace=False,
            )
    other_ok, other_outcome = outcomes[1]
    if not other_ok:
        other_outcome.raiseException()
