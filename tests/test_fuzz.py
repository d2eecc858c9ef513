"""
Property-based fuzzing of the whole RPC surface, over real sockets.

Hypothesis generates batches of client messages: command names drawn from
L{funcnodes_tw.commands.COMMANDS} (all but C{stop_worker}) and junk; kwargs
named after each command's parameters and junk, with values from a JSON
strategy mixed with the real node, IO, group and edge ids of a prepared
graph; random ids and C{as_bytes}; and frames that are no command at all
(garbage text, JSON that is not an object, other message types, pings).

They go to one worker listening on 127.0.0.1 (production settings) through
one WebSocket connection, the whole stack: frames, wire parsing, dispatch,
commands, replies, the outbox. The invariant, per message:

 - a command message (C{"type": "cmd"}) and every unparsable frame is
   answered exactly once, by a result (JSON or binary) or an error;
 - any other message is ignored (C{ping}: a pong), as by the reference;
 - nothing in the worker fails unhandled (no logged failure);
 - the worker keeps serving (the connection stays open; a new connection
   answers C{uuid});
 - C{nodespace.json} stays byte for byte what was last saved unless a save
   was requested or made (a saving command, C{save}, C{export_worker}: the
   worker's C{request_save} and C{save} are watched), and is always a
   loadable state.

A batch goes out at once, each message followed by a sentinel command
(C{uuid} with a known id). Commands on a connection run in order, so the
replies between two sentinels' results belong to the message between them;
frames that are no JSON object are answered as soon as they arrive, by
errors told apart by their text, and counted over the batch. The graph is
put back before each batch, as commands legitimately change or clear it.

pip never runs (installs fail as if pip had), and module names that reach
an import are restricted to the worker's own packages: a fuzzer must not
install or import whatever it makes up.
"""

import base64
import functools
import json
import os
from collections import Counter

import orjson
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from funcnodes_tw import commands, libraries, packages, persistence, wire
from funcnodes_tw.commands import library
from inprocess import start  # noqa: F401  (the fixture)

#: Batches and their size: at least 10 000 messages (plus as many sentinels).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 500))
BATCH = (18, 24)
MIN_MESSAGES = 10_000

NAMES = sorted(set(commands.COMMANDS) - {"stop_worker"})
#: Commands that look through the installed packages: funcnodes-core runs a
#: full garbage collection per package each time (0.1-0.6 s), so they are
#: drawn less often to keep the run within its time.
SLOW = {"add_shelf", "remove_shelf", "add_package_dependency",
        "remove_package_dependency", "get_available_modules", "update"}
WEIGHTS = [0.05 if name in SLOW else 1.0 for name in NAMES]
#: Module and package names commands may import.
SAFE_MODULES = {"funcnodes_basic", "funcnodes-basic"}


# region the prepared graph


class Graph:
    """
    Ids of the prepared graph, filled in once the worker runs.
    """

    nodes = []
    ios = ["a", "b", "out", "s", "trigger", "_triggerinput", "nope"]
    groups = []
    state = None


def parameters(name):
    """
    The parameters a client can name (not C{worker}, not C{**kwargs}).
    """
    params = commands.COMMANDS[name].signature.parameters
    return [p for p in list(params)[1:] if params[p].kind is not params[p].VAR_KEYWORD]


# endregion
# region strategies

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=5,
)


def _pick(items):
    """
    One of C{items()} (read when drawing: the graph's ids are known late).
    """
    return st.integers(0, 1000).map(lambda i: (lambda seq: seq[i % len(seq)])(items()))


nodes = _pick(lambda: Graph.nodes)
groups = _pick(lambda: Graph.groups or ["nogroup"])
ios = st.sampled_from(Graph.ios)
node_types = st.sampled_from(["add_node", "string.upper", "no.such.node", ""])
base64_text = st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
flags = st.booleans() | json_values


@st.composite
def real_ids(draw):
    """
    A node, IO or group id of the prepared graph, or a list of them.
    """
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(nodes)
    if choice == 1:
        return draw(ios)
    if choice == 2:
        return draw(groups)
    return draw(st.lists(nodes | groups, max_size=3))


def _state():
    return json.loads(json.dumps(Graph.state))


states = st.one_of(
    st.builds(_state),
    st.fixed_dictionaries({"backend": st.fixed_dictionaries(
        {"nodes": st.lists(json_values, max_size=2), "edges": st.just([])})}),
    st.fixed_dictionaries({}, optional={"backend": json_values, "meta": json_values,
                                        "view": json_values, "external_workers": json_values}),
)
configs = st.fixed_dictionaries({}, optional={
    "package_dependencies": st.dictionaries(
        st.sampled_from(sorted(SAFE_MODULES) + ["nopkg", "a b"]),
        st.fixed_dictionaries(
            {}, optional={"version": st.sampled_from([None, "99.0", "x", ">=0"])}
        ),
        max_size=2,
    ),
    "name": json_values,
})

#: What each parameter takes, roughly: right most of the time, wrong often.
PARAMETERS = {
    "nid": nodes, "src_nid": nodes, "trg_nid": nodes,
    "ioid": ios, "src_ioid": ios, "trg_ioid": ios,
    "gid": groups,
    "node_ids": st.lists(nodes, max_size=3),
    "group_ids": st.lists(groups, max_size=2),
    "value": json_values,
    "options": st.fixed_dictionaries({}, optional={"min": json_values, "max": json_values,
                                                   "step": json_values, "options": json_values}),
    "name": st.text(max_size=8) | st.sampled_from(sorted(SAFE_MODULES)),
    "src": st.sampled_from(sorted(SAFE_MODULES) + ["nomodule"]) | st.fixed_dictionaries(
        {"module": st.sampled_from(sorted(SAFE_MODULES))}),
    "filename": st.sampled_from(["a.txt", "sub/b.bin", "../x", "/etc/passwd", "", "c/"])
    | st.text(max_size=10),
    "config": configs,
    "state": states,
    "type": st.sampled_from(["react", "vue"]),
    "key": st.text(max_size=8),
    "version": st.sampled_from([None, "latest", "99.0", ">=0", "x"]),
    "dep": st.sampled_from([None, {}, {"path": "x"}]),
    "autostart": st.sampled_from(["never", "always", "unless-stopped", True, False, 5]),
    "update_on_startup": st.dictionaries(st.text(max_size=6), flags, max_size=2),
    "hidden": flags,
    "set_default": flags,
    "with_frontend": flags, "export": flags, "with_files": flags, "replace": flags,
    "save": flags, "sync": flags, "do_reload_base": flags,
}
#: Parameters whose meaning depends on the command.
BY_COMMAND = {
    ("add_node", "id"): node_types,
    ("get_node", "id"): nodes,
    ("remove_node", "id"): nodes,
    ("update_node", "data"): st.fixed_dictionaries({}, optional={
        "name": json_values, "description": json_values, "reset_inputs_on_trigger": json_values,
        "properties": st.dictionaries(st.text(max_size=6), json_values, max_size=2)}),
    ("update_node_view", "data"): st.fixed_dictionaries({}, optional={
        "pos": st.lists(st.integers(-5, 5) | json_values, max_size=3),
        "size": st.lists(st.integers(0, 500), max_size=3)}),
    ("add_edge", "src_ioid"): st.sampled_from(["out", "_triggeroutput", "a"]),
    ("add_edge", "trg_ioid"): st.sampled_from(["a", "b", "s", "out"]),
    ("remove_edge", "src_ioid"): st.sampled_from(["out", "a"]),
    ("remove_edge", "trg_ioid"): st.sampled_from(["a", "b"]),
    ("set_default_value", "ioid"): st.sampled_from(["a", "b", "s"]),
    ("update_io_value_options", "ioid"): st.sampled_from(["a", "b", "s"]),
    ("update_group", "data"): st.fixed_dictionaries({}, optional={
        "position": st.lists(
            st.floats(allow_nan=False, allow_infinity=False), min_size=2, max_size=2
        )
        | st.lists(json_values, max_size=3)}),
    ("load_data", "data"): states,
    ("upload", "data"): base64_text,
    ("update_from_export", "data"): base64_text,
}


@functools.lru_cache(maxsize=None)
def value_for(name, parameter):
    shaped = BY_COMMAND.get((name, parameter), PARAMETERS.get(parameter, json_values))
    return st.one_of(shaped, shaped, shaped, json_values, real_ids())


def kwargs_for(draw, name, rnd):
    """
    Mostly the command's own parameters (the required ones, some optional
    ones), now and then a subset, or junk names.
    """
    if name not in commands.COMMANDS:
        return draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))
    params = commands.COMMANDS[name].signature.parameters
    known = parameters(name)
    roll = rnd.random()
    if roll < 0.75:
        chosen = [p for p in known if params[p].default is params[p].empty]
        optional = [p for p in known if params[p].default is not params[p].empty]
        chosen += [p for p in optional if rnd.random() < 0.5]
    elif roll < 0.9:
        chosen = [p for p in known if rnd.random() < 0.5]
    else:
        chosen = []
    kwargs = {p: draw(value_for(name, p)) for p in chosen}
    if roll >= 0.9 or rnd.random() < 0.05:
        junk = st.dictionaries(st.text(max_size=6), json_values, min_size=1, max_size=2)
        kwargs.update(draw(junk))
    return kwargs


@st.composite
def command_messages(draw):
    """
    Weights come from a seeded Random (Hypothesis' own choices lean hard
    towards the first and the simplest); values from strategies.
    """
    rnd = draw(st.randoms(use_true_random=True))
    roll = rnd.random()
    if roll < 0.85:
        name = rnd.choices(NAMES, WEIGHTS)[0]
    elif roll < 0.93:
        name = draw(st.text(max_size=10))
    else:
        name = draw(json_values)
    message = {"type": "cmd"}
    if rnd.random() > 0.02:
        message["cmd"] = name
    if rnd.random() < 0.04:
        message["kwargs"] = draw(json_values)  # not an object, mostly
    elif rnd.random() > 0.04:  # else no kwargs at all
        message["kwargs"] = kwargs_for(draw, name, rnd) if isinstance(name, str) else {}
    if rnd.random() < 0.85:
        message["id"] = draw(st.uuids().map(str)) if rnd.random() < 0.5 else draw(json_values)
    roll = rnd.random()
    if roll < 0.1:
        message["as_bytes"] = True
    elif roll < 0.15:
        message["as_bytes"] = draw(json_values)
    elif roll < 0.3:
        message["as_bytes"] = False
    items = list(message.items())
    rnd.shuffle(items)
    return json.dumps(dict(items)).encode()


other_messages = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["ping", "pong", "result", "error", "CMD", ""])
                           | json_values}),
    st.dictionaries(st.text(max_size=6).filter(lambda k: k != "type"), json_values, max_size=3),
).map(lambda m: json.dumps(m).encode())

garbage = st.one_of(
    st.text(max_size=40).map(lambda t: t.encode()),
    (json_values.filter(lambda v: not isinstance(v, dict))).map(lambda v: json.dumps(v).encode()),
    st.floats(allow_nan=True).map(
        lambda f: json.dumps({"type": "cmd", "cmd": "uuid", "id": f}).encode()
    ),
    st.binary(max_size=20).map(lambda b: b.decode("utf-8", "replace").encode()),
)


@st.composite
def messages(draw):
    roll = draw(st.randoms(use_true_random=True)).random()
    if roll < 0.85:
        return draw(command_messages())
    return draw(other_messages if roll < 0.93 else garbage)


def kind_of(payload):
    """
    What the worker must do with a message: "unreadable" (one error, at
    once), "reply" (one result or error, in command order), "pong" or
    "ignore". Read as the worker reads it (orjson).
    """
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "unreadable"
    if not isinstance(message, dict):
        return "unreadable"
    if message.get("type") == "cmd":
        return "reply"
    if message.get("type") == "ping":
        return "pong"
    return "ignore"


def is_unreadable_error(message):
    """
    The error for a frame that is no JSON object (sent as soon as it arrives).
    """
    return (
        message.get("type") == "error"
        and message.get("id") is None
        and (message["error"].startswith("Invalid JSON: ")
             or message["error"] == "A message must be a JSON object")
    )


def check_id(payload, reply):
    """
    The reply carries the message's id as the worker read it (orjson reads
    integers beyond 64 bits as floats); a binary result carries its text.
    """
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        message = None
    msgid = message.get("id") if isinstance(message, dict) else None
    if reply.get("binary"):
        assert reply["header"]["id"] == wire._header_value(msgid).strip()
    else:
        assert reply["id"] == msgid


# endregion
# region the harness


class Fuzzer:
    def __init__(self, worker):
        self.worker = worker
        self.core = worker.service.worker
        self.client = None
        self.stats = Counter()
        self.failures = []
        self.sentinels = 0
        self.saved = None
        self.may_save = False
        self.errors = Counter()
        globalLogPublisher.addObserver(self._observe)

    def _observe(self, event):
        if event.get("log_failure") is not None:
            self.failures.append(event)

    def stop(self):
        globalLogPublisher.removeObserver(self._observe)

    def _track_saves(self):
        """
        Note every save request and every save, whoever makes it (commands,
        the save loop).
        """
        core = self.core
        request_save, save = core.request_save, core.save

        def requesting():
            self.may_save = True
            request_save()

        def saving(state=None):
            self.may_save = True
            return save(state)

        core.request_save, core.save = requesting, saving

    @defer.inlineCallbacks
    def prepare(self):
        client = self.client = yield self.worker.connect()
        a = (yield client.call("add_node", id="add_node"))["id"]
        b = (yield client.call("add_node", id="add_node"))["id"]
        s = (yield client.call("add_node", id="string.upper"))["id"]
        yield client.call("add_edge", src_nid=a, src_ioid="out", trg_nid=b, trg_ioid="a")
        groups = yield client.call("group_nodes", node_ids=[a, b], group_ids=[])
        Graph.nodes = [a, b, s]
        Graph.groups = list(groups)
        Graph.state = yield client.call("get_save_state")
        yield client.call("save")
        self.saved = self.core.files.state.read_bytes()
        self._track_saves()

    @defer.inlineCallbacks
    def finish(self):
        """
        After all batches: enough messages went through, and the worker
        still serves a new connection.
        """
        assert self.stats["messages"] >= MIN_MESSAGES
        assert self.stats["unanswered"] == 0 and not self.failures
        fresh = yield self.worker.connect(listening=False)
        assert (yield fresh.call("uuid")) == "http_fuzz"
        yield fresh.close()
        assert isinstance(persistence.load_state(self.core.files.state), dict)

    def reset(self):
        """
        Put the prepared graph back, and its nodes' shelf if a command took
        it away (nothing is saved by that).
        """
        requested = self.core.save_requested
        if not self.core.nodespace.lib.has_node_id("add_node"):
            self.core.nodespace.add_shelf(library._shelf("funcnodes_basic"))
        self.core.load(json.loads(json.dumps(Graph.state)))
        self.core.save_requested = requested

    @defer.inlineCallbacks
    def send(self, batch):
        """
        Send a batch, each message followed by a sentinel, all at once.

        @return: per message, the replies that arrived after the previous
            sentinel's result and before its own (command replies, in
            order); the errors for unreadable frames (sent at once, so
            anywhere before their sentinel's); the pongs.
        """
        client = self.client
        start_at = len(client.transcript)
        self.sentinels += 1
        sentinels = [f"sentinel-{self.sentinels}-{i}" for i in range(len(batch))]
        for payload, sentinel in zip(batch, sentinels):
            client._proto.sendMessage(payload, isBinary=False)
            client.send_json({"type": "cmd", "cmd": "uuid", "id": sentinel})
        last = sentinels[-1]
        yield client.wait_for(
            lambda m: m.get("type") == "result" and m.get("id") == last,
            start=start_at, timeout=60,
        )
        replies = [[] for _ in batch]
        unreadable = []
        pongs = 0
        i = 0
        for message in client.transcript[start_at:]:
            if message.get("type") == "result" and message.get("id") == sentinels[i]:
                i += 1
                if i == len(batch):
                    break
                continue
            if message.get("binary"):
                if message["header"].get("type") == "result":
                    replies[i].append(message)
                continue
            if message.get("type") == "large_message":
                url = self.worker.url(f"/message/{message['msg_id']}")
                response = yield self.worker.http.get(url)
                message = json.loads((yield response.content()))
            if message == {"type": "pong"}:
                pongs += 1
            elif message.get("type") in ("result", "error"):
                (unreadable if is_unreadable_error(message) else replies[i]).append(message)
        return replies, unreadable, pongs

    @defer.inlineCallbacks
    def run(self, batch):
        self.reset()
        self.may_save = False
        kinds = [kind_of(payload) for payload in batch]
        replies, unreadable, pongs = yield self.send(batch)
        assert not self.failures, [e.get("log_failure") for e in self.failures]
        assert len(unreadable) == kinds.count("unreadable"), (batch, unreadable)
        assert pongs == kinds.count("pong"), batch
        for payload, kind, answers in zip(batch, kinds, replies):
            self.stats["messages"] += 1
            self.stats[kind] += 1
            if kind != "reply":
                assert answers == [], (payload, answers)
                continue
            if not answers:
                self.stats["unanswered"] += 1
            assert len(answers) == 1, (payload, answers)
            reply = answers[0]
            check_id(payload, reply)
            if reply.get("binary"):
                self.stats["binary"] += 1
            if reply.get("binary") or reply["type"] == "result":
                self.stats["result"] += 1
                self.stats[f"ok:{json.loads(payload).get('cmd')}"] += 1
            else:
                self.stats["error"] += 1
                self.errors[reply["error"][:60]] += 1
        self.stats["error"] += len(unreadable)
        assert not self.client.is_closed, self.client.close_code
        yield self.check_saved()

    @defer.inlineCallbacks
    def check_saved(self):
        path = self.core.files.state
        if self.may_save:
            # What the save loop does within 1 s; after any save under way.
            yield self.core.save()
            self.stats["batches that saved"] += 1
        else:
            assert path.read_bytes() == self.saved
        state = persistence.load_state(path)
        assert isinstance(state, dict) and "backend" in state
        self.saved = path.read_bytes()


# endregion


@pytest.fixture
def fuzzer(start, monkeypatch):
    """
    A worker with the prepared graph, pip and imports fenced, and the
    harness; after the run, the totals are checked.
    """

    def no_pip(self, config, python, args, on_line):
        raise packages.InstallError("pip is not run in the fuzz test")

    find_module = libraries.find_module

    def safe_find_module(name):
        if name.replace("-", "_") not in {m.replace("-", "_") for m in SAFE_MODULES}:
            raise libraries.PackageNotFound(f"Package {name} not found")
        return find_module(name)

    monkeypatch.setattr(packages.Installer, "_spawn", no_pip)
    monkeypatch.setattr(libraries, "find_module", safe_find_module)
    fuzzer = pytest_twisted.blockon(_fuzzer(start))
    yield fuzzer
    fuzzer.stop()
    print("fuzz:", dict(sorted(fuzzer.stats.items())))
    print("most frequent errors:", fuzzer.errors.most_common(15))
    pytest_twisted.blockon(fuzzer.finish())


@defer.inlineCallbacks
def _fuzzer(start):
    worker = yield start(name="fuzz")
    fuzzer = Fuzzer(worker)
    yield fuzzer.prepare()
    return fuzzer


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(batch=st.lists(messages(), min_size=BATCH[0], max_size=BATCH[1]))
@defer.inlineCallbacks
def test_rpc_surface(fuzzer, batch):
    yield fuzzer.run(batch)


# region what the fuzzing found, pinned


@pytest_twisted.inlineCallbacks
def test_replies_in_command_order(start):
    """
    Commands on one connection are answered in order, also when a command's
    Deferred is called but paused on an inner one (C{save}, C{export_worker}
    wait for the save lock): the dispatcher once took C{d.called} for
    "replied" and answered the next command first.
    """
    worker = yield start(name="order")
    client = yield worker.connect()
    yield client.call("add_node", id="add_node")
    for cmd in ("save", "export_worker", "get_save_state"):
        start_at = len(client.transcript)
        client.send_json({"type": "cmd", "cmd": cmd, "id": "first"})
        client.send_json({"type": "cmd", "cmd": "uuid", "id": "second"})
        yield client.wait_for(lambda m: m.get("id") == "second", start=start_at)
        replies = [m.get("id") for m in client.transcript[start_at:] if m.get("type") == "result"]
        assert replies == ["first", "second"], cmd


# endregion
