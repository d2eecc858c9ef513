"""
The worker's state: one node space, its identity and what clients are told.

L{Worker} owns no sockets and no timers. It turns node-space events into wire
messages for an outlet (the L{funcnodes_tw.hub.Hub}), remembers whether a save
is due, and is what the RPC commands in L{funcnodes_tw.commands} act on.
"""

import os
from time import perf_counter
from uuid import uuid4

import funcnodes_core as fn
import orjson
from funcnodes_core.lib import Library
from funcnodes_core.utils import saving
from twisted.internet.defer import DeferredLock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcnodes_tw import aio, persistence, wire
from funcnodes_tw.external import ExternalWorkers

_log = Logger()

#: Node-space events the reference never forwards (PROTOCOL.md section 6).
SUPPRESSED = frozenset(
    {
        "before_set_value",
        "before_request_trigger",
        "after_request_trigger",
        "before_disconnect",
        "before_connect",
        "before_trigger",
        "after_trigger",
        "before_unforward",
        "before_forward",
    }
)

#: Events after which a node may hold a trigger request that nothing else
#: would run (L{funcnodes_tw.loops.TriggerDrain}): it asked for a trigger
#: while busy, or its running trigger set a value or ended (funcnodes-core's
#: C{await_trigger} notes a request without an event of its own). The other
#: events, most of a running graph's, need no look-up of their node.
DRAIN_EVENTS = frozenset(
    {"after_request_trigger", "after_set_value", "triggerdone", "node_trigger_error"}
)

#: Node events the metrics count (L{funcnodes_tw.metrics.Metrics.node_event}).
TRIGGER_EVENTS = frozenset({"triggerstart", "triggerfast", "triggerdone", "node_trigger_error"})

#: Parts of a saved WorkerState that must be objects when present.
STATE_OBJECTS = ("backend", "meta", "view")

DEFAULT_POS = (0, 0)
DEFAULT_SIZE = (200, 250)


class NullOutlet:
    """
    Where messages go while no server is attached (tests, startup).
    """

    def broadcast(self, message, hold=False):
        pass

    def broadcast_binary(self, payload, header, hold=False):
        pass


class Worker:
    """
    One FuncNodes worker: a node space plus identity, view and progress state.
    """

    def __init__(self, files, uuid, name=None, debug=False, outlet=None, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.last_heartbeat = clock.seconds()
        self.files = files
        self.uuid = uuid
        self.name = name
        self.debug = debug
        #: Where C{get_available_modules} refreshes the module list from;
        #: None: never (the service sets it from the settings).
        self.module_list_url = None
        self.outlet = outlet or NullOutlet()
        self.host = None
        self.port = None
        self.ssl = False
        self.runstate = "undefined"
        self.config = {}
        self.package_dependencies = {}
        self.nodespace_id = uuid4().hex
        self.viewdata = {"renderoptions": fn.config.FUNCNODES_RENDER_OPTIONS}
        self.progress_state = {"message": "", "status": "", "progress": 0, "blocking": False}
        self.save_requested = False
        #: Why the last save failed (disk full...), None while saving works.
        self.save_error = None
        #: Called with the C{node} field of the L{DRAIN_EVENTS} (the trigger
        #: drain checks whether that node holds a trigger request).
        self.on_node_event = lambda nid: None
        #: Called when a save is requested (the saver starts its timer).
        self.on_save_request = lambda: None
        #: A L{funcnodes_tw.metrics.Metrics} counting triggers and saves, or None.
        self.metrics = None
        self.stop = lambda: None
        self._later = []
        self._library = None
        self._save_lock = DeferredLock()
        self.nodespace = fn.NodeSpace()
        self.nodespace.on("*", self._on_nodespace_event)
        self.nodespace.on_error(self._on_nodespace_error)
        self.nodespace.lib.on("*", self._on_lib_event)
        self.external = ExternalWorkers(self)
        self._set_files_dir()

    # region outgoing messages

    def send(self, message, hold=False):
        """
        Broadcast now: progress and worker events a command awaits itself;
        node events C{hold} to go out with the rest of their burst.
        """
        self.outlet.broadcast(message, hold)

    def send_later(self, function, *args):
        """
        Queue work for the loop's next turn, in order, after the current command.
        """
        if not self._later:
            aio.call_soon(self._flush)
        self._later.append((function, args))

    def _flush(self):
        pending, self._later = self._later, []
        for function, args in pending:
            try:
                function(*args)
            except Exception:
                _log.failure("Sending an event failed")

    def worker_event(self, event, **data):
        self.send(wire.workerevent(event, **data))

    def set_progress(self, message, status, progress, blocking):
        self.progress_state = {
            "message": message,
            "status": status,
            "progress": progress,
            "blocking": blocking,
        }
        self.send(wire.progress(**self.progress_state))

    def send_io_value(self, node, io, value):
        mime, payload = wire.encode_value(value, preview=True)
        header = {"node": node, "io": io, "mime": mime, "type": "io_value", "preview": "1"}
        self.outlet.broadcast_binary(payload, header, hold=True)

    def _on_nodespace_event(self, event, src=None, **data):
        if event in DRAIN_EVENTS:
            self.on_node_event(data.get("node"))
        if event in TRIGGER_EVENTS and self.metrics is not None:
            self.metrics.node_event(event, data.get("node"))
        if event in SUPPRESSED:
            return
        if event == "after_set_value":
            self.send_later(self.send_io_value, data["node"], data["io"], data["result"])
            return
        if isinstance(data.get("result"), Library):  # after_add_shelf, after_remove_shelf
            self.send_later(self._send_library_event, event, data)
            return
        if event == "node_added":
            wire.bound_node(data["node"])
        if event in ("node_error", "node_trigger_error"):
            _log.warn("Node {node} failed: {error}\n{traceback}", node=data.get("node"),
                      error=data.get("error"), traceback="".join(data.get("tb") or ()))
            data = wire.node_error(data, self.debug)
        self.send_later(self.send, wire.nsevent(event, data), True)

    def _send_library_event(self, event, data):
        """
        Send an event whose result is the whole library with the encoded
        library that C{get_library} and C{full_state} then reuse: encoding
        it takes tens of milliseconds, and a library change is followed by
        a C{get_library} from every UI.
        """
        self.send(wire.nsevent(event, {**data, "result": self.library_json()}), True)

    def _on_nodespace_error(self, error, src=None):
        _log.error("Node space error: {error!r}\n{traceback}", error=error,
                   traceback="".join(wire.public_traceback(error, debug=True)))
        self.send_later(self.send, wire.error_event(error, self.debug))

    def _on_lib_event(self, event, **data):
        self._library = None
        self.send_later(self.worker_event, "lib_update")

    def library_json(self):
        """
        The library, encoded: most of C{full_state} and all of C{get_library},
        and unchanged until a library event says otherwise.
        """
        if self._library is None:
            self._library = orjson.Fragment(wire.dumps(self.nodespace.lib.full_serialize()))
        return self._library

    def backend_state(self):
        """
        C{full_state}'s C{backend}, as funcnodes-core encodes a NodeSpace, but
        built from each node's own dict so that orjson, not funcnodes-core's
        recursive Python encoder, walks it.
        """
        nodespace = self.nodespace
        return {
            "nodes": [wire.describe_node(node) for node in nodespace.nodes],
            "prop": nodespace._properties,
            "lib": self.library_json(),
            "edges": nodespace.serialize_edges(),
        }

    # endregion
    # region state

    def request_save(self):
        self.save_requested = True
        self.on_save_request()

    def save(self, state=None):
        """
        Write C{nodespace.json} and the registration file.

        The state is serialized here, on the reactor, where the graph cannot
        change under us; the disk writes run in a thread, one save at a time.

        A failed save (a full disk) leaves the previous file in place and the
        save requested, so the save loop tries again every second; the first
        failure is logged and shown to clients as an error C{progress}, and
        the first success after it as a C{success} one.
        """
        self.save_requested = False
        started = perf_counter()
        payload = wire.dumps(self.save_state() if state is None else state)
        config = self.worker_json()
        self.config = config
        d = self._save_lock.run(deferToThread, _write_saved, self.files, payload, config)
        d.addCallbacks(self._saved, self._save_failed)
        if self.metrics is not None:
            d.addBoth(self._count_save, started)
        return d

    def _count_save(self, result, started):
        self.metrics.saved(started, isinstance(result, Failure))
        return result

    def _saved(self, result):
        if self.save_error is not None:
            self.save_error = None
            _log.info("Saving the worker state works again")
            self.set_progress("Worker state saved", "success", 1, False)
        return result

    def _save_failed(self, failure):
        self.save_requested = True
        error = f"{type(failure.value).__name__}: {failure.value}"
        if self.save_error is None:
            _log.failure("Saving the worker state failed; retrying every second", failure)
            self.set_progress(f"Saving failed, changes are not on disk: {error}", "error", 0, False)
        self.save_error = error
        return failure

    def _set_files_dir(self):
        self.files.files.mkdir(parents=True, exist_ok=True)
        self.nodespace.set_secret_property("files_dir", self.files.files.as_posix())

    @property
    def worker_dependencies(self):
        """
        Names of the modules whose external worker classes are offered.
        """
        return list(self.external.modules)

    def display_name(self):
        """
        The name every client sees (C{name}, C{get_config}, the registration
        the manager lists): without one of its own a worker goes by its
        uuid, as the reference's does.
        """
        return self.name or self.uuid

    def meta(self):
        return {"id": self.nodespace_id, "version": fn.__version__}

    def set_nodespace_id(self, nsid):
        if not isinstance(nsid, str) or len(nsid) != 32:
            raise ValueError("nsid must be 32 characters long")
        self.nodespace_id = nsid

    def view_state(self):
        self.viewdata["renderoptions"] = fn.config.FUNCNODES_RENDER_OPTIONS
        view = dict(self.viewdata)
        view["nodes"] = {
            node.uuid: {
                "pos": node.get_property("frontend:pos", DEFAULT_POS),
                "size": node.get_property("frontend:size", DEFAULT_SIZE),
            }
            for node in self.nodespace.nodes
        }
        return view

    def save_state(self, export=False):
        """
        The WorkerState that C{nodespace.json} holds (PROTOCOL.md 12.2);
        C{export} leaves out external worker config fields marked private.
        """
        view = self.view_state()
        view.pop("nodes", None)
        return {
            "backend": saving.serialize_nodespace_for_saving(self.nodespace),
            "view": view,
            "meta": self.meta(),
            "external_workers": self.external.save_state(export),
        }

    def worker_json(self):
        """
        The registration file's content (PROTOCOL.md 9.2), with live host/port.
        """
        config = dict(self.config)
        fields = {
            "type": "WSWorker",
            "uuid": self.uuid,
            "name": self.display_name(),
            "data_path": (
                None if self.files.data == self.files.default_data else str(self.files.data)
            ),
            "env_path": config.get("env_path"),
            "worker_dependencies": {d["module"]: d for d in self.external.dependencies()},
            "package_dependencies": dict(self.package_dependencies),
            "pid": os.getpid(),
            "autostart": config.get("autostart", "never"),
            "update_on_startup": {
                "funcnodes": True,
                "funcnodes-core": True,
                "funcnodes-worker": True,
                **config.get("update_on_startup", {}),
            },
            "host": self.host,
            "port": self.port,
            "ssl": self.ssl,
        }
        for key in fields:
            config.pop(key, None)
        fields.update(config)
        config = fields
        return config

    def set_runstate(self, state, detail=None):
        """
        Tell the manager how far we are. Only informational: a full disk
        must not stop a shutdown halfway (before saving and closing).
        """
        self.runstate = state
        text = state if detail is None else f"{state}\n{detail}"
        try:
            persistence.write_text(self.files.runstate, text)
        except OSError as exc:
            _log.warn("Cannot write {path}: {error}", path=self.files.runstate, error=exc)

    def write_config(self):
        config = self.worker_json()
        persistence.write_config(self.files.config, config)
        self.config = config
        return config

    def clear(self):
        self.nodespace.clear()
        self._set_files_dir()

    def load(self, state):
        """
        Replace the graph with a saved WorkerState (PROTOCOL.md 12.2).

        The parts are checked first: a C{view} that is no object would
        otherwise stay behind and make every later save fail. A state that
        fails halfway puts the previous graph back, so that the next save
        cannot write a cleared one over the user's file.
        """
        for key in STATE_OBJECTS:  # falsy parts count as missing, as below
            if state.get(key) and not isinstance(state[key], dict):
                raise ValueError(f"{key} of a worker state must be an object")
        previous = self.save_state()
        try:
            self._replace(state)
        except Exception:
            self._replace(previous)
            raise

    def _replace(self, state):
        self.clear()
        backend = state.get("backend") or {"nodes": [], "edges": [], "prop": {}}
        meta = state.get("meta") or {}
        if "id" in meta:
            self.set_nodespace_id(meta["id"])
        self.viewdata = state.get("view") or {"renderoptions": {}}
        self.external.load_state(state)
        self.nodespace.deserialize(backend)
        self.nodespace.remove_property("files_dir")
        self._set_files_dir()
        for nid, view in (self.viewdata.get("nodes") or {}).items():
            try:
                node = self.nodespace.get_node_by_id(nid)
            except Exception:
                continue
            set_node_view(node, view)
        if not aio.event_loop().is_running():
            # Loaded at start, before the reactor runs: funcnodes-core has
            # started nothing, since it triggers a new node only inside a
            # running loop. The loop's first turn does it instead.
            aio.call_soon(self._trigger_created)

    def _trigger_created(self):
        """
        Start what funcnodes-core starts when it creates a node inside a
        running loop: every node that triggers on creation and is ready.
        """
        for node in self.nodespace.nodes:
            if node.trigger_on_create and node.ready_to_trigger():
                node.request_trigger()

    # endregion


def _write_saved(files, payload, config):
    persistence.write_atomic(files.state, payload)
    persistence.write_config(files.config, config)


def set_node_view(node, view):
    if view.get("pos"):
        node.set_property("frontend:pos", view["pos"])
    if view.get("size"):
        node.set_property("frontend:size", view["size"])
