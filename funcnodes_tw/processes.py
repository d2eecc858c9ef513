"""
External commands the Twisted way: C{spawnProcess} and a C{ProcessProtocol},
with output streamed line by line to a node's C{async} function.

    async def func(self, argv):
        async with processes.run_command(argv) as cmd:
            async for stream, text in cmd:      # a Line per line, as it comes
                self.outputs["line"].value = text
        self.outputs["returncode"].value = cmd.returncode

Leaving the C{async with} block early, also by cancellation (the worker
cancels the trigger of a node that is removed), ends the command: SIGTERM to
its process group, SIGKILL after L{KILL_AFTER} seconds. Commands still
running when the worker stops end the same way (L{stop_all}).

A command is started through C{python -m funcnodes_tw._child exec}, which
gives it a process group of its own (so its children end with it) and, on
Linux, SIGKILL if the worker dies without cleaning up.

The L{CommandNode} (shelf C{funcnodes_tw}: C{add_shelf} with
C{"funcnodes_tw.processes"}) runs a command from the UI.
"""

import codecs
import os
import shlex
import signal
import sys
from collections import deque, namedtuple

import funcnodes_core as fn
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from funcnodes_tw import aio

_log = Logger()

#: Seconds between SIGTERM (or closing stdin) and SIGKILL.
KILL_AFTER = 3.0
#: The helper every child is started through (see L{funcnodes_tw._child}).
CHILD = [sys.executable, "-m", "funcnodes_tw._child"]
#: Longer lines are cut into pieces of this many characters.
MAX_LINE = 1024 * 1024
#: Stop reading from a command while this many lines wait for the node...
HIGH_WATER = 1000
#: ...and read again once fewer than this many are left.
LOW_WATER = 100

#: Every child started and not yet ended.
_live = set()

Line = namedtuple("Line", "stream text")


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor
    return reactor


class Child(ProcessProtocol):
    """
    A child process of the worker that can be waited for and stopped.
    """

    def __init__(self):
        self.transport = None
        self.pid = None
        self.reason = None
        self.clock = None
        self._waiters = []
        self._killer = None

    @property
    def running(self):
        return self.transport is not None and self.reason is None

    @property
    def returncode(self):
        """
        The exit status, C{-signal} when killed, None while running.
        """
        if self.reason is None:
            return None
        code = getattr(self.reason, "exitCode", None)
        if code is None and getattr(self.reason, "signal", None) is not None:
            return -self.reason.signal
        return code

    def processEnded(self, reason):
        self.reason = reason.value
        _live.discard(self)
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        waiting, self._waiters = self._waiters, []
        for d in waiting:
            d.callback(self.returncode)

    def when_ended(self):
        """
        A Deferred firing with L{returncode} once the process is gone (reaped).
        """
        if self.transport is None or self.reason is not None:
            return defer.succeed(self.returncode)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def stop(self, timeout=KILL_AFTER, gentle=False):
        """
        End the process: SIGTERM (C{gentle}: close its stdin), SIGKILL after
        C{timeout} seconds. Fires with L{returncode} once it is gone.
        """
        ended = self.when_ended()
        if self.running and self._killer is None:
            if gentle:
                self.transport.closeStdin()
            else:
                self.signal("TERM")
            self._killer = self.clock.callLater(timeout, self.signal, "KILL")
        return ended

    def signal(self, name):
        try:
            self.transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            pass


def spawn(child, argv, reactor=None, env=None, path=None, childFDs=None):
    """
    Start C{child}'s process and remember it until it ends.
    """
    child.clock = _reactor(reactor)
    transport = child.clock.spawnProcess(
        child, argv[0], argv, env=env, path=path, childFDs=childFDs
    )
    child.pid = transport.pid  # kept after the end, unlike the transport's
    _live.add(child)
    return child


def stop_all(timeout=KILL_AFTER):
    """
    Stop every child still running; fires once all are gone.
    """
    stopping = [child.stop(timeout) for child in list(_live)]
    return defer.gatherResults(stopping, consumeErrors=True)


def live_pids():
    return sorted(child.pid for child in _live if child.pid is not None)


class Command(Child):
    """
    A running external command and its output, line by line: an async
    iterator of L{Line}s and an async context manager that ends the command
    when the block is left. Made by L{run_command}.
    """

    def __init__(self, argv, encoding="utf-8"):
        super().__init__()
        self.argv = list(argv)
        self._lines = deque()
        self._wanted = None
        self._paused = False
        self._stopping = False
        self._decoders = {fd: codecs.getincrementaldecoder(encoding)("replace") for fd in (1, 2)}
        self._partial = {1: "", 2: ""}

    def __repr__(self):
        return f"<Command pid={self.pid} {shlex.join(self.argv)!r}>"

    # region the process protocol

    def childDataReceived(self, fd, data):
        if fd in self._decoders:
            self._take(fd, self._decoders[fd].decode(data))

    def childConnectionLost(self, fd):
        if fd in self._decoders:
            self._take(fd, self._decoders[fd].decode(b"", final=True))
            rest, self._partial[fd] = self._partial[fd], ""
            if rest:
                self._push(fd, rest)

    def _take(self, fd, text):
        text = self._partial[fd] + text
        *complete, rest = text.split("\n")
        for line in complete:
            self._push(fd, line)
        while len(rest) > MAX_LINE:
            self._push(fd, rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial[fd] = rest

    def _push(self, fd, text):
        self._lines.append(Line("stdout" if fd == 1 else "stderr", text.removesuffix("\r")))
        if len(self._lines) >= HIGH_WATER and not self._paused and self.running:
            self._paused = True
            self.transport.pauseProducing()
        self._wake()

    def processEnded(self, reason):
        super().processEnded(reason)
        if self._stopping:
            # Children of the command that ignored SIGTERM, or outlived it.
            _killpg(self.pid, signal.SIGKILL)
        self._wake()

    def _wake(self):
        wanted, self._wanted = self._wanted, None
        if wanted is not None:
            wanted.callback(None)

    # endregion
    # region ending

    def signal(self, name):
        """
        Signal the command's whole process group (the command and its children).
        """
        if not self.running:
            return
        if not _killpg(self.pid, getattr(signal, "SIG" + name)):
            super().signal(name)

    def stop(self, timeout=KILL_AFTER, gentle=False):
        self._stopping = self._stopping or self.running
        return super().stop(timeout, gentle)

    # endregion
    # region for node functions (asyncio)

    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self._lines:
            if self.reason is not None:
                raise StopAsyncIteration
            wanted = self._wanted = defer.Deferred()
            try:
                await aio.as_future(wanted)
            finally:
                if self._wanted is wanted:
                    self._wanted = None
        line = self._lines.popleft()
        if self._paused and len(self._lines) < LOW_WATER:
            self._paused = False
            if self.running:
                self.transport.resumeProducing()
        return line

    async def wait(self):
        """
        The exit status once the command ended (see L{Child.returncode}).
        """
        return await aio.as_future(self.when_ended())

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        if self.running:
            await aio.as_future(self.stop())

    # endregion


def _killpg(pid, signum):
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def as_argv(command):
    """
    A command line as a list: a string is split like a shell would (no shell runs).
    """
    if isinstance(command, str):
        argv = shlex.split(command)
    elif isinstance(command, (list, tuple)):
        argv = [os.fspath(arg) if isinstance(arg, os.PathLike) else str(arg) for arg in command]
    else:
        raise TypeError(f"command must be a string or a list, not {type(command).__name__}")
    if not argv:
        raise ValueError("empty command")
    return argv


def run_command(command, cwd=None, env=None, stdin=None, encoding="utf-8", reactor=None):
    """
    Start an external command now; return its L{Command}.

    C{command} is an argument list or a string split with C{shlex} (no shell
    runs). C{env} (default: the worker's environment) replaces the
    environment; C{stdin} (bytes) is written to the command, whose standard
    input is then closed.
    """
    argv = as_argv(command)
    cmd = Command(argv, encoding)
    spawn(
        cmd,
        [*CHILD, "exec", str(os.getpid()), *argv],
        reactor,
        env=env,
        path=None if cwd is None else os.fspath(cwd),
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    if stdin:
        cmd.transport.write(stdin)
    cmd.transport.closeStdin()
    return cmd


class CommandNode(fn.Node):
    """
    Run an external command; its output arrives line by line.
    """

    node_id = "funcnodes_tw.command"
    node_name = "Command"
    description = "Run an external command (no shell); its output lines arrive one by one."

    command = fn.NodeInput(id="command", type=str, description="argument list or command line")
    line = fn.NodeOutput(id="line", type=str, description="the latest line of standard output")
    stderr = fn.NodeOutput(id="stderr", type=str, description="the latest line of standard error")
    returncode = fn.NodeOutput(
        id="returncode", type=int, description="exit status, -N for signal N"
    )

    async def func(self, command):
        async with run_command(command) as cmd:
            async for stream, text in cmd:
                self.outputs["line" if stream == "stdout" else "stderr"].value = text
        self.outputs["returncode"].value = cmd.returncode
        return cmd.returncode


NODE_SHELF = fn.Shelf(
    name="funcnodes_tw",
    description="Nodes of the funcnodes_tw worker",
    nodes=[CommandNode],
    subshelves=[],
)
