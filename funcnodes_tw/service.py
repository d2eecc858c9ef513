"""
The service tree of one worker.

    WorkerService          files, state, registration; stop = save + close
      ├─ isolation         process pool, commands, thread pools (stops last)
      ├─ listener          the one port (WebSocket + HTTP), standalone only
      ├─ triggers          node triggers, every 5 ms while there is work
      ├─ save              writes state within 1 s of a change
      ├─ messages          expires parked large messages
      ├─ heartbeat         optional: stop when clients stop sending heartbeats
      ├─ reactor-watch     reactor lag and stalls (a thread; real reactors only)
      ├─ watchdog          systemd's WATCHDOG=1, when systemd asks for it
      └─ external_workers  external worker instances, each looping (external.py)

A host application builds one with L{create}, mounts its C{resource} under
any path of its own Site and adds the service to its own tree; the
standalone daemon (L{funcnodes_tw.tap}) adds a L{Listener}.
"""

import os
import sys

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from funcnodes_tw import corefixes, isolation, libraries, loops, packages, persistence, systemd, tls
from funcnodes_tw.access import OriginPolicy
from funcnodes_tw.commands import COMMANDS, library
from funcnodes_tw.hub import Hub
from funcnodes_tw.logs import LEVELS, WorkerLog
from funcnodes_tw.messages import LargeMessageStore
from funcnodes_tw.metrics import Collector, Exposition, Metrics
from funcnodes_tw.protocol import make_factory, protocol_options
from funcnodes_tw.resources import make_root
from funcnodes_tw.rpc import Dispatcher
from funcnodes_tw.settings import Settings
from funcnodes_tw.watch import ReactorWatch
from funcnodes_tw.worker import Worker

_log = Logger()

CLOSE_TIMEOUT = 3.0


class AlreadyRunning(Exception):
    pass


def _alive(pid):
    """
    Whether C{pid} is a live FuncNodes process (a recycled pid is not).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"funcnodes" in f.read()
    except OSError:
        return True


def claim_process_file(path):
    """
    Write our pid to the C{.p} file unless a live worker owns it already.

    A stale file (crash, SIGKILL) never blocks a start. Its content is only
    ever read as a pid: unlike the reference, it is no command channel.
    """
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        pid = None
    if pid and pid != os.getpid() and _alive(pid):
        raise AlreadyRunning(f"Worker already running with pid {pid} ({path})")
    persistence.write_text(path, str(os.getpid()))


class WorkerService(MultiService):
    def __init__(self, worker, clock, settings=None, registry=None):
        super().__init__()
        self.setName("funcnodes-worker")
        self.worker = worker
        self.clock = clock
        self.settings = settings = settings or Settings()
        worker.stop = self._stop_alone
        worker.debug = settings.debug
        if settings.refresh_module_list:
            worker.module_list_url = settings.module_list_url
        self.log = WorkerLog(worker.files.data, LEVELS[settings.log_level], settings.log_format)
        self.store = LargeMessageStore(
            clock, base_url=self._base_url, max_bytes=settings.max_message_store
        )
        self.metrics = worker.metrics = Metrics(COMMANDS) if settings.metrics else None
        self.hub = Hub(
            settings.max_message_size, self.store, settings.max_binary_frame, metrics=self.metrics
        )
        worker.outlet = self.hub
        self.dispatcher = Dispatcher(worker, self.hub, settings.command_timeout, self.metrics)
        self.origins = OriginPolicy(settings.allowed_origins)
        self.factory = make_factory(
            self.hub,
            self.dispatcher,
            protocol_options(
                settings.max_incoming_size, settings.ping_interval, settings.ping_timeout
            ),
            self.origins,
            settings.max_client_queue,
            settings.max_connections,
            self.metrics,
        )
        self.watch = None
        if IReactorThreads.providedBy(clock):  # a real reactor, not a test's Clock
            self.watch = ReactorWatch(clock, settings.stall_threshold)
            self.watch.setServiceParent(self)
        self.exposition = None
        if self.metrics is not None:
            self.metrics.watch = self.watch
            labels = {"worker": worker.uuid} if registry is not None else None
            collector = Collector(self.metrics, self._gauges, labels)
            self.exposition = Exposition(collector, registry)
        self.started_at = clock.seconds()
        self.resource = make_root(
            worker, self.factory, self.store, self.dispatcher, self.origins, settings.token,
            health=self.health, exposition=self.exposition,
        )
        interval = systemd.watchdog_interval()
        if interval is not None:
            systemd.watchdog(interval, clock).setServiceParent(self)
        #: Packages to pip-install once the port listens, and that work.
        self.missing_packages = []
        self.startup_jobs = defer.succeed(None)
        self._startup_call = None

        if settings.cluster:  # before isolation: stops after the triggers are cancelled
            from funcnodes_tw.cluster import Cluster

            Cluster(
                worker, settings.cluster, settings.cluster_fallback, settings.cluster_nodes
            ).setServiceParent(self)
        isolation.Isolation(worker.nodespace, clock).setServiceParent(self)
        self.triggers = loops.TriggerDrain(worker.nodespace, clock)
        self.triggers.setServiceParent(self)
        worker.on_node_event = self.triggers.node_event
        saver = loops.saver(worker, clock)
        saver.setServiceParent(self)
        worker.on_save_request = saver.kick
        expirer = loops.expirer(self.store, clock)
        expirer.setServiceParent(self)
        self.store.on_put = expirer.kick
        required = settings.required_heartbeat
        if required:
            loops.timer(
                "heartbeat",
                min(5.0, required / 10),
                lambda: loops.heartbeat_check(worker, required),
                clock,
            ).setServiceParent(self)
        worker.external.setServiceParent(self)

    def _gauges(self):
        clients = self.hub.clients
        return {
            "clients": len(clients),
            "largest_queue": max((client.outbox.size for client in clients), default=0),
            "parked_bytes": self.store.size,
            "sent": self.metrics.sent_now(clients),
        }

    def health(self):
        """
        C{(healthy, body)} for C{GET /health}: healthy while running with a
        reactor that turns in time. Nothing in it is secret.
        """
        state = self.worker.runstate
        if state == "running" and self.watch is not None and self.watch.stalled():
            state = "stalled"
        body = {
            "status": state,
            "uptime": round(self.clock.seconds() - self.started_at, 3),
            "clients": len(self.hub.clients),
        }
        return state == "running", body

    def _stop_alone(self):
        """
        C{stop_worker} inside a host application stops this service only.
        """
        if self.parent is not None:
            self.disownServiceParent()
        elif self.running:
            self.stopService()

    def _base_url(self):
        scheme = "https" if self.worker.ssl else "http"
        return f"{scheme}://{self.worker.host}:{self.worker.port}"

    def startService(self):
        self.prepare()
        super().startService()

    def prepare(self):
        """
        Load config, packages and the saved graph before anything listens.
        """
        worker, files = self.worker, self.worker.files
        files.create()
        self.log.start()
        claim_process_file(files.process)
        for path in (files.state, files.config, files.runstate, files.process):
            persistence.remove_stale_temporaries(path)
        worker.set_runstate("starting", "Loading config")
        config = _read_config(files.config)
        if config is None:
            config = {p: {"package": p, "version": None} for p in libraries.DEFAULT_PACKAGES}
            config = {"package_dependencies": config}
        worker.config = config
        if worker.name is None:
            worker.name = _configured_name(config.get("name"), files.config)
        worker.set_runstate("starting", "Loading packages")
        # Installed packages load now; missing ones are installed after the
        # port listens (pip may take minutes), their nodes kept as
        # placeholders until then.
        packages.installer_for(worker).closing = False
        self.missing_packages = library.load_dependencies(worker, config.get("package_dependencies"))
        try:
            library.load_local_scripts(worker)
        except Exception:
            _log.failure("Loading local scripts failed")
        worker.set_runstate("starting", "Loading nodespace")
        try:
            state = persistence.load_state(files.state)
        except persistence.StateFileError as exc:
            _log.error("{exc}", exc=exc)
            state = None
        if state is not None:
            worker.load(library.keep_io_ids(state))
        worker.save_requested = False
        # Clients can send heartbeats only from now on: loading is no silence.
        worker.last_heartbeat = self.clock.seconds()
        worker.worker_event("starting")

    def listening(self, address, ssl=False):
        """
        Called once the port is bound: now the registration is true. A host
        application calls it with its own port's address (and C{ssl=True}
        when that port speaks TLS).
        """
        worker = self.worker
        worker.host, worker.port, worker.ssl = address.host, address.port, ssl
        self.origins.bound_host = address.host
        worker.write_config()
        worker.set_runstate("running")
        secure = "s" if ssl else ""
        url = f"ws{secure}://{worker.host}:{worker.port}"
        _log.info("Worker {uuid} listening on {url}", uuid=worker.uuid, url=url)
        query = "?token=<the token>" if self.settings.token else ""  # never the token itself
        _log.info(
            "Open the UI: http{s}://{host}:{port}/{query}",
            s=secure, host=worker.host, port=worker.port, query=query,
        )
        systemd.notify(f"READY=1\nSTATUS=listening on {url}")
        self.startup_jobs = defer.Deferred()
        self._startup_call = self.clock.callLater(0, self._run_startup_jobs)

    def _run_startup_jobs(self):
        """
        pip work of the start (missing packages, C{update_on_startup}),
        never before the port is up; C{startup_jobs} fires when it is done.
        """
        self._startup_call = None
        missing, self.missing_packages = self.missing_packages, []
        d = defer.Deferred.fromCoroutine(library.startup_jobs(self.worker, missing))
        d.addErrback(lambda failure: _log.failure("Package work after the start failed", failure))
        d.chainDeferred(self.startup_jobs)

    def stopService(self):
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        """
        Save, tell the clients, close them and stop the children; whatever
        fails on the way is logged and the worker's files are removed anyway.
        """
        worker = self.worker
        systemd.notify("STOPPING=1")
        try:
            worker.worker_event("stopping")
            worker.set_runstate("stopped")
            if self._startup_call is not None and self._startup_call.active():
                self._startup_call.cancel()
                self.startup_jobs.callback(None)
            await packages.installer_for(worker).close()
            try:
                await worker.save()
            except Exception:
                _log.failure("Saving on shutdown failed")
            await self.hub.close_all("Server shutting down", self.clock, CLOSE_TIMEOUT)
            self.store.clear()
            await super().stopService()
        except Exception:
            _log.failure("Stopping the worker failed")
        finally:
            persistence.remove(worker.files.process)
            persistence.remove(worker.files.runstate)
            _log.info("Worker {uuid} stopped", uuid=worker.uuid)
            self.log.stop()


def create(
    uuid,
    data_path=None,
    name=None,
    clock=None,
    workers_dir=None,
    settings=None,
    registry=None,
    **values,
):
    """
    A worker service for an existing Twisted application.

        fn = create("my-worker", data_path="/srv/fn")
        fn.setServiceParent(application)
        root.putChild(b"fn", fn.resource)   # the UI connects to ws://host:port/fn/

    The registration files go to C{workers_dir} (default: the FuncNodes
    config's C{workers/}); C{settings} is a L{Settings}, or its fields are
    given as keyword arguments. A C{prometheus_client} C{registry} of the
    host gets the worker's metrics (labelled C{worker=<uuid>}); without
    one, C{GET /metrics} serves a registry of their own.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    corefixes.apply()
    files = persistence.WorkerFiles(uuid, data_path, workers_dir)
    worker = Worker(files, uuid, name=name, clock=clock)
    return WorkerService(worker, clock, settings or Settings(**values), registry)


def _read_config(path):
    try:
        config = persistence.read_json(path)
    except ValueError as exc:
        _log.error("Ignoring unreadable worker config {path}: {exc}", path=path, exc=exc)
        return None
    return config if isinstance(config, dict) else None


def _configured_name(value, path):
    """
    The name the config gives: a string that is not blank, else None (the
    worker then goes by its uuid).
    """
    if value is None or isinstance(value, str):
        return (value or "").strip() or None
    _log.warn("Ignoring the name {value!r} in {path}: not a string", value=value, path=path)
    return None


def is_tls(port):
    """
    Whether a listening port speaks TLS (C{ssl:} endpoints wrap the factory).

    Twisted's TLS module (with pyOpenSSL: several MB) is looked up, not
    imported: a port cannot speak TLS unless it was imported to make it.
    """
    tls = sys.modules.get("twisted.protocols.tls")
    return tls is not None and isinstance(getattr(port, "factory", None), tls.TLSMemoryBIOFactory)


class Listener(Service):
    """
    Listen on the first endpoint that is free, in order.

    With several candidates (the default port search) a port in use moves on
    to the next; with one, failing to listen stops the daemon with a clear
    message instead of the reference's endless retry.
    """

    name = "listener"

    def __init__(self, descriptions, factory, reactor, on_listening, on_failure):
        self.descriptions = list(descriptions)
        self.factory = factory
        self.reactor = reactor
        self.on_listening = on_listening
        self.on_failure = on_failure
        self.port = None

    def startService(self):
        super().startService()
        self.listened = defer.Deferred()
        # Not before the reactor runs: only then are its signal handlers in
        # place, and a SIGTERM right after READY must stop us cleanly.
        self.reactor.callWhenRunning(self._start)

    def _start(self):
        if not self.running:
            return
        d = defer.Deferred.fromCoroutine(self._listen())
        d.addErrback(self.on_failure)
        d.chainDeferred(self.listened)

    async def _listen(self):
        error = None
        for description in self.descriptions:
            try:
                endpoint = tls.server_from_string(self.reactor, description)
                self.port = await endpoint.listen(self.factory)
            except CannotListenError as exc:
                error = exc
                continue
            self.on_listening(self.port.getHost(), ssl=is_tls(self.port))
            return self.port
        raise error

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
