"""
What goes over the wire: JSON message shapes and binary frames.

Every shape here is the reference worker's (PROTOCOL.md sections 2-4), so the
real clients keep working; only the encoder is faster (orjson, with
funcnodes-core's encoders as the fallback for objects it does not know), its
JSON strict (non-finite numbers are null) and node descriptions bounded
(docs/deviations.md).
"""

import functools
import itertools
import json
import math
import numbers
import re
import struct
import traceback
import uuid

import orjson
import pybase64
from funcnodes_core import ByteEncoder, BytesEncdata, Encdata, JSONEncoder, Node, NodeIO
from funcnodes_core.io import NoValue

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


def _fast_bytes(obj):
    """
    The raw bytes of C{obj} when it takes the base64 fast lane, else None.
    """
    kind = type(obj)
    if kind is bytes and bytes not in JSONEncoder.encoder_registry:
        return obj
    if kind is BytesEncdata and type(obj.data) is bytes:
        return obj.data
    return None


def _with_data(obj, text):
    """
    What C{obj}, a fast-lane object, encodes to with C{text} as its base64.
    """
    if type(obj) is bytes:
        return text
    return {"data": text, "handeled": obj.handeled, "mime": obj.mime}


def _default(obj):
    """
    funcnodes-core's encoders, with a fast lane for raw bytes: SIMD base64
    straight to a str, where funcnodes-core copies the bytes (dataclass),
    encodes them and decodes the result, three times slower. Nodes and IOs
    are described as L{describe_node} describes them.
    """
    data = _fast_bytes(obj)
    if data is not None:
        return _with_data(obj, _base64(data))
    if isinstance(obj, Node):
        return describe_node(obj)
    if isinstance(obj, NodeIO):
        return describe_io(obj)
    encoded = JSONEncoder.apply_custom_encoding(obj, preview=False)
    # A float subclass (numpy's float64) comes back as itself, which orjson
    # would hand to this function again and again.
    return float(encoded) if isinstance(encoded, float) else encoded


#: Types that L{_non_finite} passes at once: funcnodes-core runs it on every
#: item it encodes. Python's floats are left to the JSON encoders.
_NOT_NUMPY = frozenset({str, int, float, bool, type(None), list, dict, tuple})
_PASS = Encdata(data=None)
_NULL = Encdata(data=None, handeled=True, done=True)


def _non_finite(obj, preview=False):
    """
    NaN and the infinities of every real type (numpy's float16 to longdouble)
    as None, C{null} in JSON: funcnodes-core encodes numpy's as text
    (C{"inf"}) or, for float64, as C{-Infinity}, which is not JSON.
    """
    if type(obj) in _NOT_NUMPY or not isinstance(obj, numbers.Real) or math.isfinite(obj):
        return _PASS
    return _NULL


JSONEncoder.add_encoder(_non_finite)


#: Input defaults that a preview leaves as they are.
_SCALARS = frozenset({type(None), bool, int, float, type(NoValue)})


def _bound_default(io):
    """
    Make the default in C{io}, an IO's description, a preview, as the
    reference makes it (10 items a list, 1000 characters a string): a
    node whose default is a huge list must not make C{full_state} huge.
    """
    default = io.get("default", None)
    if type(default) not in _SCALARS:
        io["default"] = JSONEncoder.apply_custom_encoding(default, preview=True)
    return io


def bound_node(description):
    """
    C{description}, a node's C{full_serialize()}, with previews for its
    inputs' defaults; option lists (C{value_options}) stay complete.
    """
    for io in description["io"]:
        _bound_default(io)
    return description


def describe_node(node):
    """
    A node as clients get it (C{add_node}, C{get_node}, C{full_state}): its
    C{_repr_json_} with bounded defaults, without funcnodes-core's walk.
    """
    return bound_node(node.full_serialize(with_io_values=False))


def describe_io(io):
    """
    An input or output as clients get it, its default bounded.
    """
    return _bound_default(io.full_serialize(with_value=False))


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


def _finite(obj):
    """
    A copy of C{obj} with non-finite floats as None, for the standard
    library's encoder, which writes them as C{NaN} and C{Infinity}.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


class _StrictEncoder(json.JSONEncoder):
    """
    The standard library's encoder with L{_default} and no non-finite floats.
    """

    def default(self, obj):
        return _finite(_default(obj))


def dumps(obj):
    """
    Encode C{obj} as UTF-8 JSON bytes, applying funcnodes-core's encoders.

    Integers beyond 64 bits, which orjson refuses, are rendered as fragments
    (non-finite numbers become null on every path); only what orjson cannot
    do at all (nesting deeper than 255, lone surrogates) takes the slow
    standard path. What is nested
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
        return json.dumps(_finite(obj), cls=_StrictEncoder, allow_nan=False).encode("utf-8")


#: Bytes from this size on are base64'd only when the text is written out
#: (L{dumps_lazy}): a large message is never held as one base64 copy.
DEFERRED_MIN = 1024

#: What L{Encoded.chunks} yields at most: big enough that a 27 MB body takes
#: few reactor turns, small enough that no body is ever made in one piece.
CHUNK = 1024 * 1024

#: Stands in for a deferred base64 text; orjson escapes NUL everywhere else.
_GAP = b"\x00"
_GAP_TEXT = orjson.Fragment(b'"' + _GAP + b'"')


class Encoded:
    """
    JSON text in pieces: text, raw bytes, text, ..., text, where each raw
    piece stands for its base64 (quoted by the text around it). C{len} and
    C{bytes} give the text's length and the text, as for plain bytes.
    """

    __slots__ = ("parts", "size")

    def __init__(self, parts):
        self.parts = parts
        self.size = sum(map(len, parts[0::2])) + sum((len(raw) + 2) // 3 * 4 for raw in parts[1::2])

    def __len__(self):
        return self.size

    def __bytes__(self):
        return b"".join(
            part if i % 2 == 0 else pybase64.b64encode(part) for i, part in enumerate(self.parts)
        )

    def chunks(self, size=CHUNK):
        """
        The text in pieces of at most C{size} bytes; base64 is made here,
        one piece at a time.
        """
        step = size // 4 * 3
        for i, part in enumerate(self.parts):
            if i % 2 == 0:
                yield from (part[start : start + size] for start in range(0, len(part), size))
            else:
                view = memoryview(part)
                yield from (
                    pybase64.b64encode(view[start : start + step])
                    for start in range(0, len(part), step)
                )


def _deferring(raws):
    """
    L{_default}, but big bytes become gaps, their data kept in C{raws}.
    """

    def default(obj):
        data = _fast_bytes(obj)
        if data is not None and len(data) >= DEFERRED_MIN:
            raws.append(data)
            return _with_data(obj, _GAP_TEXT)
        return _default(obj)

    return default


def dumps_lazy(obj):
    """
    L{dumps}, but a message with big bytes comes as an L{Encoded}: parked in
    the large-message store, it costs no base64 until it is fetched.
    """
    raws = []
    try:
        text = orjson.dumps(obj, default=_deferring(raws), option=_OPTIONS)
    except orjson.JSONEncodeError:
        return dumps(obj)
    if not raws:
        return text
    texts = text.split(_GAP)
    if len(texts) != len(raws) + 1:  # a NUL from elsewhere (an orjson.Fragment)
        return dumps(obj)
    parts = [None] * (2 * len(texts) - 1)
    parts[0::2], parts[1::2] = texts, raws
    return Encoded(parts)


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


#: The folders of an absolute path (POSIX or Windows), not those of a URL or a
#: relative path: what remains is the file's name.
_FOLDERS = re.compile(r"(?<![\w.:/\\~-])(?:/|[A-Za-z]:\\)(?:[\w.@+~%=-]+[/\\])+")


def public_text(text, debug=False):
    """
    C{text} as clients may see it: outside debug mode, absolute paths keep
    only their file name, since they show how the server is laid out.
    """
    return text if debug else _FOLDERS.sub("", text)


def public_traceback(exc, debug=False):
    """
    The traceback lines clients get: all of them in debug mode, else only the
    exception's type and message, as they end a traceback (frames and notes
    name the server's files).
    """
    if debug:
        return traceback.format_exception(exc)
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    message = str(exc)
    return [public_text(f"{name}: {message}\n" if message else f"{name}\n")]


def error(exc, msgid, debug=False):
    """
    The error reply; tracebacks reveal paths, so they go out only in debug mode.
    """
    tb = traceback.format_exception(exc) if debug else []
    return {"type": "error", "error": public_text(str(exc), debug), "tb": tb, "id": msgid}


def error_event(exc, debug=False):
    tb = traceback.format_exception(exc) if debug else []
    return {"type": "error_event", "error": public_text(repr(exc), debug), "tb": tb}


def node_error(data, debug=False):
    """
    The data of a C{node_error} or C{node_trigger_error} event as clients get
    it: C{data["error"]} is the exception, C{data["tb"]} funcnodes-core's full
    traceback. The UI shows C{error}, and logs C{tb}.
    """
    exc = data["error"]
    return {**data, "error": public_text(str(exc), debug), "tb": public_traceback(exc, debug)}


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


#: Exact types whose byte encoding funcnodes-core makes with one struct format.
_STRUCT_FORMATS = {float: "!d", int: "!q"}


def encode_value(value, preview):
    """
    Byte-encode a value with funcnodes-core's ByteEncoder: (mime, payload).

    A plain float or int, every value of a running graph of numbers, is
    packed here as ByteEncoder packs it, unless an encoder was registered
    for its type: ByteEncoder's walk of the type's bases costs several times
    more than the packing.
    """
    kind = type(value)
    fmt = _STRUCT_FORMATS.get(kind)
    if fmt is not None and not _has_encoder(kind):
        try:
            return f"application/fn.struct.{fmt}", struct.pack(fmt, value)
        except struct.error:  # an int beyond 64 bits: ByteEncoder says what
            pass
    encoded = value if isinstance(value, BytesEncdata) else byte_encode(value, preview)
    return encoded.mime, encoded.data


def byte_encode(value, preview):
    """
    C{ByteEncoder.encode}, but what no byte encoder takes becomes strict
    JSON: funcnodes-core's fallback writes C{Infinity}, which the UI cannot
    parse. The text is otherwise the same (the standard library's spacing).
    """
    try:
        return ByteEncoder.encode(value, preview=preview, json_fallback=False)
    except ByteEncoder.NoEncoderException:
        pass
    data = JSONEncoder.apply_custom_encoding(value, preview)
    try:
        text = json.dumps(data, allow_nan=False)
    except ValueError:  # a non-finite float that no encoder saw (a _repr_json_'s)
        text = json.dumps(_finite(data), allow_nan=False)
    return BytesEncdata(data=text.encode("utf-8", errors="replace"), handeled=True,
                        mime="application/json")


def _has_encoder(kind):
    registry = ByteEncoder.encoder_registry
    return bool(registry.get(kind) or registry.get(object))


def _header_value(value):
    # ";" separates pairs and "\r\n\r\n" ends the header: neither may leak in.
    return str(value).replace(";", ",").replace("\r", " ").replace("\n", " ")


@functools.lru_cache(maxsize=4096)
def _header_text(pairs):
    """
    The header part after the msgid, ending the header: the same few per
    graph (one per node, IO and mime), so each is made once.
    """
    return (
        "; ".join(f"{key}={_header_value(value)}" for key, value in pairs) + "\r\n\r\n"
    ).encode("utf-8")


def _header_bytes(header):
    pairs = tuple(header.items())
    if all(type(value) is str for _, value in pairs):
        return _header_text(pairs)
    # Not cached: 1, 1.0 and True are one key to the cache, not one text.
    return _header_text.__wrapped__(pairs)


def _msgid_prefix():
    """
    Frame ids are uuid-shaped: a random prefix per process, then a counter,
    instead of a uuid4 per frame (3 % of a busy worker's time).
    """
    prefix = uuid.uuid4().hex
    return f"{prefix[:8]}-{prefix[8:12]}-4{prefix[13:16]}-8{prefix[17:20]}-".encode("ascii")


_MSGID_PREFIX = _msgid_prefix()
_MSGID_COUNTER = itertools.count()


class BinaryFrame:
    """
    One binary message: the reference's header, then the payload, kept
    apart so that a big payload is written as it is, never copied behind
    its header. C{len} and C{bytes} give the message's length and bytes.
    """

    __slots__ = ("head", "payload")

    def __init__(self, head, payload):
        self.head = head
        self.payload = payload

    def __len__(self):
        return len(self.head) + len(self.payload)

    def __bytes__(self):
        return self.head + self.payload


def binary_frames(payload, header, max_frame=None):
    """
    Split C{payload} into binary WebSocket messages (L{BinaryFrame}s) with
    the reference's header.

    Each is C{chunk=i/n;msgid=<uuid>;k=v; k=v\\r\\n\\r\\n<bytes>}. The real
    UI reassembles multi-chunk messages wrongly, so C{max_frame=None} (one
    frame) is the default; chunking is for clients that ask for it. Chunks
    are views of C{payload}, not copies.
    """
    body = _header_bytes(header)
    n = next(_MSGID_COUNTER)
    if max_frame is None:
        return [BinaryFrame(b"chunk=1/1;msgid=%b%012x;%b" % (_MSGID_PREFIX, n, body), payload)]
    msgid = b"%b%012x" % (_MSGID_PREFIX, n)
    room = max_frame - len(body) - len(b"chunk=99999/99999;msgid=%b;" % msgid)
    if room <= 0:
        raise ValueError("binary frame header larger than the frame size")
    view = memoryview(payload)
    slices = [view[i : i + room] for i in range(0, len(payload), room)] or [b""]
    return [
        BinaryFrame(b"chunk=%d/%d;msgid=%b;%b" % (i, len(slices), msgid, body), part)
        for i, part in enumerate(slices, 1)
    ]
