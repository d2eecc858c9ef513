"""
Heavy nodes on a Dask cluster: the connection to its scheduler, and the
calls sent there.

With C{--cluster tcp://host:8786} (config key C{cluster}) the calls that
would go to the local process pool (L{funcnodes_tw.isolation}) are
submitted to the scheduler through a C{distributed.Client(asynchronous=True)}
living on the reactor's own asyncio loop: no call blocks the reactor. Only
this module imports C{distributed}, and only a worker with a cluster
imports this module.

L{Cluster} is the service: it connects when the worker starts without
holding the start up, retries while the scheduler cannot be reached, and
builds a new client when the old one gave up reconnecting. While there is
no scheduler, cluster calls fail with L{ClusterUnavailable} naming the
address, or run in the local pool with C{cluster_fallback: "local"}. Each
dask worker's versions of Python, funcnodes-core and the node packages are
compared with the worker's own when it is first seen; a difference is
reported to the clients once instead of failing node by node.

A worker lost mid-task is Dask's business: the scheduler reruns the task on
another worker (C{distributed.scheduler.allowed-failures} times). Dask's
C{retries} are not used: they would also rerun a node whose own function
raised. A scheduler lost mid-task cancels the client's futures: the node
fails with L{ClusterLost}.

C{cluster_nodes} patterns (node ids, C{fnmatch}) also send nodes without
C{separate_process} there, by giving their class the process wrapper
funcnodes-core would have made (L{send_to_cluster}).
"""

import asyncio
import fnmatch

import distributed
from dask.utils import apply
from twisted.application.service import Service
from twisted.logger import Logger

from funcnodes_tw import aio, isolation, wire

_log = Logger()

#: Seconds between connection attempts while the scheduler is away.
RETRY_DELAY = 2.0
#: Seconds one attempt (and the client's own reconnection) may take.
CONNECT_TIMEOUT = 5.0
#: Seconds between looks at whether the client gave up.
WATCH_INTERVAL = 1.0
#: Seconds between asking the scheduler where a running call is.
WHERE_INTERVAL = 0.5
#: Seconds the client may take to close when the worker stops.
CLOSE_TIMEOUT = 3.0


class ClusterUnavailable(RuntimeError):
    """
    No scheduler to send a cluster node to.
    """


class ClusterLost(RuntimeError):
    """
    The scheduler went away while a node ran there.
    """


class ClusterMismatch(RuntimeError):
    """
    The cluster's workers have other versions of the node packages.
    """


class Cluster(Service):
    """
    The client of one Dask scheduler, while the worker runs.
    """

    name = "cluster"

    def __init__(self, worker, address, fallback="error", patterns=None):
        self.worker = worker
        self.address = address
        self.fallback = fallback
        self.patterns = list(patterns or ())
        self.client = None
        self.error = None
        #: Calls submitted to the cluster and not yet back (a gauge).
        self.in_flight = 0
        self._task = None
        self._cancelling = set()
        #: (closure cell, what it held) of the classes routed by patterns.
        self._routed = []
        if self.patterns:
            worker.nodespace.on("node_added", self._node_added)

    # region the connection

    def startService(self):
        super().startService()
        isolation.remotes.append(self)
        for node in self.worker.nodespace.nodes:
            self._match(node)
        self._task = aio.event_loop().create_task(self._keep_connected())

    @property
    def connected(self):
        return self.client is not None and self.client.status == "running"

    async def _keep_connected(self):
        while True:
            try:
                client = await self._connect()
            except Exception as exc:
                if self.error is None:
                    _log.warn(
                        "No dask scheduler at {address} ({error}); retrying every {delay} s",
                        address=self.address, error=exc, delay=RETRY_DELAY,
                    )
                self.error = str(exc) or type(exc).__name__
                await asyncio.sleep(RETRY_DELAY)
                continue
            self.client, self.error = client, None
            _log.info("Connected to the dask scheduler at {address}", address=self.address)
            # The client reconnects by itself for CONNECT_TIMEOUT s, then closes.
            known = set()
            while client.status not in ("closing", "closed"):
                if client.status == "running":
                    known = await self._check_new_workers(client, known)
                await asyncio.sleep(WATCH_INTERVAL)
            self.client, self.error = None, "the connection was lost"
            _log.warn("Lost the dask scheduler at {address}", address=self.address)
            await client.close()

    async def _connect(self):
        """
        A connected client. One cancelled while it connects (the worker
        stops) is closed here: left to the collector, it warns of a close
        never awaited.
        """
        client = distributed.Client(
            self.address, asynchronous=True, timeout=CONNECT_TIMEOUT, set_as_default=False
        )
        try:
            return await client
        except BaseException:
            await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
            raise

    def stopService(self):
        super().stopService()
        if self in isolation.remotes:
            isolation.remotes.remove(self)
        self._unroute()
        return aio.as_deferred(self._close())

    async def _close(self):
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        client, self.client = self.client, None
        if client is not None:
            await asyncio.gather(*self._cancelling, return_exceptions=True)
            try:
                await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
            except Exception:
                _log.failure("Closing the dask client failed")

    # endregion
    # region versions

    async def _check_new_workers(self, client, known):
        """
        Compare the versions of dask workers not seen before; the workers now.
        """
        try:
            workers = set(await client.nthreads())
            if workers - known:
                await self.check_versions(workers - known)
        except Exception:
            _log.failure("Comparing versions with the cluster failed")
            return known
        return workers

    async def check_versions(self, workers=None):
        """
        Compare Python, funcnodes-core and the worker's package dependencies
        with the cluster's C{workers} (default: all); report what differs to
        clients. Returns the differences.
        """
        names = ["funcnodes-core", *_dependencies(self.worker.config)]
        versions = await self.client.get_versions(packages=names)
        here = versions["client"]["packages"]
        differences = []
        for address, info in sorted(versions["workers"].items()):
            if workers is not None and address not in workers:
                continue
            there = (info or {}).get("packages", {})
            for name in ["python", *names]:
                mine, theirs = here.get(name), there.get(name)
                if name == "python":
                    mine, theirs = _minor(mine), _minor(theirs)
                if mine != theirs:
                    differences.append(f"{address}: {name} {theirs or 'missing'} (here {mine})")
        if differences:
            message = (
                f"The dask workers of {self.address} differ from this worker: "
                + "; ".join(differences)
            )
            _log.error("{message}", message=message)
            self.worker.set_progress(message, "error", 0, False)
            self.worker.send(wire.error_event(ClusterMismatch(message), self.worker.debug))
        return differences

    # endregion
    # region calls

    def run(self, function, args, kwargs):
        """
        An awaitable of C{function(*args, **kwargs)} on the cluster, or None
        to run it locally (no scheduler, fallback "local").
        """
        client = self.client
        if client is None or client.status != "running":
            if self.fallback == "local":
                return None
            return self._unavailable()
        node = _running_node(self.worker.nodespace)
        return self._call(client, function, args, kwargs, node)

    async def _unavailable(self):
        raise ClusterUnavailable(
            f"No connection to the dask scheduler at {self.address}: {self.error or 'connecting'}"
        )

    async def _call(self, client, function, args, kwargs, node):
        # apply() keeps the node's inputs apart from submit's own keywords.
        future = client.submit(apply, function, list(args), kwargs, pure=False)
        self.in_flight += 1
        progress = where = None
        try:
            if node is not None:
                progress = node.progress(total=None, desc=f"queued on dask scheduler {self.address}")
                where = aio.event_loop().create_task(self._report_where(client, future, progress))
            result = await future
        except distributed.client.FutureCancelledError as exc:
            raise ClusterLost(
                f"The dask scheduler at {self.address} was lost while the node ran: {exc}"
            ) from None
        except asyncio.CancelledError:
            # The node was removed or the worker stops: the task goes too.
            cancelling = asyncio.ensure_future(client.cancel([future], force=True))
            self._cancelling.add(cancelling)
            cancelling.add_done_callback(self._cancelling.discard)
            raise
        finally:
            self.in_flight -= 1
            if where is not None:
                where.cancel()
            if progress is not None:
                progress.close()
        # The dask worker drops its copy of the result now, not when this
        # future is collected.
        future.release()
        return result

    async def _report_where(self, client, future, progress):
        """
        Tell the node's progress which dask worker runs it (again after a
        rerun). The first look is after WHERE_INTERVAL: a short call costs
        the scheduler no extra request.
        """
        shown = None
        while True:
            await asyncio.sleep(WHERE_INTERVAL)
            if future.done():
                return
            try:
                processing = await client.processing()
            except Exception:
                return
            for address, keys in processing.items():
                if future.key in keys and address != shown:
                    shown = address
                    progress.set_description_str(f"running on dask worker {address}")

    # endregion
    # region cluster_nodes

    def _node_added(self, node=None, src=None, **_):
        try:
            self._match(self.worker.nodespace.get_node_by_id(node["id"]))
        except Exception:
            _log.failure("Cannot route the new node {node}", node=node)

    def _match(self, node):
        node_id = getattr(node, "node_id", "")
        if any(fnmatch.fnmatchcase(node_id, pattern) for pattern in self.patterns):
            changed = send_to_cluster(type(node))
            if changed is not None:
                self._routed.append(changed)

    def _unroute(self):
        """
        Give the classes routed by C{cluster_nodes} their own wrappers back.
        """
        for cell, before in reversed(self._routed):
            cell.cell_contents = before
        self._routed.clear()

    # endregion


def _dependencies(config):
    deps = (config or {}).get("package_dependencies") or {}
    return sorted(
        (dep.get("package") if isinstance(dep, dict) else None) or name
        for name, dep in deps.items()
    )


def _minor(version):
    return ".".join(str(version).split(".")[:2]) if version else None


def _running_node(nodespace):
    """
    The node whose trigger is the running task: whose progress to update.
    """
    task = asyncio.current_task()
    for node in nodespace.nodes:
        if getattr(node, "_trigger_task", None) is task:
            return node
    return None


_unroutable = set()


def send_to_cluster(cls):
    """
    Make a node class made from a function run it like a C{separate_process}
    node: its call goes to the cluster (or the local pool). Returns the
    closure cell changed and what it held, to put back; None if unchanged.

    funcnodes-core binds the function's async wrapper in the closure of the
    class's C{func} (C{asyncfunc}); that binding is replaced. A class of
    another shape (a C{Node} subclass with its own C{func}), or a function
    that takes the C{node} itself, keeps running in the worker, with a warning.
    """
    func = getattr(cls, "func", None)
    original = getattr(cls, "o_func", None)
    code = getattr(func, "__code__", None)
    names = code.co_freevars if code is not None else ()
    cells = dict(zip(names, getattr(func, "__closure__", None) or ()))
    wants_node = "requires_node_input" in cells and cells["requires_node_input"].cell_contents
    if original is None or "asyncfunc" not in cells or wants_node:
        if cls not in _unroutable:
            _unroutable.add(cls)
            _log.warn(
                "{node_id} matches cluster_nodes but runs in the worker: {why}",
                node_id=getattr(cls, "node_id", cls.__name__),
                why="it takes the node itself" if wants_node else "not a node made from a function",
            )
        return None
    cell = cells["asyncfunc"]
    if isinstance(cell.cell_contents, isolation.ProcessExecutorWrapper):
        return None
    before = cell.cell_contents
    cell.cell_contents = isolation.make_run_in_new_process(original)
    return cell, before
