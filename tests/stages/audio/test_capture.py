import importlib.abc
import importlib.machinery
import io
import os
import struct
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile

from voxtral_run.stages.audio.capture import (
    DEFAULT_CHUNK_MS,
    FILE_DESCRIPTOR_MARGIN,
    MAX_STREAMS,
    FileSource,
    FileStreams,
    MicSource,
    StdinSource,
    build_source,
    expand_inputs,
    inspect_capture,
    list_input_devices,
)
from voxtral_run.stages.base import END, StageError, StreamFailed, StreamStart


def frames_per_chunk(rate: int, chunk_ms: float = DEFAULT_CHUNK_MS) -> int:
    return round(rate * chunk_ms / 1000)


def random_audio(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.9, 0.9, size=(frames, channels)).astype(np.float32)


def collect(source) -> tuple[np.ndarray, list[dict]]:
    items = list(source.chunks())
    for item in items:
        assert item["samples"].dtype == np.float32 and item["samples"].ndim == 2
    return np.concatenate([item["samples"] for item in items]), items


def single_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- FileSource ---


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels"),
    [
        ("WAV", "PCM_16", 44100, 2),
        ("WAV", "FLOAT", 16000, 1),
        ("FLAC", "PCM_24", 8000, 1),
        ("OGG", "VORBIS", 22050, 2),
    ],
)
def test_file_source_yields_the_whole_file_in_chunks(
    tmp_path: Path, fmt: str, subtype: str, rate: int, channels: int
) -> None:
    path = tmp_path / f"audio.{fmt.lower()}"
    soundfile.write(path, random_audio(rate // 2 + 37, channels), rate, format=fmt, subtype=subtype)
    expected, _ = soundfile.read(path, dtype="float32", always_2d=True)
    source = FileSource(path)
    assert (source.sample_rate, source.channels) == (rate, channels)
    samples, items = collect(source)
    np.testing.assert_array_equal(samples, expected)
    assert {item["sample_rate"] for item in items} == {rate}
    assert all(len(item["samples"]) == frames_per_chunk(rate) for item in items[:-1])
    assert 0 < len(items[-1]["samples"]) <= frames_per_chunk(rate)


def test_file_source_chunk_size_is_a_setting(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    soundfile.write(path, random_audio(16000, 1), 16000)
    _, items = collect(FileSource(path, chunk_ms=20))
    assert len(items[0]["samples"]) == frames_per_chunk(16000, 20)
    with pytest.raises(StageError, match=r"0 is outside 10\.\.1000 ms"):
        FileSource(path, chunk_ms=0)


def test_file_source_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(StageError, match="no such file") as excinfo:
        FileSource(missing)
    assert str(missing) in single_line_error(excinfo)

    with pytest.raises(StageError, match="not a file"):
        FileSource(tmp_path)

    text = tmp_path / "notes.wav"
    text.write_text("these are not\nthe samples you are looking for\n" * 20)
    with pytest.raises(StageError, match="not a readable audio file") as excinfo:
        FileSource(text)
    assert str(text) in single_line_error(excinfo)

    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(StageError, match="no audio frames") as excinfo:
        FileSource(empty)
    assert str(empty) in single_line_error(excinfo)


def test_file_source_close_ends_chunks(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    soundfile.write(path, random_audio(16000, 1), 16000)
    source = FileSource(path)
    chunks = source.chunks()
    next(chunks)
    source.close()
    assert list(chunks) == []
    source.close()  # closing twice is harmless


def test_file_source_realtime_paces_chunks_by_their_audio_time(tmp_path: Path) -> None:
    rate, chunk_ms = 8000, 50
    duration_s = 0.3
    path = tmp_path / "a.wav"
    soundfile.write(path, random_audio(int(rate * duration_s), 1), rate)
    start = time.monotonic()
    audio_end_s = 0.0
    for item in FileSource(path, chunk_ms=chunk_ms, realtime=True).chunks():
        audio_end_s += len(item["samples"]) / rate
        elapsed = time.monotonic() - start
        assert elapsed >= audio_end_s - 0.005, "a chunk came before its audio would have been captured"
        assert elapsed < audio_end_s + 0.1
    assert audio_end_s == pytest.approx(duration_s)


def test_file_source_close_interrupts_realtime_wait(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    soundfile.write(path, random_audio(16000 * 10, 1), 16000)
    source = FileSource(path, chunk_ms=1000, realtime=True)
    threading.Timer(0.1, source.close).start()
    start = time.monotonic()
    assert list(source.chunks()) == []  # the first chunk would be due after 1 s
    assert time.monotonic() - start < 0.6


# --- FileSource through PyAV: formats soundfile cannot read ---

AV_FRAME = 1024  # samples per frame handed to the encoders (an AAC frame)


@pytest.fixture
def av() -> types.ModuleType:
    return pytest.importorskip("av")


def tones(frames: int, rate: int, channels: int) -> np.ndarray:
    """A different tone in each channel, swelling and fading every 0.25 s like syllables, with a little noise."""
    t = np.arange(frames) / rate
    envelope = 0.2 + 0.6 * np.abs(np.sin(2 * np.pi * 2 * t))
    noise = np.random.default_rng(0).standard_normal((frames, channels)) * 0.005
    columns = [envelope * 0.5 * np.sin(2 * np.pi * (330 + 220 * c) * t) for c in range(channels)]
    return (np.stack(columns, axis=1) + noise).astype(np.float32)


def encode_with_pyav(
    av: types.ModuleType, path: Path, container_format: str, codec: str, audio: np.ndarray, rate: int
) -> None:
    layout = {1: "mono", 2: "stereo"}[audio.shape[1]]
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        stream.codec_context.bit_rate = 128_000
        for start in range(0, len(audio), AV_FRAME):
            planar = np.ascontiguousarray(audio[start : start + AV_FRAME].T)
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
            frame.sample_rate = rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def aligned_correlations(decoded: np.ndarray, source: np.ndarray, max_lag: int = 2 * AV_FRAME) -> list[float]:
    """Per channel, the correlation of the decoded audio with the source at the lag (the codec's leading
    padding) where the first channels match best."""
    span = len(source) - max_lag
    lag = max(range(max_lag + 1), key=lambda lag: float(decoded[lag : lag + span, 0] @ source[:span, 0]))
    aligned = decoded[lag : lag + span]
    return [float(np.corrcoef(aligned[:, c], source[:span, c])[0, 1]) for c in range(source.shape[1])]


@pytest.mark.parametrize(
    ("name", "container_format", "codec", "rate", "channels"),
    [
        ("speech.m4a", "mp4", "aac", 44100, 1),
        ("speech.webm", "webm", "libopus", 48000, 2),
    ],
)
def test_file_source_decodes_what_soundfile_cannot_with_pyav(
    av: types.ModuleType, tmp_path: Path, name: str, container_format: str, codec: str, rate: int, channels: int
) -> None:
    source_audio = tones(int(rate * 1.5), rate, channels)
    path = tmp_path / name
    encode_with_pyav(av, path, container_format, codec, source_audio, rate)
    with pytest.raises(RuntimeError):
        soundfile.SoundFile(path)
    source = FileSource(path)
    assert (source.sample_rate, source.channels) == (rate, channels)
    samples, items = collect(source)
    assert {item["sample_rate"] for item in items} == {rate}
    assert all(len(item["samples"]) == frames_per_chunk(rate) for item in items[:-1])
    assert 0 < len(items[-1]["samples"]) <= frames_per_chunk(rate)
    # Lossy codecs add at most a frame or two of padding; the waveform and loudness come back.
    assert len(source_audio) <= len(samples) <= len(source_audio) + 2 * AV_FRAME
    assert min(aligned_correlations(samples, source_audio)) > 0.95
    rms_ratio = np.sqrt(np.mean(samples**2, axis=0) / np.mean(source_audio**2, axis=0))
    np.testing.assert_allclose(rms_ratio, 1, atol=0.1)


def test_file_source_pyav_close_ends_chunks(av: types.ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "a.webm"
    encode_with_pyav(av, path, "webm", "libopus", tones(48000, 48000, 1), 48000)
    source = FileSource(path, chunk_ms=20)
    chunks = source.chunks()
    assert len(next(chunks)["samples"]) == frames_per_chunk(48000, 20)
    source.close()
    assert list(chunks) == []
    source.close()


def test_file_source_without_pyav_names_the_extra(
    av: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "voice.m4a"
    encode_with_pyav(av, path, "mp4", "aac", tones(44100, 44100, 1), 44100)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(
        StageError, match=r"M4A/AAC, MP4 or WebM/Opus need PyAV: pip install 'voxtral-run\[av\]'"
    ) as excinfo:
        FileSource(path)
    assert single_line_error(excinfo).startswith(f"{path}: not a readable audio file")


def test_file_source_pyav_errors_name_the_file(av: types.ModuleType, tmp_path: Path) -> None:
    whole = tmp_path / "whole.m4a"
    encode_with_pyav(av, whole, "mp4", "aac", tones(44100, 44100, 1), 44100)
    truncated = tmp_path / "truncated.m4a"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # loses the index at the end
    empty = tmp_path / "empty.m4a"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(StageError, match=r"not a readable audio file \(soundfile: .+; PyAV: .+\)") as excinfo:
            FileSource(path)
        assert single_line_error(excinfo).startswith(f"{path}: ")

    video_only = tmp_path / "video.mp4"
    with_empty_audio = tmp_path / "silent-film.mkv"
    for path, audio_stream in ((video_only, False), (with_empty_audio, True)):
        with av.open(str(path), "w") as container:
            if audio_stream:
                container.add_stream("libopus", rate=48000, layout="mono")
            video = container.add_stream("mpeg4", rate=25)
            video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
            for _ in range(3):
                container.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8))))
            container.mux(video.encode(None))
    with pytest.raises(StageError, match="no audio stream") as excinfo:
        FileSource(video_only)
    assert single_line_error(excinfo).startswith(f"{video_only}: ")
    with pytest.raises(StageError, match="no audio frames") as excinfo:
        FileSource(with_empty_audio)
    assert single_line_error(excinfo).startswith(f"{with_empty_audio}: ")


# --- StdinSource ---


def pcm16_bytes(audio: np.ndarray) -> bytes:
    return np.round(audio * 32767).astype("<i2").tobytes()


class TrickleStream(io.RawIOBase):
    """A pipe-like stream whose reads return at most a few bytes."""

    def __init__(self, data: bytes, step: int = 3):
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        part = self._data[self._pos : self._pos + min(size, self._step)]
        self._pos += len(part)
        return part


@pytest.mark.parametrize("channels", [1, 2])
def test_stdin_raw_s16le(channels: int) -> None:
    audio = random_audio(8000 + 5, channels)
    data = pcm16_bytes(audio)
    expected = np.frombuffer(data, "<i2").reshape(-1, channels) / 32768
    source = StdinSource(TrickleStream(data), rate=8000, channels=channels)
    samples, items = collect(source)
    np.testing.assert_array_equal(samples, expected.astype(np.float32))
    assert {item["sample_rate"] for item in items} == {8000}
    assert all(len(item["samples"]) == frames_per_chunk(8000) for item in items[:-1])


def test_stdin_raw_drops_a_cut_final_frame() -> None:
    data = pcm16_bytes(random_audio(100, 2))
    samples, _ = collect(StdinSource(io.BytesIO(data + b"\x01\x02\x03"), rate=16000, channels=2))
    assert samples.shape == (100, 2)


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [
        ("WAV", "PCM_16"),
        ("WAV", "PCM_U8"),
        ("WAV", "PCM_24"),
        ("WAV", "PCM_32"),
        ("WAV", "FLOAT"),
        ("WAV", "DOUBLE"),
        ("WAVEX", "PCM_16"),
        ("WAVEX", "FLOAT"),
    ],
)
def test_stdin_wav_matches_soundfile(fmt: str, subtype: str) -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, random_audio(11025 // 3, 2), 11025, format=fmt, subtype=subtype)
    data = buffer.getvalue()
    expected, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    source = StdinSource(TrickleStream(data, step=7), rate=16000)  # the header's rate wins
    samples, items = collect(source)
    np.testing.assert_allclose(samples, expected, rtol=0, atol=1e-7)
    assert {item["sample_rate"] for item in items} == {11025}


def wav_bytes(
    payload: bytes,
    *,
    channels: int,
    rate: int,
    data_size: int | None,
    extra: bytes = b"",
    format_tag: int = 1,
) -> bytes:
    """A 16-bit WAV by hand: an odd-sized LIST chunk before the data, then `extra` after it."""
    fmt = struct.pack("<HHIIHH", format_tag, channels, rate, rate * 2 * channels, 2 * channels, 16)
    info = b"INFO" + b"odd"
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"LIST" + struct.pack("<I", len(info)) + info + b"\x00"
    size = len(payload) if data_size is None else data_size
    chunks += b"data" + struct.pack("<I", size) + payload + extra
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def test_stdin_wav_stops_at_the_data_size_and_skips_other_chunks() -> None:
    audio = random_audio(1000, 1)
    trailer = b"LIST" + struct.pack("<I", 400) + bytes(range(256)) + bytes(144)
    data = wav_bytes(pcm16_bytes(audio), channels=1, rate=16000, data_size=None, extra=trailer)
    source = StdinSource(io.BytesIO(data))
    samples, _ = collect(source)
    np.testing.assert_array_equal(samples, (np.frombuffer(pcm16_bytes(audio), "<i2") / 32768)[:, None])
    assert source.warnings == []  # the chunk after the data claims every byte that follows


def test_stdin_wav_header_claiming_less_is_read_as_it_says_with_a_warning() -> None:
    payload = pcm16_bytes(random_audio(1000, 1))
    declared = 600 * 2  # bytes: 600 of the 1000 frames
    data = wav_bytes(payload, channels=1, rate=16000, data_size=declared)
    source = StdinSource(TrickleStream(data, step=5))
    samples, _ = collect(source)
    np.testing.assert_array_equal(samples, (np.frombuffer(payload[:declared], "<i2") / 32768)[:, None])
    assert source.warnings == [
        "stdin: 800 bytes after the audio the WAV header declares are not read "
        "(the header's data size is smaller than the input)"
    ]


@pytest.mark.parametrize("unknown_size", [0, 0xFFFFFFFF])
def test_stdin_streamed_wav_of_unknown_size_reads_to_the_end(unknown_size: int) -> None:
    payload = pcm16_bytes(random_audio(3000, 2))
    data = wav_bytes(payload, channels=2, rate=48000, data_size=unknown_size)
    source = StdinSource(io.BytesIO(data))
    samples, items = collect(source)
    assert samples.shape == (3000, 2) and items[0]["sample_rate"] == 48000
    assert source.warnings == []


def test_stdin_reads_incrementally_from_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    chunk = pcm16_bytes(random_audio(frames_per_chunk(16000), 1))
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb") as writer:
        writer.write(chunk * 2)
        writer.flush()
        chunks = StdinSource(reader, rate=16000).chunks()
        first: list[dict] = []
        # The writer is still open: a source that waited for the end of the input would block here.
        thread = threading.Thread(target=lambda: first.append(next(chunks)), daemon=True)
        thread.start()
        thread.join(timeout=5)
        assert first, "the first chunk did not come before the end of the input"
        writer.close()
        rest = list(chunks)
    total = len(first[0]["samples"]) + sum(len(item["samples"]) for item in rest)
    assert total == 2 * frames_per_chunk(16000)


def test_stdin_close_ends_chunks() -> None:
    source = StdinSource(io.BytesIO(pcm16_bytes(random_audio(16000, 1))), rate=16000)
    chunks = source.chunks()
    next(chunks)
    source.close()
    assert list(chunks) == []


@pytest.mark.parametrize(
    ("data", "rate", "message"),
    [
        (b"", 16000, "empty input"),
        (b"\x01\x00\x02\x00", None, "needs a sample rate"),
        (b"\x01", 16000, "no audio frames"),
        (b"RIFF\x00\x00\x00\x00AVI ", None, "not a WAV"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None, "ends before its data chunk"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt \x08\x00\x00\x00", None, "fmt chunk has 8 bytes"),
        (b"RIFF\x24\x00\x00\x00WAVELIST\xff\xff\xff\xf0" + b"\x00" * 100, None, "header ends early"),
        (wav_bytes(b"", channels=1, rate=16000, data_size=None), None, "no audio frames"),
        (wav_bytes(b"\x00" * 64, channels=1, rate=16000, data_size=None, format_tag=2), None, "unsupported"),
        (wav_bytes(b"\x00" * 64, channels=0, rate=16000, data_size=None), None, "channels 0 is outside 1..64"),
        (wav_bytes(b"\x00" * 64, channels=1, rate=1, data_size=None), None, "rate 1 is outside 8000..384000"),
        (b"\x01\x00\x02\x00", 1, "stdin: rate 1 is outside 8000..384000"),
    ],
)
def test_stdin_bad_input_is_a_stage_error(data: bytes, rate: int | None, message: str) -> None:
    with pytest.raises(StageError, match=message) as excinfo:
        list(StdinSource(io.BytesIO(data), rate=rate).chunks())
    assert single_line_error(excinfo).startswith("stdin: ")


def test_stdin_bad_settings() -> None:
    with pytest.raises(StageError, match="rate"):
        StdinSource(io.BytesIO(), rate=-1)
    with pytest.raises(StageError, match="channels"):
        StdinSource(io.BytesIO(), rate=16000, channels=0)


# --- MicSource, driven through a fake sounddevice module ---


class FakeInputStream:
    def __init__(self, fake: types.ModuleType, **kwargs):
        self.fake = fake
        self.kwargs = kwargs
        self.events: list[str] = []
        fake.streams.append(self)

    def start(self) -> None:
        if self.fake.start_error:
            raise self.fake.PortAudioError(self.fake.start_error)
        self.events.append("start")

    def stop(self) -> None:
        self.events.append("stop")

    def close(self) -> None:
        self.events.append("close")

    def deliver(self, block: np.ndarray, overflow: bool = False) -> None:
        """What PortAudio's thread does: call the callback with a block and the status flags."""
        self.kwargs["callback"](block, len(block), None, types.SimpleNamespace(input_overflow=overflow))


DEVICES = [
    {"name": "Speakers", "max_input_channels": 0, "default_samplerate": 48000.0},
    {"name": "USB Mic", "max_input_channels": 2, "default_samplerate": 44100.0},
    {"name": "Webcam", "max_input_channels": 1, "default_samplerate": 16000.0},
]


@pytest.fixture
def fake_sounddevice(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    fake = types.ModuleType("sounddevice")
    fake.streams = []
    fake.start_error = None
    fake.PortAudioError = type("PortAudioError", (Exception,), {})

    def query_devices(device=None, kind=None):
        if device is None and kind is None:
            return DEVICES
        if device is None:
            return DEVICES[1]
        matches = [d for i, d in enumerate(DEVICES) if device in (i, d["name"]) and d["max_input_channels"]]
        if not matches:
            raise ValueError(f"No input device matching {device!r}")
        return matches[0]

    def input_stream(**kwargs):
        return FakeInputStream(fake, **kwargs)

    fake.query_devices = query_devices
    fake.InputStream = input_stream
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    return fake


def test_mic_opens_the_device_with_chunk_blocks(fake_sounddevice: types.ModuleType) -> None:
    mic = MicSource("Webcam", channels=1, chunk_ms=40)
    (stream,) = fake_sounddevice.streams
    assert mic.live and mic.sample_rate == 16000
    assert stream.kwargs["samplerate"] == 16000 and stream.kwargs["dtype"] == "float32"
    assert stream.kwargs["blocksize"] == frames_per_chunk(16000, 40)
    assert MicSource(None, rate=22050, channels=2).sample_rate == 22050
    assert fake_sounddevice.streams[1].kwargs["channels"] == 2


def test_mic_yields_callback_block_copies_and_drains_after_close(
    fake_sounddevice: types.ModuleType,
) -> None:
    mic = MicSource(None)
    (stream,) = fake_sounddevice.streams
    chunks = mic.chunks()
    block = random_audio(frames_per_chunk(44100), 1)
    expected = block.copy()
    stream.deliver(block)
    block[:] = 0  # PortAudio reuses its buffer after the callback returns
    first = next(chunks)
    np.testing.assert_array_equal(first["samples"], expected)
    assert first["sample_rate"] == 44100 and stream.events == ["start"]
    stream.deliver(expected)
    mic.close()
    assert stream.events == ["start", "stop", "close"]
    assert len(list(chunks)) == 1  # what was queued before close still comes out, then chunks ends
    mic.close()
    assert stream.events == ["start", "stop", "close"]


def test_mic_callback_never_blocks_and_counts_overflows(fake_sounddevice: types.ModuleType) -> None:
    mic = MicSource(None, max_queued_chunks=4)
    (stream,) = fake_sounddevice.streams
    block = random_audio(100, 1)

    def deliver_many() -> None:
        for i in range(10):
            stream.deliver(block, overflow=i == 0)

    # Nobody reads: a callback that waited for room in the queue would never return.
    thread = threading.Thread(target=deliver_many, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "the audio callback blocked"
    assert mic.overflows == 1 + (10 - 4)  # one PortAudio overflow flag, six chunks dropped on a full queue
    mic.close()
    assert len(list(mic.chunks())) == 4


def test_mic_says_how_much_audio_its_full_queue_dropped_before_each_chunk(
    fake_sounddevice: types.ModuleType,
) -> None:
    mic = MicSource(None, rate=16000, max_queued_chunks=2)
    (stream,) = fake_sounddevice.streams
    blocks = [np.full((frames_per_chunk(16000), 1), i, np.float32) for i in range(7)]
    chunks = mic.chunks()
    for block in blocks[:5]:  # nobody reads: 0 and 1 are queued, 2..4 dropped
        stream.deliver(block)
    assert [next(chunks)["samples"][0, 0] for _ in range(2)] == [0, 1]
    assert mic.dropped_before_s == 0
    stream.deliver(blocks[5], overflow=True)  # PortAudio lost audio too, but does not say how much
    stream.deliver(blocks[6])
    assert next(chunks)["samples"][0, 0] == 5
    assert mic.dropped_before_s == pytest.approx(3 * 0.08)  # blocks 2..4 were dropped just before block 5
    assert next(chunks)["samples"][0, 0] == 6
    assert mic.dropped_before_s == 0
    assert mic.overflows == 3 + 1
    mic.close()


def test_mic_ends_when_portaudio_finishes_the_stream(fake_sounddevice: types.ModuleType) -> None:
    mic = MicSource(None)
    (stream,) = fake_sounddevice.streams
    stream.kwargs["finished_callback"]()  # the device went away
    assert list(mic.chunks()) == []


def test_mic_device_errors(fake_sounddevice: types.ModuleType) -> None:
    with pytest.raises(StageError, match="microphone nothing: No input device matching 'nothing'"):
        MicSource("nothing")
    with pytest.raises(StageError, match="microphone Speakers"):
        MicSource("Speakers")  # an output-only device
    fake_sounddevice.start_error = "Device unavailable [PaErrorCode -9985]"
    with pytest.raises(StageError, match=r"microphone Webcam: cannot start \(Device unavailable"):
        next(MicSource(2).chunks())


def test_list_input_devices(fake_sounddevice: types.ModuleType) -> None:
    assert list_input_devices() == [
        {"index": 1, "name": "USB Mic", "channels": 2, "default_rate": 44100},
        {"index": 2, "name": "Webcam", "channels": 1, "default_rate": 16000},
    ]


class MissingPortAudio(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `sounddevice` the way it fails where the PortAudio library is missing."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "sounddevice" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("PortAudio library not found")


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (
            "no portaudio",
            r"needs the PortAudio library \(PortAudio library not found\): install it with .*libportaudio2",
        ),
        ("not installed", r"needs the sounddevice package .*: pip install sounddevice"),
    ],
)
def test_mic_without_portaudio_is_a_stage_error(monkeypatch: pytest.MonkeyPatch, failure: str, message: str) -> None:
    if failure == "no portaudio":
        monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
        monkeypatch.setattr(sys, "meta_path", [MissingPortAudio(), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "sounddevice", None)
    for action in (MicSource, list_input_devices):
        with pytest.raises(StageError, match=message) as excinfo:
            action()
        single_line_error(excinfo)


# --- several files, each its own stream ---


def write_files(folder: Path, seconds: list[float], rate: int = 16000) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for index, length in enumerate(seconds):
        path = folder / f"{index}.wav"
        soundfile.write(path, random_audio(int(length * rate), 1, seed=index), rate)
        paths.append(str(path))
    return paths


def per_stream(events: list) -> dict[int, list]:
    streams: dict[int, list] = {}
    for index, item in events:
        streams.setdefault(index, []).append(item)
    return streams


def test_file_streams_interleave_each_file_whole_and_in_order(tmp_path: Path) -> None:
    paths = write_files(tmp_path, [0.3, 0.5, 0.08])  # the last one chunk long
    events = list(FileStreams(paths).events())
    streams = per_stream(events)
    for index, path in enumerate(paths):
        items = streams[index]
        assert items[0] == StreamStart() and items[-1] == END
        expected = [chunk["samples"] for chunk in FileSource(path).chunks()]
        assert len(items[1:-1]) == len(expected)
        for chunk, samples in zip(items[1:-1], expected, strict=True):
            np.testing.assert_array_equal(chunk["samples"], samples)
    # In turn: the first chunks of every file come before any file's second.
    chunk_streams = [index for index, item in events if isinstance(item, dict)]
    assert chunk_streams[:6] == [0, 1, 2, 0, 1, 0]


def test_file_streams_open_at_most_max_open_files(tmp_path: Path) -> None:
    paths = write_files(tmp_path, [0.2, 0.2, 0.2])
    events = list(FileStreams(paths, max_open=1).events())
    assert [index for index, _ in events] == sorted(index for index, _ in events)  # one file after the other
    open_now, most = set(), 0
    for index, item in events:
        open_now.add(index)
        if item == END:
            open_now.discard(index)
        most = max(most, len(open_now))
    assert most == 1


def test_file_streams_pace_each_file_on_its_own(tmp_path: Path) -> None:
    paths = write_files(tmp_path, [0.4, 0.4, 0.24])
    started = time.monotonic()
    arrivals = [(index, time.monotonic() - started) for index, item in FileStreams(paths, realtime=True).events()]
    elapsed = time.monotonic() - started
    assert 0.38 < elapsed < 0.6  # concurrently: as long as the longest file, not the three one after the other
    for index, seconds in ((0, 0.4), (2, 0.24)):
        last_chunk_at = [at for stream, at in arrivals if stream == index][-2]  # before its END
        assert seconds - 0.01 < last_chunk_at < seconds + 0.1


def test_staggered_file_streams_start_apart_and_each_is_paced_from_its_own_start(tmp_path: Path) -> None:
    paths = write_files(tmp_path, [0.24, 0.24, 0.24])
    started = time.monotonic()
    arrivals = [
        (index, item, time.monotonic() - started)
        for index, item in FileStreams(paths, realtime=True, stagger_s=0.2).events()
    ]
    starts = [at for _, item, at in arrivals if item == StreamStart()]
    assert [round(at, 1) for at in starts] == [0.0, 0.2, 0.4]
    for index, start in enumerate(starts):
        chunk_times = [at for stream, item, at in arrivals if stream == index and isinstance(item, dict)]
        assert len(chunk_times) == 3 and start + 0.23 < chunk_times[-1] < start + 0.3


def test_stagger_needs_several_files_in_real_time(tmp_path: Path) -> None:
    paths = write_files(tmp_path, [0.08, 0.08])
    with pytest.raises(StageError, match="stagger_s starts files apart in real time: give several files and"):
        build_source({"input": paths, "stagger_s": 0.3})
    with pytest.raises(StageError, match=r"stagger_s: -1 is not a number of seconds in 0..3600"):
        build_source({"input": paths, "realtime": True, "stagger_s": -1})


def test_a_file_that_cannot_be_read_fails_its_stream_only(tmp_path: Path) -> None:
    paths = write_files(tmp_path, [0.2, 0.2])
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    streams = per_stream(list(FileStreams([paths[0], str(broken), paths[1]]).events()))
    assert streams[1][0] == StreamStart() and len(streams[1]) == 2
    assert isinstance(streams[1][1], StreamFailed) and "broken.wav: not a readable audio file" in streams[1][1].message
    assert streams[0][-1] == END and streams[2][-1] == END


def test_closing_file_streams_ends_them_at_once(tmp_path: Path) -> None:
    paths = write_files(tmp_path, [5.0, 5.0])
    streams = FileStreams(paths, realtime=True)
    threading.Timer(0.2, streams.close).start()
    started = time.monotonic()
    events = list(streams.events())
    assert time.monotonic() - started < 1.0
    assert END not in [item for _, item in events]


def test_inputs_expand_directories_to_their_audio_files_sorted(tmp_path: Path) -> None:
    folder = tmp_path / "calls"
    write_files(folder, [0.1, 0.1])
    (folder / "notes.txt").write_text("not audio")
    (folder / "b.FLAC").write_bytes(b"")
    assert expand_inputs(str(folder)) == [str(folder / name) for name in ("0.wav", "1.wav", "b.FLAC")]
    assert expand_inputs(["x.wav", str(folder)])[:2] == ["x.wav", str(folder / "0.wav")]
    assert expand_inputs("talk.wav") == "talk.wav"
    empty = tmp_path / "empty"
    empty.mkdir()
    for value, message in [
        (str(empty), "empty: no audio files in the directory"),
        (["a.wav", "-"], "input '-' is one stream of its own"),
        (["a.wav", "mic"], "input 'mic' is one stream of its own"),
        ([], "give a file, a directory or a list of files"),
    ]:
        with pytest.raises(StageError, match=message) as excinfo:
            expand_inputs(value)
        single_line_error(excinfo)


def test_several_inputs_build_file_streams_and_are_checked(tmp_path: Path) -> None:
    paths = write_files(tmp_path / "in", [0.1, 0.2])
    assert [source.duration_s for source in inspect_capture({"input": paths})] == [0.1, 0.2]
    streams = build_source({"input": str(tmp_path / "in"), "streams": 1})
    assert isinstance(streams, FileStreams) and streams.labels == paths
    for bad in (0, MAX_STREAMS + 1, True, "2"):
        with pytest.raises(StageError, match=rf"--streams: .* is not a number of streams in 1\.\.{MAX_STREAMS}"):
            build_source({"input": paths, "streams": bad})


def test_file_streams_raise_the_open_file_limit_or_say_it_is_too_low(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resource

    paths = write_files(tmp_path, [0.1, 0.1])
    limits = {"soft": 10, "hard": 1000}
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (limits["soft"], limits["hard"]))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, value: limits.update(soft=value[0]))
    FileStreams(paths)
    assert limits["soft"] == 2 + FILE_DESCRIPTOR_MARGIN
    limits.update(soft=10, hard=100)
    with pytest.raises(
        StageError,
        match=rf"--streams: 2 files open at once need {2 + FILE_DESCRIPTOR_MARGIN} file descriptors and this system "
        r"allows 100 \(ulimit -n\); give fewer streams",
    ) as excinfo:
        FileStreams(paths)
    single_line_error(excinfo)
