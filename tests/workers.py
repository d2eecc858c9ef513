"""Start the reference worker or ours as a real subprocess, from inside a Twisted test.

Workers run as child processes (spawned through the reactor, so the test keeps running
on it) with their own ``FUNCNODES_CONFIG_DIR``; a worker counts as started once its port
accepts TCP connections. stdout/stderr go to files next to its data dir for debugging.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid as uuidlib
from pathlib import Path
from typing import List, Optional

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint

__all__ = ["WorkerProcess", "free_port", "start_ours", "start_reference", "start_worker"]

TESTS_DIR = Path(__file__).resolve().parent
REFWORKER = TESTS_DIR / "refworker.py"
KILL_AFTER = 5.0


def free_port() -> int:
    """A port that was free a moment ago (bind to 127.0.0.1:0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _ProcessProtocol(protocol.ProcessProtocol):
    """Only tracks the end of the process; output goes straight to files."""

    def __init__(self):
        self.ended = defer.Deferred()

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class WorkerProcess:
    """A running worker subprocess: ``port``, ``url``, ``stop()``, log files."""

    def __init__(self, name, reactor, argv, env, port, data_path, config_dir, uuid, log_dir):
        self.name = name
        self.port = port
        self.url = f"ws://127.0.0.1:{port}"
        self.data_path = Path(data_path)
        self.config_dir = Path(config_dir)
        self.uuid = uuid
        self.stdout_path = Path(log_dir) / f"{name}.stdout.log"
        self.stderr_path = Path(log_dir) / f"{name}.stderr.log"
        self._reactor = reactor
        self._proto = _ProcessProtocol()
        self.exit_reason = None
        self._end_waiters: List[defer.Deferred] = []
        self._proto.ended.addCallback(self._ended)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # The child gets dups of these fds, so closing ours right away is fine.
            self._transport = reactor.spawnProcess(
                self._proto,
                argv[0],
                argv,
                env=env,
                childFDs={0: "w", 1: out.fileno(), 2: err.fileno()},
            )
        self.pid = self._transport.pid

    def _ended(self, reason):
        self.exit_reason = reason
        waiting, self._end_waiters = self._end_waiters, []
        for d in waiting:
            d.callback(reason)

    @property
    def running(self) -> bool:
        return self.exit_reason is None

    def output_tail(self, lines: int = 40) -> str:
        """The last lines of stdout and stderr, for assertion messages."""
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                text = ""
            parts.append(f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def when_ended(self) -> defer.Deferred:
        """Fire with the exit reason once the process is gone."""
        if not self.running:
            return defer.succeed(self.exit_reason)
        d = defer.Deferred()
        self._end_waiters.append(d)
        return d

    def stop(self) -> defer.Deferred:
        """SIGTERM, then SIGKILL after ``KILL_AFTER`` s; fire when the process ended."""
        ended = self.when_ended()
        if not self.running:
            return ended
        try:
            self._transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return ended
        killer = self._reactor.callLater(KILL_AFTER, self._kill)

        def _cancel(res):
            if killer.active():
                killer.cancel()
            return res

        ended.addBoth(_cancel)
        return ended

    def _kill(self):
        try:
            self._transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    @defer.inlineCallbacks
    def wait_listening(self, timeout: float = 30.0, interval: float = 0.2):
        """Poll the port until it accepts a TCP connection; fail if the process dies."""
        deadline = self._reactor.seconds() + timeout
        endpoint = TCP4ClientEndpoint(self._reactor, "127.0.0.1", self.port, timeout=1)
        while True:
            if not self.running:
                raise RuntimeError(
                    f"{self.name} exited before listening ({self.exit_reason!r})\n"
                    + self.output_tail()
                )
            try:
                proto = yield endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
            except (error.ConnectError, error.TimeoutError, defer.TimeoutError):
                pass
            else:
                proto.transport.loseConnection()
                return self
            if self._reactor.seconds() > deadline:
                raise RuntimeError(
                    f"{self.name} not listening on {self.port} after {timeout} s\n"
                    + self.output_tail()
                )
            yield _sleep(self._reactor, interval)


def _sleep(reactor, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def start_worker(
    name: str,
    argv_tail: List[str],
    tmp_path: Path,
    port: Optional[int] = None,
    reactor=None,
    timeout: float = 30.0,
    env: Optional[dict] = None,
    worker_uuid: Optional[str] = None,
) -> defer.Deferred:
    """Spawn ``python <argv_tail> --host .. --port .. --data-path .. --uuid ..``.

    Everything lives under ``tmp_path/<name>/``. Fires with a listening ``WorkerProcess``.
    The same ``name`` and ``worker_uuid`` again restart a worker on its saved files.
    """
    if reactor is None:
        from twisted.internet import reactor
    port = port or free_port()
    base = Path(tmp_path) / name
    config_dir = base / "config"
    data_path = base / "data"
    config_dir.mkdir(parents=True, exist_ok=True)
    data_path.mkdir(parents=True, exist_ok=True)
    worker_uuid = worker_uuid or f"{name}_{uuidlib.uuid4().hex[:12]}"
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["FUNCNODES_CONFIG_DIR"] = str(config_dir)
    child_env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, *argv_tail]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    argv += ["--data-path", str(data_path), "--uuid", worker_uuid]
    proc = WorkerProcess(
        name, reactor, argv, child_env, port, data_path, config_dir, worker_uuid, base
    )
    d = proc.wait_listening(timeout=timeout)

    def _cleanup(failure):
        # Do not leave a half-started worker behind.
        stopped = proc.stop()
        stopped.addBoth(lambda _: failure)
        return stopped

    d.addErrback(_cleanup)
    return d


def start_reference(tmp_path: Path, port: Optional[int] = None, name: str = "reference", **kw):
    """The reference aiohttp ``WSWorker`` (funcnodes-worker 1.6.0) via tests/refworker.py."""
    return start_worker(name, [str(REFWORKER)], tmp_path, port, **kw)


def start_ours(tmp_path: Path, port: Optional[int] = None, name: str = "ours", **kw):
    """Our worker: ``python -m funcnodes_tw``."""
    return start_worker(name, ["-m", "funcnodes_tw"], tmp_path, port, **kw)
