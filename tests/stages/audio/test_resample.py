import numpy as np
import pytest
import soxr

from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.audio.resample import RESAMPLE_QUALITY, ResampleStage
from voxtral_run.stages.base import StageError


def random_audio(rng: np.random.Generator, frames: int, channels: int) -> np.ndarray:
    return (rng.uniform(-0.5, 0.5, size=(frames, channels))).astype(np.float32)


def random_chunks(rng: np.random.Generator, samples: np.ndarray) -> list[np.ndarray]:
    """Split at random points, with some empty and some one-frame chunks."""
    cuts = np.sort(rng.integers(0, len(samples), size=rng.integers(1, 40)))
    cuts = np.concatenate([cuts, cuts[:3], cuts[:2] + 1])  # repeated cuts give empty chunks
    return np.split(samples, np.sort(np.clip(cuts, 0, len(samples))))


def run_stream(stage: ResampleStage, stream_id: str, chunks: list[np.ndarray], rate: int) -> np.ndarray:
    outputs = []
    for chunk in chunks:
        outputs += stage.push(stream_id, {"samples": chunk, "sample_rate": rate})
    outputs += stage.finish(stream_id)
    for out in outputs:
        assert out.dtype == np.float32 and out.ndim == 1 and out.size > 0
    return np.concatenate(outputs)


@pytest.mark.parametrize("rate", [44100, 8000, 22050])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_equals_offline_soxr(rate: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    audio = random_audio(rng, rate * 3 // 4, 1)
    out = run_stream(ResampleStage(), "s", random_chunks(rng, audio), rate)
    expected = soxr.resample(audio[:, 0], rate, SAMPLE_RATE, RESAMPLE_QUALITY)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_stereo_is_averaged_to_mono() -> None:
    rng = np.random.default_rng(3)
    audio = random_audio(rng, 44100 // 2, 2)
    audio[:, 1] = -0.25  # different channels, so taking one channel would fail
    out = run_stream(ResampleStage(), "s", random_chunks(rng, audio), 44100)
    expected = soxr.resample(audio.astype(np.float64).mean(axis=1), 44100, SAMPLE_RATE, RESAMPLE_QUALITY)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_interleaved_streams_are_independent() -> None:
    rng = np.random.default_rng(4)
    streams = {"a": (44100, random_audio(rng, 30000, 2)), "b": (8000, random_audio(rng, 6000, 1))}
    chunked = {sid: random_chunks(rng, audio) for sid, (_, audio) in streams.items()}
    stage = ResampleStage()
    outputs: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for i in range(max(len(c) for c in chunked.values())):
        for sid, (rate, _) in streams.items():
            if i < len(chunked[sid]):
                outputs[sid] += stage.push(sid, {"samples": chunked[sid][i], "sample_rate": rate})
    assert sorted(stage.streams()) == ["a", "b"]
    for sid, (rate, audio) in streams.items():
        outputs[sid] += stage.finish(sid)
        expected = soxr.resample(audio.mean(axis=1), rate, SAMPLE_RATE, RESAMPLE_QUALITY)
        np.testing.assert_allclose(np.concatenate(outputs[sid]), expected, atol=1e-6)
    assert stage.streams() == []


def test_16k_passes_through_exactly_as_copies() -> None:
    rng = np.random.default_rng(5)
    audio = random_audio(rng, 20000, 1)
    stage = ResampleStage()
    chunks = [c for c in random_chunks(rng, audio) if len(c)]
    items = [{"samples": chunk, "sample_rate": SAMPLE_RATE} for chunk in chunks]
    outputs = [out for item in items for out in stage.push("s", item)]
    assert len(outputs) == len(chunks)
    assert stage.finish("s") == []
    expected = audio[:, 0].copy()
    audio[:] = 0  # the outputs must not alias the capture buffers
    np.testing.assert_array_equal(np.concatenate(outputs), expected)


def test_one_dimensional_samples_are_mono() -> None:
    rng = np.random.default_rng(6)
    audio = random_audio(rng, 8000, 1)[:, 0]
    out = run_stream(ResampleStage(), "s", [audio[:3000], audio[3000:]], 8000)
    np.testing.assert_allclose(out, soxr.resample(audio, 8000, SAMPLE_RATE, RESAMPLE_QUALITY), atol=1e-6)


def test_rate_change_mid_stream_is_an_error() -> None:
    stage = ResampleStage()
    stage.push("mic", {"samples": np.zeros((800, 1), np.float32), "sample_rate": 8000})
    with pytest.raises(StageError, match=r"stream mic: rate changed from 8000 to 44100 Hz"):
        stage.push("mic", {"samples": np.zeros((800, 1), np.float32), "sample_rate": 44100})


@pytest.mark.parametrize(
    "item",
    [
        np.zeros(10, np.float32),
        {"samples": np.zeros((10, 1), np.float32)},
        {"samples": np.zeros((10, 1), np.float32), "sample_rate": 0},
        {"samples": np.zeros((10, 1), np.float32), "sample_rate": 16000.0},
        {"samples": np.zeros((10, 1, 1), np.float32), "sample_rate": 16000},
        {"samples": np.zeros((10, 0), np.float32), "sample_rate": 16000},
    ],
)
def test_bad_items_are_stage_errors(item: object) -> None:
    with pytest.raises(StageError, match="resample: stream s:"):
        ResampleStage().push("s", item)


def test_finish_forgets_the_stream_and_a_new_one_starts_fresh() -> None:
    rng = np.random.default_rng(7)
    audio = random_audio(rng, 4000, 1)
    stage = ResampleStage()
    first = run_stream(stage, "s", [audio], 8000)
    assert stage.streams() == [] and stage.finish("s") == []
    # After finish the same id may come back at another rate, and resamples from a clean state.
    run_stream(stage, "s", [audio], 44100)
    np.testing.assert_array_equal(run_stream(stage, "s", [audio], 8000), first)
