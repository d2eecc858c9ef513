"""
The RPC commands clients call by name, and the table that maps names to them.

A command is a plain function C{f(worker, **kwargs)}, sync or C{async}. The
C{@command} decorator registers it under its own name; C{saves=True} marks
commands whose success must reach disk (the save loop writes it within 1 s).
"""

import inspect
from dataclasses import dataclass

from funcnodes_tw import aio


class UnknownCommand(ValueError):
    pass


class InvalidArguments(TypeError):
    pass


#: Parameter annotations that are checked, and how errors name them.
_KINDS = {str: "a string", dict: "an object", list: "an array", list[str]: "an array of strings"}


@dataclass(frozen=True)
class Command:
    function: object
    saves: bool
    signature: inspect.Signature
    #: Argument names a client may send, those it must send, and whether
    #: the command takes any others (C{**kwargs}): checked without binding.
    names: frozenset
    required: frozenset
    open: bool
    #: Arguments whose JSON type is checked, with their annotation.
    checks: tuple

    @classmethod
    def of(cls, function, saves):
        signature = inspect.signature(function)
        params = list(signature.parameters.values())[1:]  # after the worker
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return cls(
            function,
            saves,
            signature,
            frozenset(p.name for p in params if p.kind in keyword),
            frozenset(p.name for p in params if p.kind in keyword and p.default is p.empty),
            any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params),
            tuple((p.name, p.annotation) for p in params if p.annotation in _KINDS),
        )

    def fits(self, kwargs):
        keys = kwargs.keys()
        return self.required <= keys and (self.open or keys <= self.names)


COMMANDS = {}


def command(function=None, *, saves=False):
    def register(function):
        COMMANDS[function.__name__] = Command.of(function, saves)
        return function

    return register if function is None else register(function)


def run(worker, name, kwargs):
    """
    Run command C{name} with C{kwargs}; return a Deferred of its result.

    Arguments are checked against the command's signature first, so a client
    that sends a wrong or missing argument gets a clear message instead of a
    TypeError raised from somewhere inside funcnodes-core.
    """
    try:
        cmd = COMMANDS[name]
    except (KeyError, TypeError):
        raise UnknownCommand(f"Unknown command {name!r}") from None
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise InvalidArguments(f"kwargs of {name!r} must be an object")
    if not cmd.fits(kwargs):
        try:
            cmd.signature.bind(worker, **kwargs)  # for its precise message
        except TypeError as exc:
            raise InvalidArguments(f"Invalid arguments for {name!r}: {exc}") from None
        raise InvalidArguments(f"Invalid arguments for {name!r}")
    _check_types(name, cmd.checks, kwargs)
    d = aio.call(cmd.function, worker, **kwargs)
    if cmd.saves:
        d.addCallback(_saved, worker)
    return d



def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", dict: "an object"}.get(type(value), "an array")


def _check_types(name, checks, arguments):
    """
    Ids and objects of the wrong JSON type get a clear message here, not
    "unhashable type: 'list'" from deep inside funcnodes-core.
    """
    for param, kind in checks:
        if param not in arguments:
            continue
        value = arguments[param]
        if kind == list[str]:
            fits = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            fits = isinstance(value, kind)
        if not fits:
            raise InvalidArguments(
                f"{param} of {name!r} must be {_KINDS[kind]}, not {_json_type(value)}"
            )


def _saved(result, worker):
    worker.request_save()
    return result


from funcnodes_tw.commands import external, files, library, nodes, state  # noqa: E402,F401  (registers)
