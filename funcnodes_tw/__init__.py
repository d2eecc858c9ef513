"""
funcnodes_tw: the FuncNodes worker as a Twisted/Autobahn daemon.
"""

__version__ = "0.1.0"

#: Names importable from the package itself, loaded on first use so that
#: importing funcnodes_tw stays cheap and installs no reactor.
_LAZY = {
    "ExternalWorker": "funcnodes_tw.external",
    "ExternalWorkerConfig": "funcnodes_tw.external",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'funcnodes_tw' has no attribute {name!r}")
