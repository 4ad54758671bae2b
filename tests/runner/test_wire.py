"""The envelope: msgpack header plus raw array frames round-trips every payload the stages exchange."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from voxtral_run.runner.wire import Envelope, Kind, WireError, decode, encode

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
