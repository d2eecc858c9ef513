"""
Command-line options and the service maker for C{twistd funcnodes-worker}
and the C{funcnodes-tw} launcher.
"""

import atexit
import importlib.util
import os
import re
import sys
from uuid import uuid4

from twisted.logger import Logger
from twisted.python import usage

from funcnodes_tw import aio, persistence, settings, tls
from funcnodes_tw.logs import LEVELS

_log = Logger()

START_PORT = int(os.environ.get("FUNCNODES_WS_WORKER_STARTPORT", 9382))
END_PORT = int(os.environ.get("FUNCNODES_WS_WORKER_ENDPORT", 9582))


def _positive(kind):
    def convert(text):
        value = kind(text)
        if not value > 0 or value == float("inf"):  # also refuses nan
            raise ValueError(f"must be positive, not {text}")
        return value

    return convert


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a FuncNodes worker: one node graph served over WebSocket and HTTP on "
        "one port, compatible with the FuncNodes web UI and worker manager. "
        "Without options a new worker is created under $FUNCNODES_CONFIG_DIR "
        "(default ~/.funcnodes) on port 9382 or the next free one. Limits and "
        "access settings not given here are read from the worker config file "
        "(same names with underscores, e.g. max_message_size)."
    )
    optFlags = [
        ["debug", "d", "Log debug messages and send tracebacks to clients."],
        ["exit-on-stdin-close", None, "Stop when standard input closes (for a parent process)."],
        ["uvloop", None, "Run on uvloop (funcnodes-tw only; pip install 'funcnodes-tw[uvloop]')."],
        ["no-metrics", None, "Serve no GET /metrics and count nothing for it."],
        ["no-refresh-module-list", None, "Never download the module list (offline or private deployments): 'Manage Libraries' offers the cached or shipped list."],
    ]
    optParameters = [
        ["uuid", "u", None, "Worker id; a new one is generated if omitted."],
        ["name", "n", None, "Human-readable worker name."],
        ["data-path", None, None, "Data directory (default <config>/workers/worker_<uuid>)."],
        ["host", None, os.environ.get("FUNCNODES_HOST", "127.0.0.1"), "Interface to bind."],
        ["port", "p", None, "TCP port (default: the worker's last port, else the first free from 9382).", int],
        ["listen", "l", None, "A Twisted server endpoint string; overrides --host/--port."],
        ["log-level", None, None, "debug, info (default), warn or error."],
        ["log-format", None, None, "text (default) or json: one JSON object a line (Twisted's JSON log events) on the launcher's stdout and in worker.log; twistd's own log takes --logger=funcnodes_tw.logs.json_stdout."],
        ["stall-threshold", None, None, "Seconds the reactor may stand still before a warning names the running node (default 1).", _positive(float)],
        ["token", None, None, "A secret every request must carry (?token= in the worker URL, or Authorization: Bearer); letters, digits, '.', '_', '~', '-'.", settings.check_token],
        ["required-heartbeat", None, None, "Stop when no client sent 'heartbeat' for this many seconds.", _positive(float)],
        ["command-timeout", None, None, "Seconds after which an unfinished command gets an error reply.", _positive(float)],
        ["max-connections", None, None, "Most WebSocket clients at once.", _positive(int)],
        ["ping-interval", None, None, "Seconds between WebSocket pings to each client (default 10).", _positive(float)],
        ["ping-timeout", None, None, "Seconds a client may take to answer a ping before it is dropped (default 20).", _positive(float)],
        ["max-message-size", None, None, "Replies larger than this many bytes go out as large_message pointers for GET /message/ (default 1 MiB).", _positive(int)],
        ["max-incoming-size", None, None, "Largest WebSocket message a client may send, in bytes (default 16 MiB, or --max-message-size if larger).", _positive(int)],
        ["max-upload-size", None, None, "Largest HTTP request body in bytes (default 10 GiB).", _positive(int)],
        ["max-client-queue", None, None, "Bytes a slow client may fall behind before it is disconnected (default 32 MiB).", _positive(int)],
        ["max-message-store", None, None, "Bytes of large messages kept for GET /message/ (default 512 MiB).", _positive(int)],
        ["max-binary-frame", None, None, "Split binary values into chunk=i/n frames of this many bytes (the UI cannot reassemble them).", _positive(int)],
        ["module-list-url", None, None, "Where 'Manage Libraries' downloads the module list from (default: the public FuncNodes list).", settings.check_url],
        ["cluster", None, None, "A Dask scheduler (tcp://HOST:8786) for the nodes that run in a separate process (pip install 'funcnodes-tw[cluster]').", settings.check_cluster],
    ]

    def __init__(self):
        super().__init__()
        self["allowed-origins"] = []

    def opt_allow_origin(self, origin):
        """
        A web origin (scheme://host[:port]) allowed to use the worker; repeatable; '*' for any.
        """
        self["allowed-origins"].append(origin)

    def postOptions(self):
        if self["uvloop"] and not aio.on_uvloop():
            raise usage.UsageError(
                "--uvloop works with funcnodes-tw only, spelled out in full"
            )
        if self["log-level"] is not None and self["log-level"] not in LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LEVELS)}")
        if self["log-format"] is not None and self["log-format"] not in settings.LOG_FORMATS:
            raise usage.UsageError(
                f"--log-format must be one of {', '.join(settings.LOG_FORMATS)}"
            )
        if self["uuid"] is None:
            self["uuid"] = new_uuid(self["name"])
        elif not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", self["uuid"]):
            raise usage.UsageError("--uuid may only contain letters, digits, '.', '_' and '-'")
        self.files = persistence.WorkerFiles(self["uuid"], self["data-path"])
        try:
            self.settings = settings.resolve(self, _settings_config(self.files))
        except ValueError as exc:
            raise usage.UsageError(f"{self.files.config}: {exc}") from None
        if self.settings.cluster and importlib.util.find_spec("distributed") is None:
            raise usage.UsageError(
                "a cluster needs Dask's distributed: pip install 'funcnodes-tw[cluster]'"
            )


def new_uuid(name=None):
    if name:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:16]
        if slug:
            return f"{slug}_{uuid4().hex[:16]}"
    return uuid4().hex


def listen_descriptions(options, files):
    """
    Endpoint strings to try in order: the one asked for, or a port search.
    """
    if options["listen"]:
        return [options["listen"]]
    from twisted.internet.endpoints import quoteStringArgument  # after the reactor (tls.py)

    host = quoteStringArgument(options["host"])
    port = options["port"]
    if port is None:
        port = _saved_config(files).get("port")
    if port is not None:
        return [f"tcp:port={port}:interface={host}"]
    return [f"tcp:port={p}:interface={host}" for p in range(START_PORT, END_PORT + 1)]


def _once(function):
    """
    C{stop_worker}, the heartbeat and signals may all ask to stop; stop once.
    """
    called = []

    def once():
        if not called:
            called.append(True)
            function()

    return once


def _settings_config(files):
    """
    The worker config the settings come from. Unlike L{_saved_config}, a file
    that cannot be read is an error: taken as empty, it would silently drop
    its token, and the registration written at start would replace it.
    """
    try:
        saved = persistence.read_json(files.config)
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if saved is not None and not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    return saved or {}


def _saved_config(files):
    try:
        saved = persistence.read_json(files.config)
    except ValueError:
        return {}
    return saved if isinstance(saved, dict) else {}


def _worker_parts():
    from funcnodes_tw.resources import make_site
    from funcnodes_tw.service import Listener, create

    return make_site, Listener, create


def makeService(options, reactor=None):
    if reactor is None:
        reactor = aio.install_reactor()
    make_site, Listener, create = tls.without(_worker_parts)  # Autobahn imports TLS too

    files, worker_settings = options.files, options.settings
    service = create(
        options["uuid"], options["data-path"], options["name"], reactor, settings=worker_settings
    )
    worker = service.worker
    worker.stop = _once(reactor.stop)

    def failed(failure):
        _log.critical("Cannot listen: {error}", error=failure.value)
        service.exit_code = 1
        # twistd ignores exit codes; leave with 1 after its own clean-up, so
        # that a supervisor (systemd's Restart=on-failure) sees the failure.
        atexit.register(os._exit, 1)
        # The port is usually refused synchronously in startService, before
        # the reactor runs: stopping right away would raise ReactorNotRunning
        # and leave the process hanging.
        reactor.callWhenRunning(reactor.stop)

    Listener(
        listen_descriptions(options, files),
        make_site(service.resource, worker_settings.max_upload_size, worker.files.files),
        reactor,
        service.listening,
        failed,
    ).setServiceParent(service)
    if options["exit-on-stdin-close"]:
        from funcnodes_tw.systemd import StdinWatch

        StdinWatch(worker.stop, reactor).setServiceParent(service)
    return service


def _fail_early():
    """
    Install the asyncio reactor now, before twistd imports the default one.
    """
    try:
        aio.install_reactor()
    except aio.WrongReactor as exc:
        sys.exit(f"twistd funcnodes-worker: {exc}; drop --reactor or use --reactor=asyncio")


_fail_early()
