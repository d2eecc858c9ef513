"""
The one bridge between asyncio (funcnodes-core) and Twisted (everything else).

funcnodes-core schedules its node triggers with ``asyncio.create_task``, so the
worker must run on Twisted's asyncio reactor: both then share one event loop and
one thread, and a coroutine can be turned into a Deferred without any locking.
"""

import asyncio
import inspect
import sys

from twisted.internet.defer import Deferred, succeed, fail
from twisted.logger import Logger

from funcnodes_tw.internals import Internals

_log = Logger()


class WrongReactor(Exception):
    """
    Another reactor was installed before we could install the asyncio one.
    """


def install_reactor(uvloop=False):
    """
    Install Twisted's asyncio reactor unless it is already the installed one.

    Called by the twistd plugin and the launcher before anything imports
    C{twisted.internet.reactor}, so users never need C{--reactor=asyncio}.

    @param uvloop: run it on a uvloop loop (the C{uvloop} extra), whose
        polling and callbacks cost less than asyncio's own.
    """
    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        if not isinstance(reactor, AsyncioSelectorReactor):
            raise WrongReactor(
                f"funcnodes_tw needs the asyncio reactor, but "
                f"{type(reactor).__name__} is already installed"
            )
        if uvloop and not on_uvloop():
            raise WrongReactor("the reactor already runs on another loop than uvloop")
        return reactor
    from twisted.internet.main import installReactor

    from funcnodes_tw.reactor import AsyncioReactor

    if uvloop:
        loop = _new_uvloop()
    else:
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    installReactor(AsyncioReactor(loop))
    from twisted.internet import reactor

    return reactor


def _new_uvloop():
    try:
        import uvloop
    except ImportError:
        raise WrongReactor("uvloop is not installed: pip install 'funcnodes-tw[uvloop]'") from None
    return uvloop.new_event_loop()


def on_uvloop():
    """
    Whether the installed reactor runs on uvloop.
    """
    return type(event_loop()).__module__.partition(".")[0] == "uvloop"


def event_loop():
    """
    The asyncio loop under the running reactor.
    """
    from twisted.internet import reactor

    return reactor._asyncioEventloop


def as_deferred(awaitable):
    """
    Run an asyncio awaitable as a task on the reactor's loop; return a Deferred.
    """
    return Deferred.fromFuture(asyncio.ensure_future(awaitable, loop=event_loop()))


def as_future(deferred):
    """
    A Deferred as an asyncio future on the reactor's loop, for node code to
    C{await}; cancelling the future cancels the Deferred.
    """
    return deferred.asFuture(event_loop())


def call(function, *args, **kwargs):
    """
    Call a plain or C{async} function and always get a Deferred back.

    Synchronous results and exceptions come back already fired, so a fast
    command costs no extra reactor turn.
    """
    try:
        result = function(*args, **kwargs)
    except BaseException:
        return fail()
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):  # not isawaitable: a funcnodes Node is awaitable
        return as_deferred(result)
    return succeed(result)


def call_soon(function, *args):
    """
    Run C{function} on the loop's next turn, after work already queued there.

    Node-space events are flushed this way: a command's result, sent
    synchronously when the command returns, goes out before the events the
    command caused, exactly as the reference worker orders them.
    """
    return event_loop().call_soon(function, *args)


#: (deadline, function) waiting for the loop to run out of ready callbacks.
_idle_waiters = []
#: The loop's queue of ready callbacks, private to asyncio.
_READY = Internals(
    "the asyncio event loop",
    ["_ready"],
    "held node events leave at the loop's next turn instead of at the end of a burst",
)


def call_when_idle(function, max_wait):
    """
    Call C{function} once the loop has no other callback ready to run, or
    after C{max_wait} seconds of such work: the end of a burst (a graph
    running node after node) without a timer that would end it late.

    One check serves every waiter, so that two waiters do not see each
    other as work. CPython's loop keeps the ready callbacks in C{_ready};
    a loop without one (uvloop, a future CPython) counts as idle.
    """
    loop = event_loop()
    if not _idle_waiters:
        loop.call_soon(_check_idle, loop)
    _idle_waiters.append((loop.time() + max_wait, function))


def _check_idle(loop):
    if _READY.usable(loop) and loop._ready:
        now = loop.time()
        due = [function for deadline, function in _idle_waiters if deadline <= now]
        _idle_waiters[:] = [waiter for waiter in _idle_waiters if waiter[0] > now]
        if _idle_waiters:
            loop.call_soon(_check_idle, loop)
    else:
        due = [function for _, function in _idle_waiters]
        _idle_waiters.clear()
    for function in due:
        try:
            function()
        except Exception:
            _log.failure("A call for an idle loop failed")
