"""
A worker's settings, and the one place where they are read: the command
line first, then the worker config file, then the defaults (which honour
the reference's environment variables).
"""

import math
import os
import re
from dataclasses import dataclass, fields
from typing import Optional

MiB = 1024 * 1024
#: The default cap on a client's message: the Autobahn TestSuite's largest
#: messages (cases 9.x) pass, and one client holds at most this much.
DEFAULT_INCOMING = 16 * MiB
#: The public list of FuncNodes modules (the reference's).
MODULE_LIST_URL = (
    "https://raw.githubusercontent.com/Linkdlab/funcnodes_repositories/"
    "refs/heads/main/funcnodes_modules.csv"
)


def _env(name, default):
    return int(os.environ.get(name, default))


@dataclass
class Settings:
    #: Text replies and events larger than this (less the reference's 10 %
    #: margin) go out as C{large_message} pointers, fetched over HTTP.
    max_message_size: int = _env("FUNCNODES_WS_WORKER_MAX_SIZE", MiB)
    #: Largest WebSocket message (and frame) a client may send; bigger ones
    #: close the connection with 1009. None: 16 MiB, or C{max_message_size}
    #: when that is larger. (The reference caps both at
    #: C{max_message_size}; the UI sends anything over 1e6 bytes by HTTP.)
    max_incoming_size: Optional[int] = None
    #: Largest HTTP request body (uploads, C{POST /message/}).
    max_upload_size: int = _env("FUNCNODES_WS_WORKER_MAX_DATA_SIZE", 10 * 1024 * MiB)
    #: Bytes a slow client may fall behind before it is disconnected.
    max_client_queue: int = 32 * MiB
    #: Split binary values into C{chunk=i/n} frames of this size (None: never).
    max_binary_frame: Optional[int] = None
    #: Simultaneous WebSocket clients (None: no limit).
    max_connections: Optional[int] = None
    #: Bytes of large messages parked for C{GET /message/}.
    max_message_store: int = 512 * MiB
    #: Seconds before a command that has not finished gets an error reply.
    command_timeout: Optional[float] = None
    #: Seconds between WebSocket pings to each client.
    ping_interval: float = 10.0
    #: Seconds a client may take to answer a ping before it is dropped
    #: (a half-open connection: the peer vanished without closing). Autobahn's
    #: timers (txaio's batched timer) truncate to whole seconds and may fire up
    #: to a second early: below 2 a live client can be dropped.
    ping_timeout: float = 20.0
    #: Stop when no client sent C{heartbeat} for this many seconds.
    required_heartbeat: Optional[float] = None
    #: Web origins allowed to use the worker (None: loopback while on loopback).
    allowed_origins: Optional[list] = None
    #: A secret every request must carry (C{?token=}, C{Authorization: Bearer}).
    token: Optional[str] = None
    #: Send tracebacks to clients and log debug messages.
    debug: bool = False
    #: debug, info, warn or error.
    log_level: str = "info"
    #: A Dask scheduler (C{tcp://host:8786}) for the nodes funcnodes-core
    #: would run in a separate process (see L{funcnodes_tw.cluster}).
    cluster: Optional[str] = None
    #: More nodes to run there: C{fnmatch} patterns of node ids.
    cluster_nodes: Optional[list] = None
    #: Without a scheduler, cluster nodes fail ("error") or run here ("local").
    cluster_fallback: str = "error"
    #: Download a fresh module list when a client asks for the available
    #: modules (in the background); off: the cached or shipped list only.
    refresh_module_list: bool = True
    #: Where that list is downloaded from (http or https).
    module_list_url: str = MODULE_LIST_URL

    #: Serve C{GET /metrics} and count for it (off: no counting at all).
    metrics: bool = True
    #: Seconds the reactor may stand still before a stall is logged (and
    #: C{/health} answers 503).
    stall_threshold: float = 1.0
    #: The log's format: readable C{text}, or C{json} (one object a line).
    log_format: str = "text"

    def __post_init__(self):
        if self.max_incoming_size is None:
            self.max_incoming_size = max(DEFAULT_INCOMING, self.max_message_size)


NAMES = [field.name for field in fields(Settings)]

#: How a value from the config file is checked (command-line options are
#: converted by their own option definitions).
_KINDS = {
    "max_message_size": int,
    "max_incoming_size": int,
    "max_upload_size": int,
    "max_client_queue": int,
    "max_binary_frame": int,
    "max_connections": int,
    "max_message_store": int,
    "command_timeout": float,
    "ping_interval": float,
    "ping_timeout": float,
    "required_heartbeat": float,
    "stall_threshold": float,
}
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
CLUSTER_FALLBACKS = ("error", "local")
_CLUSTER = re.compile(r"(tcp|tls)://[^\s/]+:[0-9]{1,5}")
_URL = re.compile(r"https?://[^\s/]+(/\S*)?")

#: A token travels unescaped in URLs (C{ws://host/?token=T}, from which the UI
#: derives C{/?token=T/message/<id>}): C{/} would end it early, C{+} would
#: become a space. An empty one would turn authentication off.
_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")


def check_token(value):
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(
            "token must be a non-empty string of letters, digits, '.', '_', '~' and '-'"
        )
    return value


def check_cluster(value):
    if not isinstance(value, str) or not _CLUSTER.fullmatch(value):
        raise ValueError(f"cluster must be a scheduler address like tcp://host:8786, not {value!r}")
    return value


def check_url(value):
    if not isinstance(value, str) or not _URL.fullmatch(value):
        raise ValueError(f"module_list_url must be an http(s) URL, not {value!r}")
    return value


def _checked(name, value):
    kind = _KINDS.get(name)
    if kind is not None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)  # json.loads accepts Infinity and NaN
            or value <= 0
        ):
            raise ValueError(f"{name} must be a positive number, not {value!r}")
        if kind is int and value != int(value):
            # int(0.5) would be 0, which means "no limit" to Autobahn.
            raise ValueError(f"{name} must be a whole number, not {value!r}")
        return kind(value)
    if name == "allowed_origins" and not (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        raise ValueError(f"allowed_origins must be a list of origins, not {value!r}")
    if name in ("debug", "refresh_module_list") and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    if name == "module_list_url":
        return check_url(value)
    if name == "token":
        return check_token(value)
    if name == "cluster":
        return check_cluster(value)
    if name == "cluster_nodes" and not (
        isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    ):
        raise ValueError(f"cluster_nodes must be a list of node id patterns, not {value!r}")
    if name == "cluster_fallback" and value not in CLUSTER_FALLBACKS:
        raise ValueError(f"cluster_fallback must be one of {', '.join(CLUSTER_FALLBACKS)}")
    if name == "metrics" and not isinstance(value, bool):
        raise ValueError(f"metrics must be true or false, not {value!r}")
    if name == "log_format" and value not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {value!r}")
    if name == "log_level" and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {value!r}")
    if name == "log_level" and value not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    return value


def resolve(options, config):
    """
    Settings from parsed options (C{--max-message-size} etc., None when not
    given) over the worker config's keys (C{max_message_size} etc.).
    """
    values = {}
    if options.get("no-refresh-module-list"):
        values["refresh_module_list"] = False
    if options.get("no-metrics"):
        values["metrics"] = False
    for name in NAMES:
        if name in values:
            continue
        given = options.get(name.replace("_", "-"))
        if given not in (None, [], False):
            values[name] = given
        elif config.get(name) is not None:
            values[name] = _checked(name, config[name])
    settings = Settings(**values)
    if settings.debug:
        settings.log_level = "debug"
    return settings
