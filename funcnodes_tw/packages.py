"""
Getting packages: pip installs and the FuncNodes module list.

pip runs as a child process of the reactor (C{spawnProcess}), never in the
reactor's thread, in the worker's environment: C{<env_path>/bin/python -m pip}
when the worker config names a virtualenv, else the interpreter running the
worker. Its output goes to the log line by line as it comes, and to a
callback that turns lines into progress messages (L{funcnodes_tw.pipsteps});
installs ask for pip's machine-readable byte progress, and run without it
where pip is too old to have it. One pip runs at a time per environment: two
pips writing one site-packages break it.

The module list (which FuncNodes packages exist) is the reference's CSV:
a snapshot ships with funcnodes_tw, and a fresher copy is cached at
C{<config dir>/cache/funcnodes_modules.csv}. Reading it never needs the
network; a client asking for the available modules starts a download in
the background (bounded in time, one at a time, at most every ten minutes),
unless the settings turn refreshes off (L{funcnodes_tw.settings}).

Worker config keys read here (none can be set by a client):

    env_path             the worker's virtualenv; pip installs there
    pip_args             extra C{pip install} arguments (an index, find-links)
    pip_timeout          seconds one pip run may take (default 600)
    self_update          apply C{update_on_startup} in the worker itself
                         (default: only when C{env_path} is set)
"""

import collections
import importlib
import importlib.metadata
import os
import re
import sys
import time
import weakref
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from funcnodes_tw import pipsteps, tls

_log = Logger()

DEFAULT_TIMEOUT = 600.0
#: How long a stopping worker lets a running pip finish before ending it.
STOP_GRACE = 30.0
#: Output lines kept to explain a failure.
TAIL_LINES = 30

MODULE_LIST_TIMEOUT = 10.0
#: A cached list younger than this is not downloaded again.
MODULE_LIST_MAX_AGE = 600.0
MODULE_LIST_MAX_BYTES = 4 * 1024 * 1024
#: After a failed download, seconds before the next attempt.
MODULE_LIST_RETRY = 300.0

# PEP 508 names only: no options ("-r file"), paths or URLs reach pip's argv.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


class InstallError(Exception):
    def __init__(self, message, lines=()):
        super().__init__(message)
        #: The last output lines of the pip run that failed, if any.
        self.lines = list(lines)


# region names and versions


def check_name(name):
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"Invalid package name {name!r}")
    return name


def specifier(version):
    """
    The version requirement of C{add_package_dependency}, or None for any.

    C{"latest"} and empty mean any version; a bare version means exactly it;
    anything else must be a specifier (C{">=1.2,<2"}).
    """
    if version is None:
        return None
    version = str(version).strip()
    if version in ("", "latest"):
        return None
    try:
        return SpecifierSet(version)
    except InvalidSpecifier:
        pass
    try:
        return SpecifierSet(f"=={Version(version)}")
    except InvalidVersion:
        raise ValueError(f"Invalid version {version!r}") from None


def installed_version(name):
    """
    The installed version of distribution C{name} seen by this process.
    """
    try:
        return Version(importlib.metadata.version(name))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def satisfied(name, spec):
    current = installed_version(name)
    return current is not None and (spec is None or spec.contains(current, prereleases=True))


def requirement(name, spec):
    return check_name(name) + ("" if spec is None else str(spec))


# endregion
# region pip


def interpreter(config):
    """
    The Python whose pip installs for this worker.
    """
    env_path = (config or {}).get("env_path")
    if not env_path:
        return sys.executable
    folder = Path(env_path).expanduser()
    for candidate in (folder / "bin" / "python", folder / "Scripts" / "python.exe"):
        if candidate.exists():
            return str(candidate)
    raise InstallError(f"env_path {env_path} has no Python interpreter")


def runs_in(config):
    """
    Whether C{env_path} (if any) is the environment this process runs in,
    so that what pip installs there can be imported here.
    """
    env_path = (config or {}).get("env_path")
    if not env_path:
        return True
    try:
        return Path(env_path).expanduser().resolve() == Path(sys.prefix).resolve()
    except OSError:
        return False


def _child_environment():
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_PROGRESS_BAR="off",
    )
    return env


#: Byte progress as C{Progress CURRENT of TOTAL} lines (pip >= 24.1).
RAW_PROGRESS = ("--progress-bar", "raw")


def _failure_text(code, lines):
    return pipsteps.failure(lines) or f"pip failed ({code})"


class PipProtocol(ProcessProtocol):
    """
    One pip run: output split into lines, C{done} fires with the exit.

    C{done} fires with the last output lines on exit code 0 and fails with
    L{InstallError} otherwise; cancelling it terminates pip.
    """

    def __init__(self, on_line):
        self.on_line = on_line
        self.partial = {}
        self.tail = collections.deque(maxlen=TAIL_LINES)
        self.done = defer.Deferred(self._cancel)

    def connectionMade(self):
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        *lines, self.partial[fd] = (self.partial.get(fd, b"") + data).split(b"\n")
        for line in lines:
            self._line(fd, line)

    def _line(self, fd, raw):
        text = raw.decode("utf-8", "replace").rstrip()
        if not text.strip():
            return
        self.tail.append(text)
        if fd == 2 or text.startswith("ERROR:"):
            _log.warn("pip: {line}", line=text)
        else:
            _log.info("pip: {line}", line=text)
        try:
            self.on_line(text)
        except Exception:
            _log.failure("Handling a pip output line failed")

    def processEnded(self, reason):
        partial, self.partial = self.partial, {}
        for fd, rest in partial.items():
            if rest:
                self._line(fd, rest)
        if self.done.called:
            return
        code = getattr(reason.value, "exitCode", None)
        if code == 0:
            self.done.callback(list(self.tail))
        else:
            if code is None:
                code = f"signal {getattr(reason.value, 'signal', '?')}"
            self.done.errback(InstallError(_failure_text(code, self.tail), self.tail))

    def _cancel(self, _):
        try:
            self.transport.signalProcess("TERM")
        except (ProcessExitedAlready, AttributeError):
            pass


_LOCKS = {}


def _lock(python):
    return _LOCKS.setdefault(python, defer.DeferredLock())


def _reactor():
    from twisted.internet import reactor

    return reactor


class Installer:
    """
    A worker's pip runs: serialized per environment, bounded in time, and
    settled (finished, or ended after a grace period) when the worker stops.
    """

    def __init__(self, reactor=None):
        self.reactor = reactor
        self.running = set()
        self.closing = False
        #: Interpreters whose pip refused L{RAW_PROGRESS}.
        self.without_raw = set()

    def _clock(self):
        return self.reactor if self.reactor is not None else _reactor()

    def pip(self, config, args, on_line=lambda line: None):
        """
        Run C{python -m pip <args>} in the worker's environment.
        """
        python = interpreter(config)
        return _lock(python).run(self._spawn, config, python, list(args), on_line)

    def _spawn(self, config, python, args, on_line):
        if self.closing:
            raise InstallError("The worker is stopping")
        reactor = self._clock()
        protocol = PipProtocol(on_line)
        argv = [python, "-m", "pip", *args]
        _log.info("Running {argv}", argv=" ".join(argv))
        reactor.spawnProcess(protocol, python, argv, env=_child_environment())
        self.running.add(protocol)
        timeout = float((config or {}).get("pip_timeout") or DEFAULT_TIMEOUT)

        def timed_out(result, timeout):
            raise InstallError(f"pip did not finish within {timeout:g} s")

        d = protocol.done
        d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
        d.addBoth(self._finished, protocol)
        return d

    def _finished(self, result, protocol):
        self.running.discard(protocol)
        return result

    async def _install(self, config, python, args, on_line):
        """
        C{pip install} with byte progress, or without where pip is too old.
        """
        if python not in self.without_raw:
            try:
                return await self._spawn(config, python, [*args[:1], *RAW_PROGRESS, *args[1:]],
                                         on_line)
            except InstallError as exc:
                if not pipsteps.refuses_raw(exc.lines):
                    raise
            _log.info("The pip of {python} has no byte progress (pip < 24.1)", python=python)
            self.without_raw.add(python)
        return await self._spawn(config, python, args, on_line)

    def install_args(self, config, requirement, upgrade):
        extra = (config or {}).get("pip_args") or []
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise InstallError("pip_args in the worker config must be a list of strings")
        return ["install", *(["--upgrade"] if upgrade else []), *extra, requirement]

    def ensure(self, config, name, spec, starting=lambda upgrade: None, on_line=lambda line: None):
        """
        Make C{name} (matching C{spec}) importable, with pip only if needed.

        C{starting(upgrade)} is called right before pip runs. Fires with
        C{"present"}, C{"installed"} or C{"upgraded"}.
        """
        check_name(name)
        python = interpreter(config)
        return _lock(python).run(self._ensure, config, python, name, spec, starting, on_line)

    async def _ensure(self, config, python, name, spec, starting, on_line):
        # Checked under the lock: a pip that just ran may have installed it.
        if satisfied(name, spec):
            return "present"
        upgrade = installed_version(name) is not None
        args = self.install_args(config, requirement(name, spec), upgrade)
        starting(upgrade)
        await self._install(config, python, args, on_line)
        refresh_discovery()
        current = installed_version(name)
        if current is None:
            where = "" if runs_in(config) else f" (installed for {python}, not for this worker)"
            raise InstallError(f"{name} is not importable after pip finished{where}")
        if spec is not None and not spec.contains(current, prereleases=True):
            raise InstallError(f"{name} {current} does not match {spec} after pip finished")
        if upgrade and name.replace("-", "_") in sys.modules:
            _log.warn("{name} {version} installed; its old code stays loaded until a restart",
                      name=name, version=current)
        return "upgraded" if upgrade else "installed"

    def upgrade(self, config, name, on_line=lambda line: None):
        """
        C{pip install --upgrade name}; fires with the installed version after.
        """
        args = self.install_args(config, check_name(name), True)
        python = interpreter(config)
        d = _lock(python).run(self._install, config, python, args, on_line)
        d.addCallback(lambda _: (refresh_discovery(), installed_version(name))[1])
        return d

    def close(self, grace=STOP_GRACE):
        """
        Refuse new runs; wait up to C{grace} seconds for running ones, then
        end them. pip killed halfway can leave an environment broken, and one
        whose output pipe closes under it fails anyway, so waiting comes first.
        """
        self.closing = True
        running = [p.done for p in self.running]
        if not running:
            return defer.succeed(None)
        _log.info("Waiting up to {grace} s for pip to finish", grace=grace)
        waiting = defer.DeferredList(running, consumeErrors=True)
        reactor = self._clock()

        def too_long(result, timeout):
            _log.warn("pip still running after {grace} s: ending it", grace=grace)
            for protocol in list(self.running):
                protocol.done.cancel()

        waiting.addTimeout(grace, reactor, onTimeoutCancel=too_long)
        return waiting


_INSTALLERS = weakref.WeakKeyDictionary()


def installer_for(worker):
    """
    The worker's L{Installer}, made on first use.
    """
    installer = _INSTALLERS.get(worker)
    if installer is None:
        installer = _INSTALLERS[worker] = Installer()
    return installer


def refresh_discovery():
    """
    Let this process see what pip just installed: fresh import caches and
    funcnodes-core's module list rescanned.
    """
    importlib.invalidate_caches()
    from funcnodes_tw import libraries

    try:
        libraries.rescan()
    except Exception:
        _log.failure("Rescanning FuncNodes modules failed")


# endregion
# region update_on_startup


def self_update_enabled(config):
    """
    Whether this worker applies C{update_on_startup} itself.

    Only for a worker with its own virtualenv (C{env_path}), unless the config
    says C{self_update} explicitly: upgrading the interpreter that runs other
    programs, or funcnodes-core under a live worker, is nothing to do unasked.
    """
    flag = (config or {}).get("self_update")
    if flag is not None:
        return bool(flag)
    return bool((config or {}).get("env_path"))


def startup_updates(config):
    """
    The installed packages C{update_on_startup} asks to upgrade, if enabled.

    Packages that are not installed are skipped: an update never installs
    anything new (a client may edit C{update_on_startup}).
    """
    if not self_update_enabled(config):
        return []
    wanted = (config or {}).get("update_on_startup") or {}
    if not isinstance(wanted, dict):
        return []
    names = []
    for name, enabled in wanted.items():
        if not enabled:
            continue
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            _log.warn("Ignoring invalid package name {name!r} in update_on_startup", name=name)
            continue
        if installed_version(name) is None:
            _log.info("Not updating {name}: not installed", name=name)
            continue
        names.append(name)
    return names


# endregion
# region module list


def module_list_path():
    from funcnodes_tw import persistence

    return persistence.config_dir() / "cache" / "funcnodes_modules.csv"


def module_list_age(path):
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


class ModuleListRefresh:
    """
    One background download of the module list at a time; everyone who
    asked while it ran is told when it succeeds.
    """

    def __init__(self):
        self.running = None
        self.listeners = []
        self.failed_at = None

    def start(self, url, on_success, reactor=None):
        """
        Download the list from C{url} unless that is None (refreshes are
        off), the cache is fresh or a download is running already.

        C{on_success(text)} is called after the cache file was replaced.
        Returns the running Deferred, or None when nothing was started.
        """
        if not url:
            return None
        path = module_list_path()
        age = module_list_age(path)
        if self.running is None:
            if age is not None and age < MODULE_LIST_MAX_AGE:
                return None
            if self.failed_at is not None and time.monotonic() - self.failed_at < MODULE_LIST_RETRY:
                return None
        self.listeners.append(on_success)
        if self.running is None:
            reactor = reactor if reactor is not None else _reactor()
            self.running = defer.Deferred.fromCoroutine(self._download(url, path, reactor))
        return self.running

    async def _download(self, url, path, reactor):
        from twisted.internet.threads import deferToThread

        try:
            text = await fetch_text(url, reactor)
            await deferToThread(store_module_list, path, text, url)
        except Exception as exc:
            _log.info("Module list refresh from {url} failed: {exc}", url=url, exc=exc)
            self.failed_at = time.monotonic()
            listeners = []
        else:
            self.failed_at = None
            listeners = self.listeners
        finally:
            self.running, self.listeners = None, []
        for listener in listeners:
            try:
                listener(text)
            except Exception:
                _log.failure("Announcing the new module list failed")


MODULE_LIST = ModuleListRefresh()


async def fetch_text(url, reactor, timeout=MODULE_LIST_TIMEOUT):
    """
    GET C{url} as text within C{timeout} seconds, on a connection of its own.
    """
    tls.load()  # https
    import treq
    from twisted.web.client import HTTPConnectionPool

    async def get():
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url, pool=pool, reactor=reactor, timeout=timeout)
        if response.code != 200:
            await treq.content(response)
            raise InstallError(f"HTTP {response.code}")
        body = await treq.content(response)
        if len(body) > MODULE_LIST_MAX_BYTES:
            raise InstallError("module list too large")
        return body.decode("utf-8")

    d = defer.Deferred.fromCoroutine(get())
    d.addTimeout(timeout, reactor)
    return await d


def store_module_list(path, text, url):
    """
    Replace the cached list (and its C{.meta.json}, as the reference writes it).
    """
    import json
    from datetime import datetime, timezone

    from funcnodes_tw import libraries, persistence

    if not libraries.parse_module_list(text):
        raise InstallError("the module list has no packages")
    persistence.write_atomic(path, text.encode("utf-8"), keep_previous=False)
    meta = {
        "last_updated": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "source_url": url,
    }
    meta_path = path.with_name(path.name + ".meta.json")
    persistence.write_atomic(meta_path, json.dumps(meta, indent=2).encode(), keep_previous=False)


# endregion
