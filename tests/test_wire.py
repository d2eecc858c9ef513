"""
Message shapes and binary frames, byte for byte (PROTOCOL.md sections 2-4).

The real UI and manager parse these frames with simple string splitting, so
the exact bytes matter, not just what a lenient parser makes of them.
"""

import base64
import json
import re
import struct
import uuid

import funcnodes_core
import funcnodes_numpy  # noqa: F401  (its array encoder, as in a worker that loads it)
import funcnodes_pandas  # noqa: F401  (its DataFrame encoder)
import numpy
import pandas
import pytest
from funcnodes_core import ByteEncoder, BytesEncdata

from funcnodes_tw import wire

HEADER_END = b"\r\n\r\n"
CHUNK = re.compile(rb"^chunk=(\d+)/(\d+);msgid=([0-9a-f-]{36});")


def split_frame(frame):
    """
    (n, total, msgid, header text, payload) of one frame, parsed strictly.
    """
    frame = bytes(frame)
    match = CHUNK.match(frame)
    assert match, frame[:80]
    head, sep, payload = frame[match.end():].partition(HEADER_END)
    assert sep, "no header terminator"
    n, total, msgid = int(match[1]), int(match[2]), match[3].decode()
    uuid.UUID(msgid)
    return n, total, msgid, head.decode(), payload


def ui_header(frame):
    """
    The header as the UI reads it: split on ';', then on the first '=', trimmed.
    """
    head = bytes(frame).partition(HEADER_END)[0].decode()
    pairs = [part.split("=", 1) for part in head.split(";") if part.strip()]
    assert all(len(pair) == 2 for pair in pairs), head
    return {key.strip(): value.strip() for key, value in pairs}


def io_value_header(node="n1", io="input", mime="text/plain"):
    return {"node": node, "io": io, "mime": mime, "type": "io_value", "preview": "1"}


# region binary frames


def test_io_value_frame_is_the_reference_format():
    mime, payload = wire.encode_value(5, preview=True)
    [frame] = wire.binary_frames(payload, io_value_header("323cb5", "input", mime))
    n, total, msgid, head, body = split_frame(frame)
    assert (n, total) == (1, 1)
    assert head == "node=323cb5; io=input; mime=application/fn.struct.!q; type=io_value; preview=1"
    assert bytes(frame) == (
        f"chunk=1/1;msgid={msgid};{head}".encode() + HEADER_END + struct.pack("!q", 5)
    )


def test_result_frame_header_with_and_without_id():
    [frame] = wire.binary_frames(b"x", {"id": "af2c6988", "mime": "text/plain", "type": "result"})
    assert split_frame(frame)[3] == "id=af2c6988; mime=text/plain; type=result"
    [frame] = wire.binary_frames(b"x", {"id": None, "mime": "text/plain", "type": "result"})
    assert ui_header(frame)["id"] == "None"


def test_every_frame_has_its_own_msgid():
    frames = [wire.binary_frames(b"x", io_value_header())[0] for _ in range(3)]
    assert len({split_frame(frame)[2] for frame in frames}) == 3


@pytest.mark.parametrize(
    "value, mime, payload",
    [
        (5, "application/fn.struct.!q", b"\x00\x00\x00\x00\x00\x00\x00\x05"),
        (-2, "application/fn.struct.!q", b"\xff" * 7 + b"\xfe"),
        (True, "application/fn.struct.!q", b"\x00" * 7 + b"\x01"),
        (2.5, "application/fn.struct.!d", struct.pack(">d", 2.5)),
        ("héllo", "text/plain", "héllo".encode("utf-8")),
        (b"\x00\xffraw", "application/octet-stream", b"\x00\xffraw"),
        ([1, 2], "application/json", b"[1, 2]"),
    ],
)
def test_value_encoding(value, mime, payload):
    assert wire.encode_value(value, preview=False) == (mime, payload)


@pytest.mark.parametrize(
    "value", [0, -1, 2**63 - 1, -(2**63), 0.0, -0.0, 2.5, float("nan"), 1e308]
)
def test_plain_numbers_encode_as_funcnodes_core_encodes_them(value):
    encoded = ByteEncoder.encode(value, preview=True)
    assert wire.encode_value(value, preview=True) == (encoded.mime, encoded.data)


@pytest.mark.parametrize("value", [2**63, -(2**100)])
def test_ints_beyond_64_bits_fail_as_in_funcnodes_core(value):
    with pytest.raises(struct.error):
        ByteEncoder.encode(value, preview=True)
    with pytest.raises(struct.error):
        wire.encode_value(value, preview=True)


def test_an_encoder_registered_for_a_number_type_is_used(monkeypatch):
    monkeypatch.setitem(ByteEncoder.encoder_registry, float, [
        lambda obj, preview: BytesEncdata(data=b"mine", handeled=True, mime="text/x-mine")
    ])
    assert wire.encode_value(2.5, preview=True) == ("text/x-mine", b"mine")


@pytest.mark.parametrize("value", [1, True, 1.0, ["a", "list"], None, "1"])
def test_equal_header_values_of_other_types_keep_their_own_text(value):
    [frame] = wire.binary_frames(b"x", {"id": value, "type": "result"})
    assert split_frame(frame)[3] == f"id={value}; type=result"


def test_preview_cuts_long_strings_but_never_bytes():
    mime, payload = wire.encode_value("x" * 5000, preview=True)
    assert payload == b"x" * 1000 + b"..."
    assert wire.encode_value(b"y" * 5000, preview=True)[1] == b"y" * 5000


@pytest.mark.parametrize("max_frame", [200, 257, 1000])
def test_chunks_reassemble_and_repeat_the_header(max_frame):
    payload = bytes(range(256)) * 12
    header = io_value_header("node-1", "out", "application/octet-stream")
    frames = wire.binary_frames(payload, header, max_frame=max_frame)
    parts = [split_frame(frame) for frame in frames]
    total = len(frames)
    assert total > 1
    assert [p[0] for p in parts] == list(range(1, total + 1))
    assert {p[1] for p in parts} == {total}
    assert len({p[2] for p in parts}) == 1, "all chunks share one msgid"
    expected = "node=node-1; io=out; mime=application/octet-stream; type=io_value; preview=1"
    assert {p[3] for p in parts} == {expected}
    assert all(len(frame) <= max_frame for frame in frames)
    assert b"".join(p[4] for p in parts) == payload


def test_one_frame_when_it_fits_or_no_limit():
    payload = b"z" * 100
    assert len(wire.binary_frames(payload, io_value_header())) == 1
    [frame] = wire.binary_frames(payload, io_value_header(), max_frame=10_000)
    assert split_frame(frame)[:2] == (1, 1)


def test_frames_keep_their_payload_uncopied():
    payload = bytes(range(256)) * 12
    [frame] = wire.binary_frames(payload, io_value_header())
    assert frame.payload is payload
    chunks = wire.binary_frames(payload, io_value_header(), max_frame=1000)
    assert all(chunk.payload.obj is payload for chunk in chunks), "views, not copies"


def test_header_larger_than_the_frame_is_refused():
    with pytest.raises(ValueError):
        wire.binary_frames(b"abc", io_value_header(node="n" * 100), max_frame=50)


@pytest.mark.parametrize(
    "nasty",
    ["a;b", "a; type=result", "a\r\n\r\nb", "a\nb\rc", "x=y; io=evil"],
)
def test_header_values_cannot_break_the_header(nasty):
    header = {"node": nasty, "io": "out", "mime": "text/plain", "type": "io_value", "preview": "1"}
    [frame] = wire.binary_frames(b"PAYLOAD", header)
    n, total, msgid, head, payload = split_frame(frame)
    assert payload == b"PAYLOAD"
    assert "\r" not in head and "\n" not in head
    parsed = ui_header(frame)
    assert set(parsed) == {"chunk", "msgid", "node", "io", "mime", "type", "preview"}
    assert (parsed["io"], parsed["type"]) == ("out", "io_value")


# endregion
# region JSON


def test_nan_and_infinity_give_valid_json():
    for value in (float("nan"), float("inf"), float("-inf")):
        assert json.loads(wire.dumps({"v": value, "l": [value]})) == {"v": None, "l": [None]}


def test_objects_with_repr_json_and_bytes():
    class Thing:
        def _repr_json_(self):
            return {"kind": "thing", "n": 3}

    out = json.loads(wire.dumps({"t": Thing(), "b": b"\x00\x01binary"}))
    assert out["t"] == {"kind": "thing", "n": 3}
    assert base64.b64decode(out["b"]) == b"\x00\x01binary"


@pytest.mark.parametrize("big", [2**64, 2**70, -(2**64) - 5, 10**30])
def test_integers_beyond_64_bits(big):
    assert json.loads(wire.dumps({"n": big, "l": [1, big]})) == {"n": big, "l": [1, big]}


def test_big_integers_do_not_bring_back_invalid_json():
    """
    The slow path for big integers must keep NaN valid and encoders applied.
    """

    class Thing:
        def _repr_json_(self):
            return {"inner": 2**80, "nan": float("nan")}

    text = wire.dumps({"big": 2**65, "nan": float("nan"), "t": Thing(), "b": b"ab"})
    assert json.loads(text) == {
        "big": 2**65,
        "nan": None,
        "t": {"inner": 2**80, "nan": None},
        "b": base64.b64encode(b"ab").decode(),
    }


def test_dumps_gives_compact_utf8_bytes():
    out = wire.dumps({"s": "héllo ✓"})
    assert isinstance(out, bytes)
    assert out == '{"s":"héllo ✓"}'.encode("utf-8")


def _big_value_messages():
    value = bytes(range(256)) * 50
    yield wire.result(BytesEncdata(value, True, "application/octet-stream"), "r1")
    yield wire.nsevent("many", {"a": [BytesEncdata(value[:wire.DEFERRED_MIN], True, "x")],
                                "b": BytesEncdata(value[1:], False, None), "nul": "a\x00b"})
    yield {"big": 2**70, "v": BytesEncdata(value, True, "y")}  # the slow path
    yield {"small": BytesEncdata(b"ab", True, "z"), "s": "x" * 5000}


@pytest.mark.parametrize("message", list(_big_value_messages()))
def test_dumps_lazy_gives_the_same_text(message):
    """
    Whether joined or sent in chunks, the deferred base64 gives exactly the
    text L{wire.dumps} gives, and its length is known before.
    """
    text = wire.dumps(message)
    encoded = wire.dumps_lazy(message)
    assert len(encoded) == len(text)
    assert bytes(encoded) == text
    if isinstance(encoded, wire.Encoded):
        for size in (4, 64, 1000, 1 << 20):
            chunks = list(encoded.chunks(size))
            assert b"".join(chunks) == text
            assert max(map(len, chunks)) <= size


def test_dumps_lazy_keeps_big_bytes_raw():
    value = b"\x01" * 3000
    encoded = wire.dumps_lazy(wire.result(BytesEncdata(value, True, "m"), "r"))
    assert encoded.parts[1] is value
    assert encoded.parts[0].endswith(b'{"data":"') and encoded.parts[2].startswith(b'","')
    small = wire.result(BytesEncdata(b"ab", True, "m"), "r")
    assert wire.dumps_lazy(small) == wire.dumps(small)


def test_pong_is_the_reference_text():
    assert wire.PONG == b'{"type": "pong"}'


@pytest.mark.parametrize("text", [b"{nope", b"", b"\xff\xfe", b'{"a": 1'])
def test_loads_refuses_invalid_json(text):
    with pytest.raises(wire.MessageError, match="Invalid JSON"):
        wire.loads(text)


@pytest.mark.parametrize("text", [b"[1, 2]", b'"cmd"', b"1", b"null"])
def test_loads_refuses_non_objects(text):
    with pytest.raises(wire.MessageError, match="object"):
        wire.loads(text)


def test_loads_gives_the_object():
    assert wire.loads(b'{"type":"cmd","cmd":"uuid","id":{"a":1}}') == {
        "type": "cmd",
        "cmd": "uuid",
        "id": {"a": 1},
    }


# endregion
# region message shapes


def test_workerevent_is_nested_twice():
    assert wire.workerevent("lib_update", a=1) == {
        "type": "workerevent",
        "event": "lib_update",
        "data": {"data": {"a": 1}},
    }
    assert wire.workerevent("fullsync")["data"] == {"data": {}}


def test_result_key_order():
    assert wire.dumps(wire.result([1], "i")) == b'{"type":"result","result":[1],"id":"i"}'


def test_error_shape_hides_tracebacks_unless_debug():
    try:
        raise ValueError("bad thing")
    except ValueError as exc:
        plain = wire.error(exc, 7)
        debug = wire.error(exc, 7, debug=True)
    assert plain == {"type": "error", "error": "bad thing", "tb": [], "id": 7}
    assert list(debug) == ["type", "error", "tb", "id"]
    assert debug["tb"] and all(isinstance(line, str) for line in debug["tb"])
    assert "ValueError: bad thing" in "".join(debug["tb"])


def test_error_event_uses_repr():
    event = wire.error_event(KeyError("k"))
    assert event == {"type": "error_event", "error": "KeyError('k')", "tb": []}


def test_other_shapes():
    assert wire.nsevent("node_added", {"node": {}}) == {
        "type": "nsevent",
        "event": "node_added",
        "data": {"node": {}},
    }
    assert list(wire.progress("m", "info", 0.5, True)) == [
        "type", "message", "status", "progress", "blocking",
    ]
    assert wire.large_message("http://h:1/message/x", "x") == {
        "type": "large_message",
        "url": "http://h:1/message/x",
        "msg_id": "x",
    }


# endregion


# region non-finite numbers


def _refuse(token):
    raise ValueError(f"not JSON: {token}")


def strict(text):
    """
    Parse C{text} as a browser's C{JSON.parse} does: no NaN or Infinity.
    """
    return json.loads(text, parse_constant=_refuse)


#: Every real type the node packages produce, numpy's float widths included.
FLOAT_TYPES = [float, numpy.float16, numpy.float32, numpy.float64, numpy.longdouble]
NON_FINITE = ["nan", "inf", "-inf"]


def test_the_strict_parser_refuses_what_the_standard_encoder_writes():
    with pytest.raises(ValueError, match="not JSON: -Infinity"):
        strict(json.dumps([float("-inf")]))


@pytest.mark.parametrize("kind", FLOAT_TYPES, ids=lambda k: k.__name__)
@pytest.mark.parametrize("text", NON_FINITE)
def test_non_finite_scalars_are_null_everywhere_in_a_message(kind, text):
    value = kind(text)
    message = {"v": value, "l": [value, 1], "t": (value,), "d": {"deep": [{"x": value}]}}
    expected = {"v": None, "l": [None, 1], "t": [None], "d": {"deep": [{"x": None}]}}
    assert strict(wire.dumps(message)) == expected
    assert strict(bytes(wire.dumps_lazy(message))) == expected


@pytest.mark.parametrize("kind", FLOAT_TYPES, ids=lambda k: k.__name__)
@pytest.mark.parametrize("text", NON_FINITE)
def test_non_finite_scalars_are_null_on_the_slow_paths(kind, text):
    """
    Big integers, nesting deeper than orjson goes and lone surrogates take
    other encoders, which must not bring the tokens back.
    """
    value = kind(text)
    deep = [value]
    for _ in range(300):
        deep = [deep]
    for message in ({"big": 2**70, "v": value}, {"deep": deep}, {"s": "\ud800", "v": [value]}):
        parsed = strict(wire.dumps(message))
        inner = parsed.get("deep") or parsed["v"]
        while isinstance(inner, list):
            (inner,) = inner
        assert inner is None


@pytest.mark.parametrize("kind", FLOAT_TYPES[1:], ids=lambda k: k.__name__)
def test_non_finite_numbers_inside_numpy_arrays_are_null(kind):
    array = numpy.array([1.5, "inf", "-inf", "nan"], dtype=kind)
    # Finite items as in the reference: numbers, but longdouble's are text.
    finite = json.loads(json.dumps(array[:1], cls=funcnodes_core.JSONEncoder))[0]
    assert finite in (1.5, "1.5")
    assert strict(wire.dumps({"a": array, "m": array.reshape(2, 2)})) == {
        "a": [finite, None, None, None], "m": [[finite, None], [None, None]]
    }
    mime, payload = wire.encode_value(array, preview=False)
    assert (mime, strict(payload)) == ("application/json", [finite, None, None, None])
    # The preview is numpy's text of the array, a JSON string, as in the reference.
    mime, payload = wire.encode_value(array, preview=True)
    assert mime == "application/json" and "inf" in strict(payload)


def test_non_finite_numbers_inside_pandas_objects_are_null():
    frame = pandas.DataFrame({"a": [1.5, numpy.inf, numpy.nan],
                              "b": numpy.array([-numpy.inf, 2, 3], dtype=numpy.float32)})
    expected = {"index": [0, 1, 2], "columns": ["a", "b"],
                "data": [[1.5, None], [None, 2.0], [None, 3.0]]}
    assert strict(wire.dumps(frame)) == expected
    for preview in (False, True):
        mime, payload = wire.encode_value(frame, preview=preview)
        assert (mime, strict(payload)) == ("application/json", expected)
    series = pandas.Series([numpy.inf, 1.0, numpy.nan])
    assert strict(wire.dumps(series)) == [None, 1.0, None]
    assert strict(wire.encode_value(series, preview=False)[1]) == [None, 1.0, None]


@pytest.mark.parametrize("kind", FLOAT_TYPES[1:], ids=lambda k: k.__name__)
@pytest.mark.parametrize("text", NON_FINITE)
def test_non_finite_numpy_scalars_as_values(kind, text):
    """
    A value's byte encoding: float64 (a Python float) is packed as a
    double, as in the reference; the others' JSON is null, not C{"inf"}.
    """
    value = kind(text)
    for preview in (False, True):
        mime, payload = wire.encode_value(value, preview=preview)
        if kind is numpy.float64:
            assert (mime, payload) == ("application/fn.struct.!d", struct.pack("!d", value))
        else:
            assert (mime, payload) == ("application/json", b"null")
        encoded = wire.byte_encode([value, {"k": value}], preview)
        assert (encoded.mime, strict(encoded.data)) == ("application/json", [None, {"k": None}])


def test_non_finite_numbers_an_encoder_hands_back_whole_are_null():
    """
    A C{_repr_json_} result is not walked by funcnodes-core's encoders.
    """

    class Thing:
        def _repr_json_(self):
            return {"inf": float("inf"), "l": [numpy.float64("-inf")]}

    assert strict(wire.dumps({"t": Thing()})) == {"t": {"inf": None, "l": [None]}}
    mime, payload = wire.encode_value(Thing(), preview=False)
    assert (mime, strict(payload)) == ("application/json", {"inf": None, "l": [None]})


@pytest.mark.parametrize(
    "value",
    [numpy.float64(2.5), numpy.float32(2.5), numpy.float16(-1), numpy.int64(7), numpy.bool_(True),
     numpy.array([1.5, 2], dtype=numpy.float32), complex(1, float("inf")),
     numpy.complex128(complex("inf")), [numpy.float64(0.1), numpy.int32(3)]],
    ids=repr,
)
def test_other_numbers_keep_the_reference_encoding(value):
    """
    Finite numpy numbers (and complex ones, which are text) come out as
    funcnodes-core's encoder writes them, compact.
    """
    reference = json.dumps(value, cls=funcnodes_core.JSONEncoder)
    assert strict(wire.dumps(value)) == json.loads(reference)
    if not isinstance(value, float):
        mime, payload = wire.encode_value(value, preview=False)
        assert payload == ByteEncoder.encode(value, preview=False).data


def test_a_finite_float64_stays_on_the_fast_path(monkeypatch):
    calls = []
    monkeypatch.setattr(wire.json, "dumps", lambda *a, **k: calls.append(a))
    assert wire.dumps([numpy.float64(0.1), numpy.float64(-3)]) == b"[0.1,-3.0]"
    assert calls == []


# endregion


# region node descriptions


@pytest.fixture(scope="module")
def numpy_library():
    library = funcnodes_core.Library()
    library.add_shelf(funcnodes_numpy.NODE_SHELF)
    return library


def _log_node(library, default):
    node = library.get_node_by_id("np.log")()
    node.inputs["x"].set_default(default)
    return node


def _described(description):
    return {io["id"]: io for io in strict(wire.dumps(description))["io"]}


@pytest.mark.parametrize(
    "default, preview",
    [(list(range(15)), list(range(10))), ("x" * 5000, "x" * 1000 + "..."),
     ({"k": list(range(12))}, {"k": list(range(10))}), (7, 7), (2.5, 2.5), (None, None)],
    ids=["list", "text", "dict", "int", "float", "none"],
)
def test_node_descriptions_bound_defaults_as_the_reference(numpy_library, default, preview):
    node = _log_node(numpy_library, default)
    ios = _described(wire.describe_node(node))
    assert ios["x"]["default"] == preview
    # Everything else is funcnodes-core's description of the node.
    full = strict(wire.dumps(node.full_serialize(with_io_values=False)))
    full["io"][0]["default"] = preview
    assert strict(wire.dumps(wire.describe_node(node))) == full
    assert strict(wire.dumps(wire.describe_io(node.inputs["x"])))["default"] == preview


def test_node_descriptions_keep_option_lists_complete(numpy_library):
    node = _log_node(numpy_library, list(range(15)))
    options = _described(wire.describe_node(node))["dtype"]["value_options"]["options"]
    assert len(options["keys"]) == len(options["values"]) == 21
    assert "float16" in options["keys"] and "void" in options["keys"]


def test_a_huge_default_keeps_a_node_description_small(numpy_library):
    node = _log_node(numpy_library, list(range(1_000_000)))
    assert len(wire.dumps(wire.describe_node(node))) < 5000
    assert len(wire.dumps(node)) < 5000  # a Node in a reply (add_node, get_node)
    assert len(wire.dumps(node.inputs["x"])) < 2000  # an IO (update_io_options)
    event = wire.bound_node(node.full_serialize(with_io_values=False))  # node_added
    assert len(wire.dumps(event)) < 5000


# endregion
