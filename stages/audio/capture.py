"""Capture sources: audio files, stdin (raw s16le or WAV) and microphones, yielding chunks at source rate; and
several audio files read at once, each its own stream."""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import numpy as np
import soundfile

from voxtral_run.stages.audio.constants import MIN_SOURCE_RATE, MS_PER_TOKEN, check_source_format
from voxtral_run.stages.base import END, Item, Source, StageError, StreamFailed, StreamStart, Work

DEFAULT_CHUNK_MS = MS_PER_TOKEN  # one decoder position of audio per chunk
MIN_CHUNK_MS, MAX_CHUNK_MS = 10, 1000  # shorter chunks are all overhead; longer ones delay every token
# Settings of the capture stage (pipeline.yaml params or the command line's --input, --rate, ...).
CAPTURE_PARAMS = ("input", "rate", "channels", "realtime", "chunk_ms", "mic_device", "streams", "stagger_s")
STDIN_INPUT = "-"
MIC_INPUT = "mic"
MAX_STREAMS = 1024  # files a capture reads at once (--streams), each an open file and a stream in every stage
MAX_STAGGER_S = 3600.0  # seconds between the starts of files paced in real time (callers joining one by one)
# What a directory given as input contributes: its files with these suffixes (soundfile's, and PyAV's usual).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".mp4", ".webm", ".aiff", ".aif")
FILE_DESCRIPTOR_MARGIN = 256  # descriptors a capture process needs besides its audio files (sockets, libraries)
DEFAULT_MIC_QUEUE_CHUNKS = 64  # ~5 s of 80 ms chunks buffered between the audio callback and the reader
MIC_POLL_S = 0.05  # how often a reader waiting on an empty microphone queue checks whether it was closed

_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_IEEE_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# Writers that stream a WAV into a pipe (arecord, ffmpeg) cannot know the data size and write one of these.
_UNKNOWN_WAV_DATA_SIZES = (0, 0xFFFFFFFF)
MAX_FMT_CHUNK_BYTES = 40  # WAVE_FORMAT_EXTENSIBLE's, the largest fmt chunk
SKIP_BLOCK_BYTES = 1 << 16
_DISCARD_BLOCK_BYTES = 1 << 16  # stdin after a WAV's data is read this much at a time, and not kept


def _one_line(err: BaseException | str) -> str:
    """An error message folded onto one line."""
    return " ".join(str(err).split())


def check_chunk_ms(chunk_ms: object) -> None:
    """A one-line StageError unless `chunk_ms` is a number of milliseconds within MIN_CHUNK_MS..MAX_CHUNK_MS."""
    if isinstance(chunk_ms, bool) or not isinstance(chunk_ms, (int, float)):
        raise StageError(f"{chunk_ms!r} is not a number of milliseconds")
    if not MIN_CHUNK_MS <= chunk_ms <= MAX_CHUNK_MS:
        raise StageError(f"{chunk_ms:g} is outside {MIN_CHUNK_MS}..{MAX_CHUNK_MS} ms")


def frames_per_chunk(sample_rate: int, chunk_ms: float = DEFAULT_CHUNK_MS) -> int:
    """Source frames in one chunk of `chunk_ms` at `sample_rate` (at least one)."""
    return max(1, round(sample_rate * chunk_ms / 1000))


def _chunk(samples: np.ndarray, sample_rate: int) -> Item:
    return {"samples": samples, "sample_rate": sample_rate}


class _SoundfileReader:
    """A file soundfile opens (WAV, FLAC, OGG, MP3, ...), read as float32 [n, channels]."""

    def __init__(self, path: Path):
        self._path = path
        self._file = soundfile.SoundFile(path)  # RuntimeError (LibsndfileError) when it cannot
        if self._file.frames == 0:
            self._file.close()
            raise StageError(f"{path}: the file holds no audio frames")
        self.sample_rate: int = self._file.samplerate
        self.channels: int = self._file.channels
        self.duration_s: float | None = self._file.frames / self._file.samplerate

    def read(self, frames: int) -> np.ndarray:
        """Up to `frames` frames; none at the end of the file."""
        try:
            return self._file.read(frames, dtype="float32", always_2d=True)
        except RuntimeError as err:
            raise StageError(f"{self._path}: cannot read audio ({_one_line(err)})") from None

    def close(self) -> None:
        """Release the file (again is harmless)."""
        self._file.close()


def _av_reason(err: Exception) -> str:
    """An FFmpeg error's message without the file name PyAV appends (the StageError names the file)."""
    return _one_line(getattr(err, "strerror", None) or err)


class _AvReader:
    """The first audio stream of a file PyAV opens (M4A/AAC, MP4, WebM/Opus, ...), decoded frame by frame as
    it is read, as float32 [n, channels] at the stream's own rate."""

    def __init__(self, av: ModuleType, path: Path):
        self._path = path
        self._errors = (av.error.FFmpegError, ValueError)  # ValueError: a frame the resampler cannot take
        self._container = av.open(str(path))  # av.error.FFmpegError when it cannot
        try:
            if not self._container.streams.audio:
                raise StageError(f"{path}: the file holds no audio stream")
            self._frames = self._converted(av, self._container.streams.audio[0])
            first = self._next_frame()
            if first is None:
                raise StageError(f"{path}: the file holds no audio frames")
        except BaseException:
            self._container.close()
            raise
        self.sample_rate: int = first.sample_rate
        self.channels: int = len(first.layout.channels)
        container_duration = self._container.duration  # microseconds, when the container says
        self.duration_s: float | None = container_duration / 1e6 if container_duration else None
        self._pending = [self._samples(first)]  # decoded samples not yet read
        self._pending_frames = len(self._pending[0])

    def _converted(self, av: ModuleType, stream: Any) -> Iterator[Any]:
        # Only the sample format changes, to packed float32; rate and layout stay the stream's (the pipeline's
        # resample stage converts rates).
        resampler = av.AudioResampler(format="flt")
        for frame in self._container.decode(stream):
            yield from resampler.resample(frame)
        yield from resampler.resample(None)

    def _next_frame(self) -> Any:
        """The next non-empty converted frame, or None at the end of the stream."""
        try:
            return next((frame for frame in self._frames if frame.samples), None)
        except self._errors as err:
            raise StageError(f"{self._path}: cannot read audio ({_av_reason(err)})") from None

    def _samples(self, frame: Any) -> np.ndarray:
        return frame.to_ndarray().reshape(-1, self.channels)  # packed: interleaved channels

    def read(self, frames: int) -> np.ndarray:
        """Up to `frames` frames, decoding only as much as that needs; none at the end of the stream."""
        while self._pending_frames < frames:
            frame = self._next_frame()
            if frame is None:
                break
            self._pending.append(self._samples(frame))
            self._pending_frames += frame.samples
        if not self._pending:
            return np.zeros((0, self.channels), np.float32)
        samples = np.concatenate(self._pending)
        rest = samples[frames:]
        self._pending, self._pending_frames = ([rest] if len(rest) else []), len(rest)
        return samples[:frames]

    def close(self) -> None:
        """Release the file (again is harmless)."""
        self._frames.close()
        self._container.close()


def _is_chunk_id(chunk_id: bytes) -> bool:
    """Whether four bytes can be a RIFF chunk id (printable ASCII); anything else is not a chunk."""
    return all(32 <= byte < 127 for byte in chunk_id)


def _unread_wav_warning(name: str, unclaimed: int, holder: str) -> str:
    """The one-line warning for a WAV (file or stdin) whose header declares less than `holder` holds."""
    return (
        f"{name}: {unclaimed} bytes after the audio the WAV header declares are not read "
        f"(the header's data size is smaller than the {holder})"
    )


def _wav_unclaimed_bytes(path: Path) -> int:
    """Bytes of a RIFF/WAVE file that no chunk of its header claims (0 for other files): audio written past the
    size its header gives, or garbage. Readers follow the header; the caller says what was left out."""
    with open(path, "rb") as file:
        riff = file.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
            return 0
        size = path.stat().st_size
        position = 12
        while position + 8 <= size:
            file.seek(position)
            chunk_id, chunk_size = struct.unpack("<4sI", file.read(8))
            if not _is_chunk_id(chunk_id):  # not a chunk: what follows is unclaimed
                break
            if chunk_id == b"data" and chunk_size in _UNKNOWN_WAV_DATA_SIZES:
                return 0  # a streamed WAV: the data runs to the end
            position += 8 + chunk_size + chunk_size % 2
        return max(0, size - position)


def _open_audio_file(path: Path) -> _SoundfileReader | _AvReader:
    """soundfile's reader for what it opens, else PyAV's (imported only then, as an optional extra)."""
    try:
        return _SoundfileReader(path)
    except RuntimeError as err:  # soundfile.LibsndfileError: format not recognised, truncated header, ...
        soundfile_reason = _one_line(getattr(err, "error_string", err))
    try:
        import av
    except ImportError:
        raise StageError(
            f"{path}: not a readable audio file ({soundfile_reason}); soundfile reads WAV, FLAC, OGG and MP3, "
            "and M4A/AAC, MP4 or WebM/Opus need PyAV: pip install 'voxtral-run[av]'"
        ) from None
    try:
        return _AvReader(av, path)
    except av.error.FFmpegError as err:
        raise StageError(
            f"{path}: not a readable audio file (soundfile: {soundfile_reason}; PyAV: {_av_reason(err)})"
        ) from None


class FileSource(Source):
    """Reads an audio file in chunks, optionally paced in real time: what soundfile opens (WAV, FLAC, OGG,
    MP3), or with PyAV installed what FFmpeg decodes (M4A/AAC, MP4, WebM/Opus)."""

    def __init__(self, path: str | Path, *, chunk_ms: float = DEFAULT_CHUNK_MS, realtime: bool = False):
        check_chunk_ms(chunk_ms)
        self.path = Path(path)
        if not self.path.exists():
            raise StageError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise StageError(f"{self.path}: not a file")
        self._file = _open_audio_file(self.path)
        self.sample_rate: int = self._file.sample_rate
        self.channels: int = self._file.channels
        try:
            check_source_format(self.sample_rate, self.channels, str(self.path))
        except StageError:
            self._file.close()
            raise
        self.duration_s: float | None = self._file.duration_s  # None: the container does not say
        unclaimed = _wav_unclaimed_bytes(self.path)
        # One-line notes for the user (the runner prints them): what was read differs from what the file holds.
        self.warnings: list[str] = []
        if unclaimed:
            self.warnings.append(_unread_wav_warning(str(self.path), unclaimed, "file"))
        self._chunk_frames = frames_per_chunk(self.sample_rate, chunk_ms)
        self._realtime = realtime
        self._closed = threading.Event()
        self._lock = threading.Lock()  # close() may come from another thread while chunks() reads

    def chunks(self) -> Iterator[Item]:
        """Yield chunks until the end of the file; in real-time mode each chunk is yielded when its last
        sample would have been captured live, counting from the first read."""
        start = time.monotonic()
        position = 0
        while True:
            with self._lock:
                if self._closed.is_set():
                    return
                samples = self._file.read(self._chunk_frames)
            if len(samples) == 0:
                self.close()
                return
            position += len(samples)
            if self._realtime and self._closed.wait(start + position / self.sample_rate - time.monotonic()):
                return
            yield _chunk(samples, self.sample_rate)

    @property
    def paced(self) -> bool:
        return self._realtime

    def close(self) -> None:
        """Release the file; `chunks` ends at its next step (at once if it is waiting to pace a chunk)."""
        with self._lock:
            self._closed.set()
            self._file.close()


@dataclass(frozen=True)
class _PcmFormat:
    """How interleaved sample bytes decode: WAVE format tag, bits per sample, rate, channels."""

    format_tag: int
    bits: int
    sample_rate: int
    channels: int

    @property
    def bytes_per_frame(self) -> int:
        return self.bits // 8 * self.channels

    def check(self) -> None:
        integer = self.format_tag == _WAVE_FORMAT_PCM and self.bits in (8, 16, 24, 32)
        floating = self.format_tag == _WAVE_FORMAT_IEEE_FLOAT and self.bits in (32, 64)
        if not (integer or floating):
            raise StageError(
                f"stdin: unsupported WAV sample format (format tag {self.format_tag}, {self.bits} bits); "
                "use integer PCM of 8/16/24/32 bits or float of 32/64 bits"
            )
        check_source_format(self.sample_rate, self.channels, "stdin: WAV header")

    def decode(self, data: bytes) -> np.ndarray:
        """Whole frames of `data` as float32 [n, channels] in [-1, 1]."""
        raw = np.frombuffer(data, dtype=np.uint8)
        if self.format_tag == _WAVE_FORMAT_IEEE_FLOAT:
            flat = raw.view(f"<f{self.bits // 8}").astype(np.float32)
        elif self.bits == 8:  # 8-bit WAV is unsigned with its midpoint at 128
            flat = (raw.astype(np.float32) - 128) / 128
        else:
            width = self.bits // 8
            # Place each little-endian sample in the high bytes of an int32, which also extends its sign.
            padded = np.zeros((len(raw) // width, 4), dtype=np.uint8)
            padded[:, 4 - width :] = raw.reshape(-1, width)
            flat = (padded.view("<i4")[:, 0] / 2.0**31).astype(np.float32)
        return flat.reshape(-1, self.channels)


class StdinSource(Source):
    """Reads raw s16le PCM (needs `rate`) or a WAV (rate and channels from its header) from a binary stream,
    incrementally, so it can follow a live pipe. A WAV is read as its header says; what follows its declared data
    is read to the end of the input and, where no chunk claims it, told in `warnings` once `chunks` ends."""

    def __init__(
        self,
        stream: BinaryIO,
        *,
        rate: int | None = None,
        channels: int = 1,
        chunk_ms: float = DEFAULT_CHUNK_MS,
    ):
        check_source_format(MIN_SOURCE_RATE if rate is None else rate, channels, "stdin")
        check_chunk_ms(chunk_ms)
        self._stream = stream
        self._rate = rate
        self._channels = channels
        self._chunk_ms = chunk_ms
        self._closed = threading.Event()
        # One-line notes for the user (the capture stage passes them to the runner): what was read differs from
        # what the input holds.
        self.warnings: list[str] = []

    def _read(self, size: int) -> bytes:
        """Up to `size` bytes, fewer only at the end of the input (pipes return short reads)."""
        parts = []
        while size > 0:
            part = self._stream.read(size)
            if not part:
                break
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    def _discard(self, size: int | None) -> int:
        """Read and drop up to `size` bytes (all that is left for None), a block at a time, until the input ends
        or `close` is called; how many were dropped."""
        dropped = 0
        while (size is None or dropped < size) and not self._closed.is_set():
            want = _DISCARD_BLOCK_BYTES if size is None else min(_DISCARD_BLOCK_BYTES, size - dropped)
            part = self._stream.read(want)
            if not part:
                break
            dropped += len(part)
        return dropped

    def _unclaimed_after_data(self, data_size: int) -> int:
        """Bytes after a WAV's declared data that no chunk claims, as FileSource counts them in a file: the input
        is read to its end; a chunk cut short by the end claims the rest."""
        skip = data_size % 2  # the data chunk's pad byte
        while True:
            if self._discard(skip) < skip:
                return 0
            header = self._read(8)
            if len(header) < 8 or not _is_chunk_id(header[:4]):
                return len(header) + self._discard(None)
            (size,) = struct.unpack("<I", header[4:])
            skip = size + size % 2

    def _skip(self, size: int) -> None:
        """Read past `size` bytes of a chunk the capture does not use, a block at a time: a header may claim
        gigabytes."""
        while size > 0:
            block = self._read(min(size, SKIP_BLOCK_BYTES))
            if not block:
                raise StageError("stdin: the WAV header ends early")
            size -= len(block)

    def _read_wav_header(self) -> tuple[_PcmFormat, int | None]:
        """Parse the RIFF header after its 4-byte magic up to the data chunk; return the format and the data
        size (None when the writer could not know it)."""
        riff = self._read(8)
        if len(riff) < 8 or riff[4:] != b"WAVE":
            raise StageError("stdin: starts with RIFF but is not a WAV")
        pcm_format = None
        while True:
            chunk_header = self._read(8)
            if len(chunk_header) < 8:
                raise StageError("stdin: the WAV ends before its data chunk")
            chunk_id, size = struct.unpack("<4sI", chunk_header)
            if chunk_id == b"data":
                if pcm_format is None:
                    raise StageError("stdin: the WAV has no fmt chunk before its data")
                return pcm_format, None if size in _UNKNOWN_WAV_DATA_SIZES else size
            if chunk_id != b"fmt ":
                self._skip(size + size % 2)  # RIFF chunks are padded to an even size
                continue
            if not 16 <= size <= MAX_FMT_CHUNK_BYTES:
                raise StageError(f"stdin: the WAV fmt chunk has {size} bytes (expected 16..{MAX_FMT_CHUNK_BYTES})")
            body = self._read(size + size % 2)
            if len(body) < size:
                raise StageError("stdin: the WAV header ends early")
            format_tag, channels, sample_rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if format_tag == _WAVE_FORMAT_EXTENSIBLE and size >= 26:
                (format_tag,) = struct.unpack("<H", body[24:26])  # first field of the SubFormat GUID
            pcm_format = _PcmFormat(format_tag, bits, sample_rate, channels)
            pcm_format.check()

    def chunks(self) -> Iterator[Item]:
        """Yield chunks as the input arrives, until it ends or `close` is called (a read already blocked
        on the input finishes first)."""
        prefix = self._read(4)
        if not prefix:
            raise StageError("stdin: empty input, no audio")
        if prefix == b"RIFF":
            pcm_format, remaining = self._read_wav_header()
            declared = remaining
            prefix = b""
        elif self._rate is None:
            raise StageError("stdin: raw s16le input needs a sample rate (or send a WAV)")
        else:
            pcm_format, remaining = _PcmFormat(_WAVE_FORMAT_PCM, 16, self._rate, self._channels), None
            declared = None
        chunk_bytes = frames_per_chunk(pcm_format.sample_rate, self._chunk_ms) * pcm_format.bytes_per_frame
        total_frames = 0
        while not self._closed.is_set():
            size = chunk_bytes - len(prefix) if remaining is None else min(chunk_bytes, remaining)
            data = prefix + self._read(size)
            prefix = b""
            if remaining is not None:
                remaining -= len(data)
            whole = len(data) - len(data) % pcm_format.bytes_per_frame  # a cut final frame is dropped
            if whole == 0:
                break
            total_frames += whole // pcm_format.bytes_per_frame
            yield _chunk(pcm_format.decode(data[:whole]), pcm_format.sample_rate)
        if total_frames == 0 and not self._closed.is_set():
            raise StageError("stdin: the input holds no audio frames")
        if remaining == 0 and not self._closed.is_set():  # the declared data was all there: what follows it?
            unclaimed = self._unclaimed_after_data(declared)
            if unclaimed:
                self.warnings.append(_unread_wav_warning("stdin", unclaimed, "input"))

    def close(self) -> None:
        """Stop after the current read; the stream itself belongs to the caller."""
        self._closed.set()


def _import_sounddevice() -> ModuleType:
    """sounddevice, imported only when a microphone is used, since it needs the PortAudio library."""
    try:
        import sounddevice
    except OSError as err:  # sounddevice loads the PortAudio C library as it is imported
        raise StageError(
            f"the microphone needs the PortAudio library ({_one_line(err)}): install it with your system's package "
            "manager (Debian/Ubuntu: sudo apt-get install libportaudio2; Fedora: sudo dnf install portaudio; "
            "macOS: brew install portaudio)"
        ) from None
    except ImportError as err:
        raise StageError(
            f"the microphone needs the sounddevice package ({_one_line(err)}): pip install sounddevice"
        ) from None
    return sounddevice


def list_input_devices() -> list[dict]:
    """Input devices PortAudio sees: index, name, channels (maximum) and default rate."""
    sounddevice = _import_sounddevice()
    try:
        devices = sounddevice.query_devices()
    except sounddevice.PortAudioError as err:
        raise StageError(f"cannot list audio devices ({_one_line(err)})") from None
    return [
        {
            "index": index,
            "name": device["name"],
            "channels": device["max_input_channels"],
            "default_rate": round(device["default_samplerate"]),
        }
        for index, device in enumerate(devices)
        if device["max_input_channels"] > 0
    ]


class MicSource(Source):
    """Captures a microphone through sounddevice; the audio callback never blocks and drops (counting them)
    the chunks the reader does not take in time. After each chunk `dropped_before_s` says how much audio the
    queue dropped just before it, so the text after a drop keeps the audio's real times."""

    live = True

    def __init__(
        self,
        device: int | str | None = None,
        *,
        rate: int | None = None,
        channels: int = 1,
        chunk_ms: float = DEFAULT_CHUNK_MS,
        max_queued_chunks: int = DEFAULT_MIC_QUEUE_CHUNKS,
    ):
        check_chunk_ms(chunk_ms)
        sounddevice = _import_sounddevice()
        self._port_audio_error = sounddevice.PortAudioError
        # Blocks with the frames the full queue dropped just before each (so a drop is placed where it happened).
        self._queue: queue.Queue[tuple[np.ndarray, int]] = queue.Queue(maxsize=max_queued_chunks)
        self._overflows = 0
        self._dropped_frames = 0  # the audio thread's: frames dropped since the last block it queued
        self.dropped_before_s = 0.0  # seconds of audio dropped just before the chunk `chunks` yielded last
        self._ended = threading.Event()  # set by close() or when PortAudio stops the stream
        self._stream_open = True
        try:
            info = sounddevice.query_devices(device, "input")
            self.sample_rate: int = rate or round(info["default_samplerate"])
            check_source_format(self.sample_rate, channels, "microphone")
            self._stream = sounddevice.InputStream(
                device=device,
                samplerate=self.sample_rate,
                channels=channels,
                dtype="float32",
                blocksize=frames_per_chunk(self.sample_rate, chunk_ms),
                callback=self._on_audio,
                finished_callback=self._ended.set,  # PortAudio stopped the stream (device gone)
            )
        except (ValueError, sounddevice.PortAudioError) as err:
            name = "(default)" if device is None else device
            raise StageError(f"microphone {name}: {_one_line(err)}") from None
        self._device_name = info["name"]

    @property
    def overflows(self) -> int:
        """Chunks lost so far: PortAudio input overflows plus chunks dropped because the queue was full. Only the
        latter move later times (`dropped_before_s`): PortAudio does not say how much an overflow lost."""
        return self._overflows

    def _on_audio(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # Runs on PortAudio's thread: copy and hand over without ever waiting.
        if status.input_overflow:
            self._overflows += 1
        try:
            self._queue.put_nowait((indata.copy(), self._dropped_frames))
            self._dropped_frames = 0
        except queue.Full:
            self._overflows += 1
            self._dropped_frames += frames

    def chunks(self) -> Iterator[Item]:
        """Start the microphone and yield its chunks; after `close`, yield what was already queued and end."""
        if not self._ended.is_set():
            try:
                self._stream.start()
            except self._port_audio_error as err:
                raise StageError(f"microphone {self._device_name}: cannot start ({_one_line(err)})") from None
        while True:
            try:
                samples, dropped_frames = self._queue.get(timeout=MIC_POLL_S)
            except queue.Empty:
                if self._ended.is_set():
                    return
                continue
            self.dropped_before_s = dropped_frames / self.sample_rate
            yield _chunk(samples, self.sample_rate)

    def close(self) -> None:
        """Stop and close the microphone stream (once; later calls do nothing)."""
        self._ended.set()
        if self._stream_open:
            self._stream_open = False
            self._stream.stop()
            self._stream.close()


def expand_inputs(value: object) -> str | list[str]:
    """The input of a capture as it reads it: one input (a file, `-`, `mic`) as given, or a list of files, each
    its own stream, for a list or a directory (whose audio files, by their suffix, come sorted by name)."""
    if isinstance(value, str) and not Path(value).is_dir():
        return value
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(entry, str) for entry in entries):
        raise StageError(f"input: give a file, a directory or a list of files, not {value!r:.80}")
    files: list[str] = []
    for entry in entries:
        if entry in (STDIN_INPUT, MIC_INPUT):
            raise StageError(f"input '{entry}' is one stream of its own: several inputs must be files or directories")
        if not Path(entry).is_dir():
            files.append(entry)
            continue
        found = sorted(str(path) for path in Path(entry).iterdir() if path.suffix.lower() in AUDIO_SUFFIXES)
        if not found:
            raise StageError(f"{entry}: no audio files in the directory (looked for {', '.join(AUDIO_SUFFIXES)})")
        files.extend(found)
    return files


def _checked_params(params: dict[str, Any]) -> tuple[str | list[str], dict[str, Any]]:
    """The input (a list for several files) and the settings of a capture, checked: known settings, an input,
    --realtime only for files, the raw format's bounds, the number of streams open at once."""
    unknown = sorted(set(params) - set(CAPTURE_PARAMS))
    if unknown:
        raise StageError(f"stage 'capture': unknown setting '{unknown[0]}' (choose from {', '.join(CAPTURE_PARAMS)})")
    if params.get("input") is None:
        raise StageError("no audio input: give an audio file, --input FILE, --input - (stdin) or --input mic")
    source_input = expand_inputs(params["input"] if isinstance(params["input"], list) else str(params["input"]))
    if params.get("realtime") and source_input in (STDIN_INPUT, MIC_INPUT):
        raise StageError("--realtime paces audio files; stdin and microphones already arrive in real time")
    for option, value in (("--rate", params.get("rate")), ("--channels", params.get("channels"))):
        if value is not None:
            rate, channels = (value, 1) if option == "--rate" else (MIN_SOURCE_RATE, value)
            check_source_format(rate, channels, option)
    streams = params.get("streams", MAX_STREAMS)
    if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= MAX_STREAMS:
        raise StageError(f"--streams: {streams!r:.80} is not a number of streams in 1..{MAX_STREAMS}")
    stagger = params.get("stagger_s", 0.0)
    if isinstance(stagger, bool) or not isinstance(stagger, (int, float)) or not 0 <= stagger <= MAX_STAGGER_S:
        raise StageError(f"stagger_s: {stagger!r:.80} is not a number of seconds in 0..{MAX_STAGGER_S:g}")
    if stagger and not (params.get("realtime") and isinstance(source_input, list)):
        raise StageError("stagger_s starts files apart in real time: give several files and --realtime")
    return source_input, params


def inspect_capture(params: dict[str, Any]) -> list[FileSource]:
    """Check a capture's settings before any process starts, opening each input file (and closing it again) to
    know it is audio; those files' sources (for their durations and warnings), none for stdin or a microphone."""
    source_input, params = _checked_params(params)
    if source_input in (STDIN_INPUT, MIC_INPUT):
        return []
    sources = []
    for path in source_input if isinstance(source_input, list) else [source_input]:
        source = FileSource(path)
        source.close()
        sources.append(source)
    return sources


def build_source(params: dict[str, Any]) -> Source | FileStreams:
    """The capture source for `params`: a file (paced in real time with `realtime`), stdin or a microphone; or,
    for a list of files or a directory, the files read at once, each its own stream."""
    source_input, params = _checked_params(params)
    chunk_ms = params.get("chunk_ms", DEFAULT_CHUNK_MS)
    channels = params.get("channels", 1)
    realtime = bool(params.get("realtime", False))
    if isinstance(source_input, list):
        max_open = params.get("streams", MAX_STREAMS)
        stagger_s = float(params.get("stagger_s", 0.0))
        return FileStreams(source_input, chunk_ms=chunk_ms, realtime=realtime, max_open=max_open, stagger_s=stagger_s)
    if source_input == STDIN_INPUT:
        stdin = os.fdopen(os.dup(0), "rb")  # a spawned process keeps the runner's fd 0
        return StdinSource(stdin, rate=params.get("rate"), channels=channels, chunk_ms=chunk_ms)
    if source_input == MIC_INPUT:
        return MicSource(params.get("mic_device"), rate=params.get("rate"), channels=channels, chunk_ms=chunk_ms)
    return FileSource(source_input, chunk_ms=chunk_ms, realtime=realtime)


def _allow_open_files(count: int) -> None:
    """Raise this process's soft limit on open files so that `count` audio files fit besides its sockets; a hard
    limit too low for them is a StageError."""
    import resource

    needed = count + FILE_DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise StageError(
            f"--streams: {count} files open at once need {needed} file descriptors and this system allows {hard} "
            "(ulimit -n); give fewer streams"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class FileStreams:
    """Audio files read at once, each its own stream: at most `max_open` are open at a time (the next file starts
    as one ends, and with `stagger_s` no sooner than that after the one before), and their chunks interleave: in
    turn, or with `realtime` each file paced on its own from its start (the chunk due first goes first).
    `labels` name the streams by their input, in order."""

    def __init__(
        self,
        paths: list[str],
        *,
        chunk_ms: float = DEFAULT_CHUNK_MS,
        realtime: bool = False,
        max_open: int = MAX_STREAMS,
        stagger_s: float = 0.0,
    ):
        check_chunk_ms(chunk_ms)
        self.labels = list(paths)
        self._chunk_ms = chunk_ms
        self._realtime = realtime
        self._stagger_s = stagger_s
        self._max_open = min(len(paths), max_open)
        _allow_open_files(self._max_open)
        self._files: dict[int, FileSource] = {}
        self._lock = threading.Lock()  # close() may come from another thread while events() opens files
        self._closed = threading.Event()

    @property
    def paced(self) -> bool:
        return self._realtime

    def events(self) -> Iterator[Work]:
        """(index, StreamStart()) as a file's stream starts, (index, chunk) for each chunk of its audio, then
        (index, END), or (index, StreamFailed(reason)) once it cannot be read; until every file ended or `close`
        is called."""
        turn = itertools.count()  # breaks ties, and is the order itself when not paced
        ready: list[tuple[float, int, int, Item]] = []  # (when due, turn, index, its next chunk read ahead)
        chunks: dict[int, Iterator[Item]] = {}
        clocks: dict[int, list[float]] = {}  # per open file: [monotonic start, seconds of audio read]
        upcoming, next_start = 0, time.monotonic()  # the next file to open, and when it may start
        while not self._closed.is_set():
            while len(chunks) < self._max_open and upcoming < len(self.labels) and time.monotonic() >= next_start:
                index, upcoming = upcoming, upcoming + 1
                next_start = max(next_start, time.monotonic()) + self._stagger_s
                yield index, StreamStart()
                try:
                    source = FileSource(self.labels[index], chunk_ms=self._chunk_ms)
                except StageError as error:
                    yield index, StreamFailed(str(error))
                    continue
                with self._lock:
                    if self._closed.is_set():
                        source.close()
                        return
                    self._files[index] = source
                chunks[index], clocks[index] = source.chunks(), [time.monotonic(), 0.0]
                ended = self._read_ahead(index, chunks, clocks, ready, turn)
                if ended is not None:
                    yield ended
            opening = len(chunks) < self._max_open and upcoming < len(self.labels)  # only while staggered
            if not ready and not opening:
                return
            if opening and (not ready or next_start < ready[0][0]):
                if self._closed.wait(next_start - time.monotonic()):
                    return
                continue
            due, _, index, chunk = heapq.heappop(ready)
            if self._realtime and self._closed.wait(due - time.monotonic()):
                return
            yield index, chunk
            ended = self._read_ahead(index, chunks, clocks, ready, turn)
            if ended is not None:
                yield ended

    def _read_ahead(
        self,
        index: int,
        chunks: dict[int, Iterator[Item]],
        clocks: dict[int, list[float]],
        ready: list[tuple[float, int, int, Item]],
        turn: Iterator[int],
    ) -> Work | None:
        """Read a file's next chunk into `ready`, due when its last sample would have been captured live; the
        file's END or failure instead when there is none, the file then closed."""
        try:
            chunk = next(chunks[index], None)
        except StageError as error:
            chunk, ended = None, (index, StreamFailed(str(error)))
        else:
            ended = (index, END) if chunk is None else None
        if ended is not None:
            del chunks[index], clocks[index]
            with self._lock:
                self._files.pop(index).close()
            return ended
        clock = clocks[index]
        clock[1] += len(chunk["samples"]) / chunk["sample_rate"]
        order = next(turn)
        heapq.heappush(ready, (clock[0] + clock[1] if self._realtime else order, order, index, chunk))
        return None

    def close(self) -> None:
        """Release every open file; `events` ends at its next step (at once if it is waiting to pace a chunk)."""
        with self._lock:
            self._closed.set()
            for source in self._files.values():
                source.close()
            self._files.clear()
