"""The envelope: msgpack header plus raw array frames round-trips every payload the stages exchange, and a
stream's options and failure; every header field is checked."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from voxtral_run.runner.wire import (
    LAST_STREAM_ID,
    MAX_INPUT_CHARS,
    MAX_MESSAGE_CHARS,
    Envelope,
    Kind,
    WireError,
    decode,
    encode,
    printable_line,
)

DTYPES = st.sampled_from(["float32", "float64", "int16", "int32", "int64", "uint8", "bool"])


@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_any_array_round_trips_with_dtype_and_shape(array):
    frames = encode(Envelope("s", 3, 1.5, Kind.DATA, {"x": array, "nested": [array, {"n": 2}]}))
    assert len(frames) == 3  # the header, then one raw frame per array leaf
    item = decode([bytes(frame) for frame in frames]).item
    for decoded in (item["x"], item["nested"][0]):
        assert decoded.dtype == array.dtype and decoded.shape == array.shape
        np.testing.assert_array_equal(decoded, array)
        assert decoded.flags.writeable
    assert item["nested"][1] == {"n": 2}


def test_header_fields_and_numpy_scalars():
    frames = encode(Envelope("abc", 42, 1234.25, Kind.EOS, {"rate": np.int64(44100), "gain": np.float32(0.5)}))
    envelope = decode([bytes(frame) for frame in frames])
    assert (envelope.stream_id, envelope.seq, envelope.capture_time, envelope.kind) == ("abc", 42, 1234.25, Kind.EOS)
    assert envelope.item == {"rate": 44100, "gain": 0.5}
    assert envelope.sent_time > 0


def test_no_pickle_on_the_wire():
    with pytest.raises(WireError, match="object"):
        encode(Envelope("s", 0, 0.0, Kind.DATA, np.array([object()], dtype=object)))
    with pytest.raises(WireError, match="set"):
        encode(Envelope("s", 0, 0.0, Kind.DATA, {1, 2}))


def test_malformed_messages_are_rejected():
    frames = encode(Envelope("s", 0, 0.0, Kind.DATA, np.zeros(3)))
    with pytest.raises(WireError, match="missing"):
        decode([bytes(frames[0])])  # the array frame was lost
    with pytest.raises(WireError, match="malformed"):
        decode([msgpack.packb({"k": "bogus"})])


def test_stream_options_and_failures_round_trip():
    options = {"delay_ms": 960, "input": "calls/monday.wav"}
    first = decode([bytes(frame) for frame in encode(Envelope("s", 0, 1.0, Kind.DATA, np.zeros(2), options=options))])
    assert first.options == options
    failed = decode([bytes(frame) for frame in encode(Envelope("s", 1, 1.0, Kind.FAILED, message="stage 'x' failed"))])
    assert (failed.kind, failed.message, failed.at_capacity) == (Kind.FAILED, "stage 'x' failed", False)
    refused = Envelope("s", 1, 1.0, Kind.FAILED, message="stage 'x' failed: x at capacity", at_capacity=True)
    assert decode([bytes(frame) for frame in encode(refused)]).at_capacity is True
    last = decode([bytes(frame) for frame in encode(Envelope(LAST_STREAM_ID, 3, 1.0, Kind.LAST))])
    assert (last.kind, last.stream_id, last.seq) == (Kind.LAST, LAST_STREAM_ID, 3)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"options": {"delay_ms": 5000}}, "stream option delay_ms 5000"),
        ({"options": {"delay_ms": True}}, "stream option delay_ms True"),
        ({"options": {"delay_ms": "480"}}, "stream option delay_ms '480'"),
        ({"options": {"colour": "blue"}}, "unknown stream option 'colour'"),
        ({"options": {"input": "a\nb.wav"}}, "stream option input"),
        ({"options": {"input": "x" * (MAX_INPUT_CHARS + 1)}}, "stream option input"),
        ({"options": ["delay_ms"]}, "stream options are not a map"),
        ({"kind": Kind.FAILED}, "failure message '' on a failed"),
        ({"kind": Kind.FAILED, "message": "x" * (MAX_MESSAGE_CHARS + 1)}, "failure message"),
        ({"kind": Kind.FAILED, "message": "two\nlines"}, "failure message"),
        ({"message": "why"}, "failure message 'why' on a data"),
        ({"at_capacity": True}, "at-capacity mark True on a data"),
        ({"kind": Kind.FAILED, "message": "full", "at_capacity": 1}, "at-capacity mark 1 on a failed"),
        ({"kind": Kind.LAST}, "the sender's last message names stream 's'"),
        ({"kind": Kind.LAST, "stream_id": LAST_STREAM_ID, "item": 3}, "the sender's last message carries more"),
        ({"stream_id": LAST_STREAM_ID}, "stream id ''"),
    ],
)
def test_stream_fields_are_checked(fields, expected):
    envelope = Envelope(**({"stream_id": "s", "seq": 0, "capture_time": 0.0} | fields))
    with pytest.raises(WireError, match="malformed envelope") as refused:
        decode([bytes(frame) for frame in encode(envelope)])
    assert expected in str(refused.value)


def test_printable_line_makes_any_text_a_header_field():
    assert printable_line("a\tb\n c\x00d", 100) == "a b c\ufffdd"
    assert printable_line("x" * 50, 10) == "x" * 10
