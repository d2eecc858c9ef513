"""
External workers: long-lived helpers inside the worker process that offer
their methods as nodes and run a periodic job (PROTOCOL.md section 13).

A package announces worker classes in its C{funcnodes.module} entry points:
C{external_worker} (one class or a list), else the module attribute
C{FUNCNODES_WORKER_CLASSES}. They are offered to clients once the package is
added as a dependency (L{register_module}); C{add_external_worker} then
starts an instance. Each instance has

  - a uuid, a name, a pydantic config and a data dir
    C{<data_path>/external_workers/<uuid>};
  - node classes C{<NODECLASSID>.<uuid>.<method>}, one per method decorated
    with C{instance_nodefunction}, on the library shelf
    C{["_external_worker", <uuid>]} (with its own shelf, if it publishes one,
    mounted beneath);
  - C{setup()} once, then C{loop()} every C{LOOP_INTERVAL} seconds, from a
    LoopingCall in the worker's service tree: instances start and stop with
    the worker.

Two kinds of classes run here. L{ExternalWorker} is ours and needs nothing
from the reference worker. Classes written for the reference worker (PyPI
packages subclass C{funcnodes_worker.FuncNodesExternalWorker}) are driven
directly rather than wrapped: their C{loop()} is called by the same
LoopingCall (their own asyncio C{continuous_run} never starts), their
C{running} flag is set for them, and their C{stop()} is their teardown. The
reference base is only recognised, never imported here: a class cannot
subclass it without its module having been imported already.
"""

import sys
from uuid import uuid4

from funcnodes_core import instance_nodefunction
from funcnodes_core.lib import flatten_shelf
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.internet.task import LoopingCall

from funcnodes_tw import aio, libraries

__all__ = [
    "ExternalWorker",
    "ExternalWorkerConfig",
    "ExternalWorkers",
    "WorkerNotFound",
    "instance_nodefunction",
    "register_module",
    "rpc",
    "unregister_module",
    "worker_classes",
]

_log = Logger()

#: The authors' side, in a module of its own: it needs pydantic (~6 MB with
#: pydantic-core), which a worker without external workers never imports.
_AUTHORS = "funcnodes_tw.external_api"
_AUTHORS_NAMES = {"ExternalWorker", "ExternalWorkerConfig", "export_excluded", "rpc"}


def __getattr__(name):
    if name in _AUTHORS_NAMES:
        import importlib

        return getattr(importlib.import_module(_AUTHORS), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The top library shelf under which every instance gets a shelf of its own.
SHELF = "_external_worker"
#: How long an instance may take to stop before the worker gives up on it.
STOP_TIMEOUT = 5.0
DEFAULT_INTERVAL = 1.0
MIN_INTERVAL = 0.1

_RPC_MARK = "__funcnodes_tw_rpc__"


class WorkerNotFound(ValueError):
    pass


# region discovery


def _reference_base():
    module = sys.modules.get("funcnodes_worker.external_worker")
    return getattr(module, "FuncNodesExternalWorker", None)


def _our_base():
    """
    L{ExternalWorker}, if imported: no class is one of ours before that.
    """
    return getattr(sys.modules.get(_AUTHORS), "ExternalWorker", None)


def is_worker_class(obj):
    if not isinstance(obj, type):
        return False
    ours = _our_base()
    if ours is not None and issubclass(obj, ours):
        return not obj.__dict__.get("IS_ABSTRACT", False)
    base = _reference_base()
    return base is not None and issubclass(obj, base) and obj is not base


def worker_classes(module):
    """
    The external worker classes an installed FuncNodes module announces.
    """
    found = module.entry_points.get("external_worker")
    if found is None:
        imported = module.module or module.entry_points.get("module")
        found = getattr(imported, "FUNCNODES_WORKER_CLASSES", None)
    if found is None:
        return []
    if not isinstance(found, (list, tuple)):
        found = [found]
    classes = []
    for cls in found:
        if is_worker_class(cls):
            classes.append(cls)
        else:
            _log.warn("{module}: {cls!r} is no external worker class", module=module.name, cls=cls)
    return classes


def register_module(worker, module):
    """
    Offer the worker classes of an installed module (the C{add_package}
    path); returns them.
    """
    return worker.external.register_module(module)


def local_script_hook(worker, module):
    """
    Called for every imported local script (L{libraries.LOCAL_SCRIPT_HOOKS}):
    its worker classes become usable by saved states, as in the reference.
    """
    classes = [obj for obj in vars(module).values() if is_worker_class(obj)]
    if classes:
        worker.external.register_local_classes(classes)


def unregister_module(worker, module):
    """
    Withdraw a module's worker classes and remove their instances; a
    Deferred that fires with None when they are gone.
    """
    return worker.external.unregister_module(module)


# endregion


def _validation_error():
    """
    pydantic's error class; pydantic is loaded once any worker class exists.
    """
    from pydantic import ValidationError

    return ValidationError


def _saved_uuid(entry):
    if isinstance(entry, dict):
        entry = entry.get("uuid")
    return entry if isinstance(entry, str) and entry else None


def _next_turn():
    """
    A Deferred that fires after what the loop has queued so far, i.e. after
    the events of the current command have been sent.
    """
    d = defer.Deferred()
    aio.call_soon(d.callback, None)
    return d


class Instance(Service):
    """
    One running external worker instance: its loop and its teardown.
    """

    def __init__(self, manager, instance):
        self.manager = manager
        self.instance = instance
        self.reference = not isinstance(instance, _our_base() or ())
        self.name = f"{instance.NODECLASSID}.{instance.uuid}"
        self.node_classes = []
        self.mounted = None
        self.removed = False
        self.self_stopped = False
        self._call = None
        self._setup = None

    @property
    def interval(self):
        instance = self.instance
        if self.reference:
            delay = getattr(instance, "_delay", DEFAULT_INTERVAL)
        else:
            delay = instance.LOOP_INTERVAL
        return max(float(delay), MIN_INTERVAL)

    def startService(self):
        super().startService()
        self.instance._running = True
        if self.reference:
            self._begin(None)
            return
        self._setup = aio.call(self.instance.setup)
        self._setup.addCallbacks(self._begin, self._setup_failed)

    def _begin(self, _):
        self._setup = None
        if not self.running:
            return
        self._call = LoopingCall(self._tick)
        self._call.clock = self.manager.clock
        self._call.start(self.interval, now=True).addErrback(
            lambda f: _log.failure("Loop of {name} ended", f, name=self.name)
        )

    def _setup_failed(self, failure):
        self._setup = None
        if not failure.check(defer.CancelledError):
            _log.failure("Setup of {name} failed; it will not loop", failure, name=self.name)

    def _tick(self):
        if getattr(self.instance, "_paused", False):
            return None
        d = aio.call(self.instance.loop)
        d.addErrback(lambda f: _log.failure("loop() of {name} failed", f, name=self.name))
        return d

    def stopService(self):
        """
        Stop looping and tear the instance down, giving it C{STOP_TIMEOUT}
        seconds. A C{loop()} already running is not waited for: an instance
        may stop itself from inside its loop.
        """
        super().stopService()
        if self._setup is not None:
            self._setup.cancel()
        if self._call is not None and self._call.running:
            self._call.stop()
        self._call = None
        d = self._teardown()
        d.addTimeout(STOP_TIMEOUT, self.manager.clock)
        d.addErrback(self._teardown_failed)
        d.addBoth(self._stopped)
        return d

    def _teardown(self):
        instance = self.instance
        if not self.reference:
            return aio.call(instance.close)
        instance.off("stopping", self.on_stopping)
        if self.self_stopped:
            return defer.succeed(None)
        return aio.call(instance.stop)

    def _teardown_failed(self, failure):
        if failure.check(defer.TimeoutError):
            _log.warn("{name} did not stop in {timeout} s", name=self.name, timeout=STOP_TIMEOUT)
        else:
            _log.failure("Stopping {name} failed", failure, name=self.name)

    def _stopped(self, _):
        self.instance._running = False

    # events of the instance

    def on_nodes_update(self, **kwargs):
        if not self.removed:
            self.manager.update_shelf(self)

    def on_stopping(self, **kwargs):
        """
        A reference-style instance ran its own C{stop()}: remove it.
        """
        if self.removed:
            return
        self.self_stopped = True
        aio.call_soon(self._remove_later)

    def _remove_later(self):
        self.manager.remove(self).addErrback(
            lambda f: _log.failure("Removing {name} failed", f, name=self.name)
        )


class ExternalWorkers(MultiService):
    """
    A worker's external worker classes and instances; its child services
    are the running instances.
    """

    def __init__(self, worker):
        super().__init__()
        self.setName("external_workers")
        self.worker = worker
        #: module name -> worker classes it announced (what clients may start)
        self.modules = {}
        #: classes known only for loading saved states (local scripts)
        self.local_classes = []
        #: NODECLASSID -> {instance uuid: Instance}
        self.instances = {}
        #: NODECLASSID -> saved instances of classes not (yet) known: kept in
        #: saves, started when a package brings their class
        self.pending = {}

    @property
    def clock(self):
        return self.worker.clock

    # region classes

    def register_module(self, module):
        classes = worker_classes(module)
        if classes and module.name not in self.modules:
            self.modules[module.name] = classes
            self.worker.send_later(self._send_dependencies)
            for cls in classes:
                self._start_saved(cls, self.pending.pop(cls.NODECLASSID, ()))
        return classes

    def register_local_classes(self, classes):
        """
        Classes that saved states may use but clients cannot start (the
        reference's local scripts); a reloaded script's class replaces the
        one with its NODECLASSID.
        """
        for cls in classes:
            if is_worker_class(cls):
                others = [c for c in self.local_classes if c.NODECLASSID != cls.NODECLASSID]
                self.local_classes = [*others, cls]

    def unregister_module(self, module):
        classes = self.modules.pop(module.name, None)
        if classes is None:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._unregister(classes))

    async def _unregister(self, classes):
        for cls in classes:
            for handle in list(self.instances.get(cls.NODECLASSID, {}).values()):
                await self.remove(handle)
        self.worker.send_later(self._send_dependencies)
        self.worker.send_later(self.worker.worker_event, "lib_update")

    def _send_dependencies(self):
        self.worker.worker_event(
            "update_worker_dependencies", worker_dependencies=self.dependencies()
        )

    def classes(self):
        seen = []
        for cls in [c for classes in self.modules.values() for c in classes] + self.local_classes:
            if cls not in seen:
                seen.append(cls)
        return seen

    def find_class(self, class_id):
        for cls in self.classes():
            if cls.NODECLASSID == class_id:
                return cls
        return None

    def offered_class(self, module, cls_module, cls_name):
        for cls in self.modules.get(module, ()):
            if cls.__name__ == cls_name and cls.__module__ == cls_module:
                return cls
        raise WorkerNotFound(f"Worker {cls_name}({cls_module}) not found in {module}")

    def dependencies(self):
        """
        What C{get_worker_dependencies} returns: a WorkerDict per module.
        """
        return [
            {"module": name, "worker_classes": [self._class_json(cls) for cls in classes]}
            for name, classes in self.modules.items()
        ]

    def _class_json(self, cls):
        handles = self.instances.get(cls.NODECLASSID, {}).values()
        return {
            "module": cls.__module__,
            "class_name": cls.__name__,
            "name": getattr(cls, "NAME", None) or cls.__name__,
            "_classref": repr(cls),
            "instances": [handle.instance.serialize() for handle in handles],
        }

    def running_ids(self):
        """
        C{full_state}'s C{worker}: instance uuids per class id.
        """
        ids = [cls.NODECLASSID for cls in self.classes()]
        ids += [cid for cid, handles in self.instances.items() if handles]
        return {cid: list(self.instances.get(cid, {})) for cid in dict.fromkeys(ids)}

    def save_state(self, export=False):
        """
        The WorkerState's C{external_workers}, with the saved instances
        whose class is missing as they were.
        """
        state = {
            cid: [self.instances[cid][uuid].instance.serialize(export=export) for uuid in uuids]
            for cid, uuids in self.running_ids().items()
        }
        for cid, entries in self.pending.items():
            state.setdefault(cid, []).extend(entries)
        return state

    # endregion
    # region instances

    def find(self, class_id, uuid):
        return self.instances.get(class_id, {}).get(uuid)

    def start(self, cls, uuid=None, name=None, config=None):
        """
        Start an instance of C{cls} (or update the one with that uuid).
        """
        uuid = uuid or uuid4().hex
        handle = self.find(cls.NODECLASSID, uuid)
        if handle is not None:
            self.update(handle, name=name, config=config)
            return handle.instance
        data_path = self.worker.files.data / "external_workers" / uuid
        try:
            instance = cls(workerid=uuid, config=config, data_path=data_path, name=name)
        except _validation_error() as exc:
            _log.warn("Invalid config of {uuid} ignored: {exc}", uuid=uuid, exc=exc)
            instance = cls(workerid=uuid, data_path=data_path, name=name)
        handle = Instance(self, instance)
        self.instances.setdefault(cls.NODECLASSID, {})[uuid] = handle
        instance.on("nodes_update", handle.on_nodes_update)
        if handle.reference:
            instance.on("stopping", handle.on_stopping)
        else:
            instance._remove = lambda: self.remove(handle)
        handle.node_classes = list(instance.get_all_nodeclasses())
        self.update_shelf(handle)
        handle.setServiceParent(self)
        self.worker.request_save()
        self.worker.send_later(self.worker.worker_event, "external_worker_update")
        return instance

    def update_shelf(self, handle):
        """
        (Re)build the instance's shelf: its node classes, and its own shelf
        mounted beneath when it publishes one.
        """
        lib = self.worker.nodespace.lib
        path = [SHELF, handle.instance.uuid]
        self._unmount(handle)
        lib.add_nodes(handle.node_classes, path)
        shelf = handle.instance.get_nodeshelf()
        if shelf is not None:
            lib.add_subshelf_weak(shelf, path)
            handle.mounted = shelf.name

    def _unmount(self, handle):
        lib = self.worker.nodespace.lib
        own = [SHELF, handle.instance.uuid]
        paths = [[*own, handle.mounted], own] if handle.mounted else [own]
        handle.mounted = None
        for path in paths:
            try:
                lib.remove_shelf_path(path)
            except ValueError:
                pass

    def update(self, handle, name=None, config=None):
        instance = handle.instance
        if name is not None:
            instance.name = name
        if config is not None:
            instance.update_config(config)
        self.worker.request_save()
        self.worker.send_later(self.worker.worker_event, "external_worker_update")

    def remove(self, handle):
        """
        Take an instance out: its node classes, shelf and nodes go, then it
        stops. A Deferred firing with True once that is done and announced.
        """
        return defer.Deferred.fromCoroutine(self._remove(handle))

    async def _remove(self, handle):
        if handle.removed:
            return True
        handle.removed = True
        instance, worker = handle.instance, self.worker
        lib, nodespace = worker.nodespace.lib, worker.nodespace
        self.instances.get(instance.NODECLASSID, {}).pop(instance.uuid, None)
        classes, handle.node_classes = handle.node_classes, []
        lib.remove_nodeclasses(classes)
        ids = {cls.node_id for cls in classes}
        shelf = instance.get_nodeshelf() if handle.mounted else None
        if shelf is not None:
            ids.update(cls.node_id for cls in flatten_shelf(shelf)[0])
        self._unmount(handle)
        for node in list(nodespace.nodes):
            if node.node_id in ids:
                nodespace.remove_node_instance(node)
        if handle.parent is not None:
            await defer.maybeDeferred(handle.disownServiceParent)
        if not handle.reference:
            instance._remove = None
        instance.cleanup()  # a second cleanup (reference stop() ran one) is harmless
        worker.request_save()
        worker.send_later(worker.worker_event, "external_worker_update")
        await _next_turn()
        return True

    def load_state(self, state):
        """
        Start the instances a WorkerState lists, before its nodes are made:
        its C{external_workers}, and the C{nodeclass} requirements of nodes.
        """
        saved = state.get("external_workers")
        self.pending = {}
        for class_id, entries in (saved if isinstance(saved, dict) else {}).items():
            entries = [e for e in entries or () if _saved_uuid(e)]
            cls = self.find_class(class_id)
            if cls is None:
                if entries:
                    _log.warn("External worker {class_id} not found", class_id=class_id)
                    self.pending[class_id] = entries
                continue
            self._start_saved(cls, entries)
        for node in (state.get("backend") or {}).get("nodes") or ():
            requirements = node.get("requirements") if isinstance(node, dict) else None
            for req in requirements or ():
                if not isinstance(req, dict) or req.get("type") != "nodeclass":
                    continue
                cls = self.find_class(req.get("class"))
                if cls is not None and req.get("id") and not self.find(cls.NODECLASSID, req["id"]):
                    self._start_saved(cls, [req["id"]])

    def _start_saved(self, cls, entries):
        """
        Start saved instances; one that fails stays pending (and saved).
        """
        for entry in entries:
            saved = {"uuid": entry} if isinstance(entry, str) else entry
            try:
                self.start(cls, saved["uuid"], name=saved.get("name"), config=saved.get("config"))
            except Exception:
                _log.failure("External worker {uuid} could not start", uuid=saved["uuid"])
                self.pending.setdefault(cls.NODECLASSID, []).append(entry)

    def call(self, handle, method, kwargs):
        """
        Run an C{@rpc} method of an instance; a Deferred of its result.
        """
        function = getattr(type(handle.instance), method, None)
        if not getattr(function, _RPC_MARK, False):
            raise ValueError(f"Worker {handle.instance.uuid} has no method {method!r}")
        return aio.call(getattr(handle.instance, method), **(kwargs or {}))

    # endregion


_HOOKS = getattr(libraries, "LOCAL_SCRIPT_HOOKS", None)
if _HOOKS is not None and local_script_hook not in _HOOKS:
    _HOOKS.append(local_script_hook)
