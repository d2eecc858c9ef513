"""
Nodes that run outside the reactor's thread, and their end with the worker.

C{separate_thread=True}: funcnodes-core runs the node's function in a thread
pool of the node class (an C{ExecutorWrapper}); the reactor's loop awaits it.

C{separate_process=True}: funcnodes-core 2.4 switched its process pool off
(C{MULTIPROCESSING = False} in C{funcnodes_core.utils.functions}) and runs
such nodes in a thread too, where a CPU-bound function holds the GIL and the
worker answers late. Here they run in real processes: one L{ProcessPool} per
worker process (at most one child per CPU, started on first use, retired
after L{IDLE_TIMEOUT} idle seconds), fed through pipes by the reactor, no
threads involved. The function and its arguments travel with C{dill} (as in
funcnodes-core's own process pool); a call that cannot be pickled, or that
takes the C{node} argument, runs in the node's thread pool instead.

The seams used in funcnodes-core, all set up on import:
  - C{make_run_in_new_process} / C{make_run_in_new_thread} are replaced, so
    node classes defined afterwards get L{ProcessExecutorWrapper} and known
    thread pools. Packages load when the worker starts, after this import;
    classes defined before keep funcnodes-core's behaviour.
  - A node's running trigger (C{Node._trigger_task}) is cancelled when the
    node is removed and when the worker stops: a process call or command it
    awaits is then killed.

L{Isolation} is the service hook: while no worker service runs, calls go to
threads as in plain funcnodes-core; when the last one stops, the pool's
children and all commands end (SIGTERM, SIGKILL after a grace period) and the
thread pools are shut down (queued calls dropped; a thread already running
cannot be killed, it finishes on its own).
"""

import os
import struct
import sys
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import dill
import funcnodes_core
from funcnodes_core import nodemaker
from funcnodes_core.node import REGISTERED_NODES
from funcnodes_core.utils import functions as core_functions
from funcnodes_core.utils.functions import ExecutorWrapper, ThreadExecutorWrapper
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger

from funcnodes_tw import aio, processes

_log = Logger()

#: Seconds an idle pool process waits for work before it exits.
IDLE_TIMEOUT = 60.0
HEADER = struct.Struct("!Q")
REPLIES_FD = 3


class PoolStopped(RuntimeError):
    pass


class ProcessDied(RuntimeError):
    """
    The process running a call ended before it answered.
    """


# region the process pool


class _Job:
    def __init__(self, pool, payload):
        self.pool = pool
        self.payload = payload
        self.child = None
        self.deferred = defer.Deferred(lambda d: pool._cancel(self))


class PoolChild(processes.Child):
    """
    One process of the pool: runs one call at a time (see L{funcnodes_tw._child}).
    """

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.job = None
        self.idle_timer = None
        self._buffer = bytearray()

    def connectionMade(self):
        self._send("\0".join(sys.path).encode("utf-8"))

    def _send(self, payload):
        self.transport.writeToChild(0, HEADER.pack(len(payload)) + payload)

    def run(self, job):
        self.job, job.child = job, self
        self._send(job.payload)

    def childDataReceived(self, fd, data):
        if fd != REPLIES_FD:
            return
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            end = HEADER.size + size
            if len(buffer) < end:
                return
            frame = bytes(buffer[HEADER.size:end])
            del buffer[:end]
            self._answered(frame)

    def _answered(self, frame):
        job, self.job = self.job, None
        if job is None:
            return
        job.child = None
        self.pool._finished(self)
        try:
            ok, value = dill.loads(frame)
        except Exception as exc:
            job.deferred.errback(exc)
            return
        if ok:
            job.deferred.callback(value)
            return
        error, text = value
        if isinstance(error, BaseException):
            error.add_note(f"Raised in process {self.pid}:\n{text}")
        else:
            error = RuntimeError(text)
        job.deferred.errback(error)

    def processEnded(self, reason):
        super().processEnded(reason)
        job, self.job = self.job, None
        self.pool._gone(self)
        if job is not None:
            job.child = None
            job.deferred.errback(ProcessDied(f"process {self.pid} ended: {reason.value}"))


class ProcessPool:
    """
    Child processes that run pickled calls, at most C{size} at a time.
    """

    def __init__(self, size=None, reactor=None, idle_timeout=IDLE_TIMEOUT):
        self.size = size or os.cpu_count() or 1
        self.reactor = processes._reactor(reactor)
        self.idle_timeout = idle_timeout
        self.children = set()
        self.idle = []
        self.queue = deque()
        self.stopped = False

    def submit(self, function, args=(), kwargs=None):
        """
        Run C{function(*args, **kwargs)} in a pool process; a Deferred of its result.

        Cancelling the Deferred drops a queued call and kills the process of
        a running one. Raises at once what C{dill} cannot pickle.
        """
        if self.stopped:
            raise PoolStopped("the process pool is stopped")
        payload = dill.dumps((function, tuple(args), dict(kwargs or {})))
        job = _Job(self, payload)
        self.queue.append(job)
        self._dispatch()
        return job.deferred

    def pids(self):
        return sorted(child.pid for child in self.children)

    def _dispatch(self):
        while self.queue and not self.stopped:
            if self.idle:
                child = self.idle.pop()
                _cancel_timer(child)
            elif len(self.children) < self.size:
                child = self._spawn()
            else:
                return
            child.run(self.queue.popleft())

    def _spawn(self):
        child = PoolChild(self)
        processes.spawn(
            child,
            [*processes.CHILD, "pool", str(os.getpid())],
            self.reactor,
            childFDs={0: "w", 1: 1, 2: 2, REPLIES_FD: "r"},
        )
        self.children.add(child)
        return child

    def _finished(self, child):
        if self.stopped:
            child.stop(gentle=True)
            return
        self.idle.append(child)
        child.idle_timer = self.reactor.callLater(self.idle_timeout, self._retire, child)
        self._dispatch()

    def _retire(self, child):
        child.idle_timer = None
        if child in self.idle:
            self.idle.remove(child)
            child.stop(gentle=True)

    def _gone(self, child):
        self.children.discard(child)
        if child in self.idle:
            self.idle.remove(child)
        _cancel_timer(child)
        self._dispatch()

    def _cancel(self, job):
        if job in self.queue:
            self.queue.remove(job)
        elif job.child is not None:
            child, job.child = job.child, None
            child.job = None
            child.stop()

    def stop(self, timeout=processes.KILL_AFTER):
        """
        Drop queued calls, end every process (SIGKILL after C{timeout} s);
        fires once all are gone.
        """
        self.stopped = True
        for job in list(self.queue):
            job.deferred.cancel()
        ended = []
        for child in list(self.children):
            _cancel_timer(child)
            job, child.job = child.job, None
            # Idle: end of input, the child leaves. Busy: SIGTERM.
            ended.append(child.stop(timeout, gentle=job is None))
            if job is not None:
                job.child = None
                job.deferred.cancel()
        return defer.gatherResults(ended, consumeErrors=True)


def _cancel_timer(child):
    timer, child.idle_timer = child.idle_timer, None
    if timer is not None and timer.active():
        timer.cancel()


# endregion
# region funcnodes-core's executor wrappers

#: Executor wrappers made since install(), for the shutdown.
_wrappers = weakref.WeakSet()
_warned = set()


class ProcessExecutorWrapper(ThreadExecutorWrapper):
    """
    C{separate_process=True}: calls go to the worker's cluster (L{remotes})
    or L{ProcessPool}; to the class's thread pool outside a worker or when
    they cannot be pickled.
    """

    def run_in_executor(self, *args, **kwargs):
        if remotes and "node" not in kwargs:
            running = remotes[-1].run(self.syncfunc, args, kwargs)
            if running is not None:
                return running
        pool = current_pool()
        if pool is not None and "node" not in kwargs:
            try:
                d = pool.submit(self.func, args, kwargs)
            except PoolStopped:
                pass
            except Exception as exc:
                name = getattr(self.func, "__qualname__", repr(self.func))
                if name not in _warned:
                    _warned.add(name)
                    _log.warn(
                        "{name} runs in a thread, not a process: {error}",
                        name=name,
                        error=f"{type(exc).__name__}: {exc}",
                    )
            else:
                return aio.as_future(d)
        return super().run_in_executor(*args, **kwargs)


def make_run_in_new_thread(func):
    wrapper = ThreadExecutorWrapper(func)
    _wrappers.add(wrapper)
    return wrapper


def make_run_in_new_process(func):
    wrapper = ProcessExecutorWrapper(func)
    _wrappers.add(wrapper)
    return wrapper


def install():
    """
    Make funcnodes-core create our wrappers for nodes defined from now on.
    """
    for module in (nodemaker, core_functions, funcnodes_core):
        module.make_run_in_new_process = make_run_in_new_process
        module.make_run_in_new_thread = make_run_in_new_thread


def executor_wrappers():
    """
    Every known executor wrapper: ours, and those of registered node classes.
    """
    found = {id(w): w for w in list(_wrappers)}
    for cls in list(REGISTERED_NODES.values()):
        wrapper = getattr(getattr(cls, "func", None), "__wrapped__", None)
        if isinstance(wrapper, ExecutorWrapper):
            found[id(wrapper)] = wrapper
    return list(found.values())


def shutdown_threads():
    """
    Shut the node classes' thread pools down without waiting: queued calls
    are dropped, running ones finish. A fresh, still thread-less pool takes
    each one's place, so the classes work in a worker started later.
    """
    busy = 0
    for wrapper in executor_wrappers():
        old = wrapper.executor
        if not isinstance(old, ThreadPoolExecutor):
            continue
        wrapper.executor = ThreadPoolExecutor()
        old.shutdown(wait=False, cancel_futures=True)
        busy += sum(thread.is_alive() for thread in getattr(old, "_threads", ()))
    if busy:
        _log.info("{busy} node thread(s) still finishing their call", busy=busy)


# endregion
# region the service

_services = []
_pool = None
#: Services that run calls on other machines (L{funcnodes_tw.cluster}),
#: before the pool: their C{run} returns an awaitable, or None for the pool.
remotes = []


def current_pool():
    """
    The process pool while a worker service runs, else None (threads, as in funcnodes-core).
    """
    global _pool
    if not _services:
        return None
    if _pool is None:
        _pool = ProcessPool(reactor=_services[-1].reactor)
    return _pool


def cancel_trigger(node):
    """
    Cancel the node's running trigger, and so what it awaits.
    """
    task = getattr(node, "_trigger_task", None)
    if task is not None and not task.done():
        task.cancel()


class Isolation(Service):
    """
    Cancels the triggers of removed nodes; when the last worker service of
    the process stops, ends the pool, the commands and the thread pools.
    """

    name = "isolation"

    def __init__(self, nodespace, reactor=None, stop_timeout=processes.KILL_AFTER):
        self.nodespace = nodespace
        self.reactor = processes._reactor(reactor if IReactorProcess.providedBy(reactor) else None)
        self.stop_timeout = stop_timeout
        nodespace.on("node_added", self._node_added)
        for node in nodespace.nodes:
            self._watch(node)

    def _node_added(self, node=None, src=None, **_):
        try:
            self._watch(self.nodespace.get_node_by_id(node["id"]))
        except Exception:
            _log.failure("Cannot watch the new node {node}", node=node)

    def _watch(self, node):
        node.on("cleanup", self._node_cleanup)

    def _node_cleanup(self, src=None, **_):
        cancel_trigger(src)

    def startService(self):
        super().startService()
        _services.append(self)

    def stopService(self):
        super().stopService()
        for node in self.nodespace.nodes:
            cancel_trigger(node)
        if self in _services:
            _services.remove(self)
        if _services:
            return None
        return shutdown(self.stop_timeout)


def shutdown(timeout=processes.KILL_AFTER):
    """
    End the pool and every command; shut the thread pools down.
    """
    global _pool
    pool, _pool = _pool, None
    stopping = []
    if pool is not None:
        stopping.append(pool.stop(timeout))
    stopping.append(processes.stop_all(timeout))
    shutdown_threads()
    return defer.gatherResults(stopping, consumeErrors=True)


# endregion

install()
