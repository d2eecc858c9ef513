"""
What goes over the wire: JSON message shapes and binary frames.

Every shape here is the reference worker's (PROTOCOL.md sections 2-4), so the
real clients keep working; only the encoder is faster (orjson, with
funcnodes-core's encoders as the fallback for objects it does not know).
"""

import itertools
import json
import traceback
import uuid

import orjson
import pybase64
from funcnodes_core import ByteEncoder, BytesEncdata, JSONEncoder, Node

_OPTIONS = (
    orjson.OPT_NON_STR_KEYS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)

PONG = b'{"type": "pong"}'


class MessageError(ValueError):
    """
    A client message that cannot be processed; the text goes back to it.
    """


_base64 = pybase64.b64encode_as_string


def _default(obj):
    """
    funcnodes-core's encoders, with a fast lane for raw bytes: SIMD base64
    straight to a str, where funcnodes-core copies the bytes (dataclass),
    encodes them and decodes the result, three times slower.
    """
    kind = type(obj)
    if kind is bytes and bytes not in JSONEncoder.encoder_registry:
        return _base64(obj)
    if kind is BytesEncdata and type(obj.data) is bytes:
        return {"data": _base64(obj.data), "handeled": obj.handeled, "mime": obj.mime}
    if isinstance(obj, Node):
        # What its _repr_json_ gives, without funcnodes-core's recursive walk.
        return obj.full_serialize(with_io_values=False)
    return JSONEncoder.apply_custom_encoding(obj, preview=False)


_INT64 = range(-(2**63), 2**64)


def _big_ints(obj):
    """
    A copy of C{obj} with integers beyond 64 bits as pre-rendered fragments.
    """
    if isinstance(obj, int) and not isinstance(obj, bool) and obj not in _INT64:
        return orjson.Fragment(str(obj).encode("ascii"))
    if isinstance(obj, dict):
        return {key: _big_ints(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_big_ints(value) for value in obj]
    return obj


def dumps(obj):
    """
    Encode C{obj} as UTF-8 JSON bytes, applying funcnodes-core's encoders.

    Integers beyond 64 bits, which orjson refuses, are rendered as fragments
    (NaN still becomes null); only what orjson cannot do at all (nesting deeper
    than 255, lone surrogates) takes the slow standard path. What is nested
    too deeply even for that (clients may send 1024 levels) raises
    RecursionError.
    """
    try:
        return orjson.dumps(obj, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        pass
    try:
        return orjson.dumps(
            _big_ints(obj), default=lambda o: _big_ints(_default(o)), option=_OPTIONS
        )
    except (orjson.JSONEncodeError, RecursionError):
        return json.dumps(obj, cls=JSONEncoder).encode("utf-8")


#: Deepest nesting of a client message: what orjson writes back. It reads
#: 1024 levels, but funcnodes-core's encoders recurse, and a value nested
#: ~500 deep set as a default would make every later save fail.
MAX_DEPTH = 254


def loads(payload):
    """
    Parse one client text frame into a message dict.

    @raise MessageError: for text that is not a JSON object, or nested
        deeper than L{MAX_DEPTH}.
    """
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"Invalid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise MessageError("A message must be a JSON object")
    # Both checks run at C speed: few brackets, or orjson writes it back
    # (what it parsed it can write, but for nesting).
    if payload.count(b"[") + payload.count(b"{") > MAX_DEPTH:
        try:
            orjson.dumps(message)
        except orjson.JSONEncodeError:
            raise MessageError(f"Invalid JSON: nested deeper than {MAX_DEPTH} levels") from None
    return message


def result(value, msgid):
    return {"type": "result", "result": value, "id": msgid}


def error(exc, msgid, debug=False):
    """
    The error reply; tracebacks reveal paths, so they go out only in debug mode.
    """
    tb = traceback.format_exception(exc) if debug else []
    return {"type": "error", "error": str(exc), "tb": tb, "id": msgid}


def error_event(exc, debug=False):
    tb = traceback.format_exception(exc) if debug else []
    return {"type": "error_event", "error": repr(exc), "tb": tb}


def progress(message, status, progress, blocking):
    return {
        "type": "progress",
        "message": message,
        "status": status,
        "progress": progress,
        "blocking": blocking,
    }


def workerevent(event, **data):
    """
    A worker event; the payload is nested twice, as the reference sends it.
    """
    return {"type": "workerevent", "event": event, "data": {"data": data}}


def nsevent(event, data):
    return {"type": "nsevent", "event": event, "data": data}


def large_message(url, msgid):
    return {"type": "large_message", "url": url, "msg_id": msgid}


def encode_value(value, preview):
    """
    Byte-encode a value with funcnodes-core's ByteEncoder: (mime, payload).
    """
    encoded = value if isinstance(value, BytesEncdata) else ByteEncoder.encode(value, preview=preview)
    return encoded.mime, encoded.data


def _header_value(value):
    # ";" separates pairs and "\r\n\r\n" ends the header: neither may leak in.
    return str(value).replace(";", ",").replace("\r", " ").replace("\n", " ")


def _msgids():
    """
    Unique, uuid-shaped frame ids: a random prefix per process and a counter,
    instead of a uuid4 per frame (3 % of a busy worker's time).
    """
    prefix = uuid.uuid4().hex
    return (
        f"{prefix[:8]}-{prefix[8:12]}-4{prefix[13:16]}-8{prefix[17:20]}-{n:012x}"
        for n in itertools.count()
    )


_MSGIDS = _msgids()


def binary_frames(payload, header, max_frame=None):
    """
    Split C{payload} into binary WebSocket frames with the reference's header.

    Each frame is C{chunk=i/n;msgid=<uuid>;k=v; k=v\\r\\n\\r\\n<bytes>}. The real
    UI reassembles multi-chunk messages wrongly, so C{max_frame=None} (one
    frame) is the default; chunking is for clients that ask for it.
    """
    body = (
        "; ".join(f"{key}={_header_value(value)}" for key, value in header.items())
        + "\r\n\r\n"
    ).encode("utf-8")
    msgid = next(_MSGIDS)
    if max_frame is None:
        return [f"chunk=1/1;msgid={msgid};".encode("ascii") + body + payload]
    room = max_frame - len(body) - len(f"chunk=99999/99999;msgid={msgid};")
    if room <= 0:
        raise ValueError("binary frame header larger than the frame size")
    slices = [payload[i : i + room] for i in range(0, len(payload), room)] or [b""]
    return [
        f"chunk={n}/{len(slices)};msgid={msgid};".encode("ascii") + body + part
        for n, part in enumerate(slices, 1)
    ]
