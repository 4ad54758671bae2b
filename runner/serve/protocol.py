"""The events of the two realtime dialects of /v1/realtime and the bodies of the HTTP API, as pydantic models.

vLLM's realtime protocol (as vLLM serves Voxtral Realtime): session.update with the model, base64 PCM16 16 kHz
appends, commit and commit final, and session.created, transcription.delta, transcription.done with usage,
error with a code. OpenAI's Realtime transcription sessions: session.update of type transcription (or the beta's
transcription_session.update), audio/pcm at 24 kHz, server VAD's speech_started / speech_stopped, commits and
clears, and conversation.item.input_audio_transcription.delta / .completed. OpenAI's /v1/audio/transcriptions
bodies. Fields beyond the originals (delay_ms, the deltas' audio times start_s / end_s, token_ids) are extras
that the originals' clients ignore.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from voxtral_run.runner.serve.hub import HubError, Usage
from voxtral_run.stages.audio.speech_detector import (
    DEFAULT_PREFIX_PADDING_MS,
    DEFAULT_SILENCE_DURATION_MS,
    DEFAULT_THRESHOLD,
    SpeechSettings,
)

PCM16_SCALE = 32768.0
VLLM_RATE = 16_000  # vLLM's appends: PCM16 at 16 kHz
OPENAI_RATE = 24_000  # OpenAI's audio/pcm: PCM16 at 24 kHz
OPENAI_RATES = (OPENAI_RATE, VLLM_RATE)  # 16 kHz is this server's extension, saving a resample
# OpenAI's named transcription delays, as this model's delays (80..2400 ms).
OPENAI_DELAYS_MS = {"minimal": 80, "low": 240, "medium": 480, "high": 960, "xhigh": 2400}


def new_id(prefix: str) -> str:
    """A unique id for a server event, session or item, as OpenAI spells them (event_..., item_...)."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def decode_pcm16(audio: str) -> np.ndarray:
    """Base64 PCM16 (little-endian, mono) as float32 samples in [-1, 1); HubError invalid_audio when malformed."""
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError) as error:
        raise HubError("invalid_audio", f"audio is not valid base64 ({error})") from None
    if not data:
        raise HubError("invalid_audio", "audio is empty: an append needs at least one sample")
    if len(data) % 2:
        raise HubError("invalid_audio", f"audio has {len(data)} bytes, an odd count: PCM16 samples are 2 bytes each")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM16_SCALE


class ClientEvent(BaseModel):
    """An event a client sends: fields this server does not use are ignored, as the originals ignore them."""

    model_config = ConfigDict(extra="ignore")


class ServerEvent(BaseModel):
    """An event this server sends."""

    model_config = ConfigDict(extra="forbid")


# vLLM's dialect: client events.


class VllmSessionUpdate(ClientEvent):
    type: Literal["session.update"]
    model: StrictStr | None = None
    delay_ms: StrictInt | None = None  # extension: this session's delay, 80..2400 ms


class VllmAppend(ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: StrictStr  # base64 PCM16, 16 kHz mono


class VllmCommit(ClientEvent):
    type: Literal["input_audio_buffer.commit"]
    final: StrictBool = False  # the audio is over (else: start transcribing)


VLLM_CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    "session.update": VllmSessionUpdate,
    "input_audio_buffer.append": VllmAppend,
    "input_audio_buffer.commit": VllmCommit,
}

# vLLM's dialect: server events.


class VllmSessionCreated(ServerEvent):
    type: Literal["session.created"] = "session.created"
    id: str = Field(default_factory=lambda: f"sess-{uuid.uuid4()}")
    created: int = Field(default_factory=lambda: int(time.time()))


class VllmUsage(ServerEvent):
    """vLLM's usage, the prompt being the audio's 80 ms positions; `audio_seconds` is an extension."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: None = None
    audio_seconds: float

    @classmethod
    def of(cls, usage: Usage) -> VllmUsage:
        return cls(
            prompt_tokens=usage.audio_tokens,
            completion_tokens=usage.tokens,
            total_tokens=usage.audio_tokens + usage.tokens,
            audio_seconds=usage.audio_s,
        )


class VllmDelta(ServerEvent):
    type: Literal["transcription.delta"] = "transcription.delta"
    delta: str
    start_s: float
    end_s: float
    token_ids: list[int]


class VllmDone(ServerEvent):
    type: Literal["transcription.done"] = "transcription.done"
    text: str
    usage: VllmUsage | None = None
    token_ids: list[int]


class VllmError(ServerEvent):
    type: Literal["error"] = "error"
    error: str
    code: str | None = None


# OpenAI's Realtime transcription dialect: the session.


class OpenAIAudioFormat(ClientEvent):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: StrictInt | None = None


class OpenAITranscription(ClientEvent):
    model: StrictStr | None = None
    language: StrictStr | None = None
    prompt: StrictStr | None = None
    delay: Literal["minimal", "low", "medium", "high", "xhigh"] | None = None
    delay_ms: StrictInt | None = None  # extension: the delay in ms, 80..2400


SERVER_VAD = "server_vad"  # the one turn detection served: null leaves the commits to the client


class OpenAITurnDetection(ClientEvent):
    """Server VAD's settings, OpenAI's defaults filled in (stages/audio/speech_detector.py detects the speech)."""

    type: StrictStr = SERVER_VAD
    threshold: StrictFloat = DEFAULT_THRESHOLD
    prefix_padding_ms: StrictInt = DEFAULT_PREFIX_PADDING_MS
    silence_duration_ms: StrictInt = DEFAULT_SILENCE_DURATION_MS
    _settings: SpeechSettings = PrivateAttr()

    @field_validator("type")
    @classmethod
    def _served(cls, value: str) -> str:
        if value != SERVER_VAD:
            raise ValueError(f"turn detection {value[:40]!r} is not served: use {SERVER_VAD}, or null to commit")
        return value

    @model_validator(mode="after")
    def _checked(self) -> OpenAITurnDetection:
        self._settings = SpeechSettings(self.threshold, self.prefix_padding_ms, self.silence_duration_ms)
        return self

    @property
    def settings(self) -> SpeechSettings:
        """The speech detector's settings (checked: a bad one is a validation error naming it)."""
        return self._settings


class OpenAIAudioInput(ClientEvent):
    format: OpenAIAudioFormat | None = None
    transcription: OpenAITranscription | None = None
    turn_detection: OpenAITurnDetection | None = None  # null: no server VAD, the client commits each turn
    noise_reduction: dict | None = None  # accepted and answered with null: no noise reduction is done


class OpenAIAudio(ClientEvent):
    input: OpenAIAudioInput | None = None


class OpenAISession(ClientEvent):
    """A transcription session's configuration: what a client updates, and the effective one the server tells."""

    type: Literal["transcription"]
    id: str | None = None
    object: Literal["realtime.transcription_session"] | None = None
    audio: OpenAIAudio | None = None
    include: list[StrictStr] | None = None


class BetaSession(ClientEvent):
    """The same configuration in the beta's shape (clients sending `OpenAI-Beta: realtime=v1`)."""

    id: str | None = None
    object: Literal["realtime.transcription_session"] | None = None
    input_audio_format: Literal["pcm16", "g711_ulaw", "g711_alaw"] | None = None
    input_audio_transcription: OpenAITranscription | None = None
    turn_detection: OpenAITurnDetection | None = None
    input_audio_noise_reduction: dict | None = None
    include: list[StrictStr] | None = None


# Where each field of a beta session lives in the GA one, and the beta's audio formats as the GA's ("pcm16" is
# PCM16 at OpenAI's 24 kHz): the one mapping both ways.
BETA_SESSION_PATHS: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "object": ("object",),
    "input_audio_format": ("audio", "input", "format"),
    "input_audio_transcription": ("audio", "input", "transcription"),
    "turn_detection": ("audio", "input", "turn_detection"),
    "input_audio_noise_reduction": ("audio", "input", "noise_reduction"),
    "include": ("include",),
}
BETA_AUDIO_FORMATS: dict[str, str] = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


def ga_session(beta: BetaSession) -> OpenAISession:
    """A beta session (update) as the GA one, setting only the fields the beta one sets."""
    ga: dict = {"type": "transcription"}
    for name, value in beta.model_dump(exclude_unset=True).items():
        if name == "input_audio_format":
            value = {"type": BETA_AUDIO_FORMATS[value], "rate": OPENAI_RATE if value == "pcm16" else None}
        *parents, leaf = BETA_SESSION_PATHS[name]
        node = ga
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return OpenAISession.model_validate(ga)


def beta_session(ga: OpenAISession) -> BetaSession:
    """A GA session as the beta tells it."""
    fields: dict[str, object] = {}
    for name, path in BETA_SESSION_PATHS.items():
        value: object = ga
        for part in path:
            value = getattr(value, part, None)
        fields[name] = value
    audio_format = fields["input_audio_format"]
    if isinstance(audio_format, OpenAIAudioFormat):
        beta_names = {type_: name for name, type_ in BETA_AUDIO_FORMATS.items()}
        fields["input_audio_format"] = beta_names[audio_format.type]
    return BetaSession.model_validate(fields)


# OpenAI's dialect: client events.


class OpenAISessionUpdate(ClientEvent):
    type: Literal["session.update"]
    event_id: StrictStr | None = None
    session: OpenAISession


class OpenAIAppend(ClientEvent):
    type: Literal["input_audio_buffer.append"]
    event_id: StrictStr | None = None
    audio: StrictStr  # base64 PCM16 at the session's rate


class OpenAICommit(ClientEvent):
    type: Literal["input_audio_buffer.commit"]
    event_id: StrictStr | None = None


class OpenAIClear(ClientEvent):
    type: Literal["input_audio_buffer.clear"]
    event_id: StrictStr | None = None


class BetaSessionUpdate(ClientEvent):
    type: Literal["transcription_session.update"]
    event_id: StrictStr | None = None
    session: BetaSession


OPENAI_CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    "session.update": OpenAISessionUpdate,
    "transcription_session.update": BetaSessionUpdate,
    "input_audio_buffer.append": OpenAIAppend,
    "input_audio_buffer.commit": OpenAICommit,
    "input_audio_buffer.clear": OpenAIClear,
}

# OpenAI's dialect: server events.


class OpenAIServerEvent(ServerEvent):
    event_id: str = Field(default_factory=lambda: new_id("event"))


class OpenAISessionCreated(OpenAIServerEvent):
    type: Literal["session.created"] = "session.created"
    session: OpenAISession


class OpenAISessionUpdated(OpenAIServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: OpenAISession


class BetaSessionCreated(OpenAIServerEvent):
    type: Literal["transcription_session.created"] = "transcription_session.created"
    session: BetaSession


class BetaSessionUpdated(OpenAIServerEvent):
    type: Literal["transcription_session.updated"] = "transcription_session.updated"
    session: BetaSession


class OpenAISpeechStarted(OpenAIServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int  # of the session's audio: the item's audio starts here, its prefix padding included
    item_id: str


class OpenAISpeechStopped(OpenAIServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int  # of the session's audio: the item's audio ends here, its closing silence included
    item_id: str


class OpenAICommitted(OpenAIServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None = None


class OpenAICleared(OpenAIServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class InputTokenDetails(ServerEvent):
    audio_tokens: int
    text_tokens: int = 0


class TokenUsage(ServerEvent):
    """OpenAI's usage of a transcription billed by tokens: the input is the audio's 80 ms positions."""

    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: InputTokenDetails

    @classmethod
    def of(cls, usage: Usage) -> TokenUsage:
        return cls(
            input_tokens=usage.audio_tokens,
            output_tokens=usage.tokens,
            total_tokens=usage.audio_tokens + usage.tokens,
            input_token_details=InputTokenDetails(audio_tokens=usage.audio_tokens),
        )


class DurationUsage(ServerEvent):
    type: Literal["duration"] = "duration"
    seconds: float


class OpenAIDelta(OpenAIServerEvent):
    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta"
    )
    item_id: str
    content_index: int = 0
    delta: str
    start_s: float
    end_s: float
    token_ids: list[int]


class OpenAICompleted(OpenAIServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    content_index: int = 0
    transcript: str
    usage: TokenUsage
    token_ids: list[int]


class OpenAIErrorDetail(ServerEvent):
    type: str  # invalid_request_error (the client's) or server_error
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None


class OpenAIFailed(OpenAIServerEvent):
    type: Literal["conversation.item.input_audio_transcription.failed"] = (
        "conversation.item.input_audio_transcription.failed"
    )
    item_id: str
    content_index: int = 0
    error: OpenAIErrorDetail


class OpenAIError(OpenAIServerEvent):
    type: Literal["error"] = "error"
    error: OpenAIErrorDetail


# Error codes that are the server's side rather than the client's (OpenAI tells the two apart by error.type).
SERVER_ERROR_CODES = frozenset({"server_at_capacity", "server_not_ready", "server_shutting_down", "internal_error"})


def openai_error_detail(code: str, message: str, event_id: str | None = None) -> OpenAIErrorDetail:
    """OpenAI's error body for one of this server's codes."""
    kind = "server_error" if code in SERVER_ERROR_CODES else "invalid_request_error"
    return OpenAIErrorDetail(type=kind, code=code, message=message, event_id=event_id)


# OpenAI's /v1/audio/transcriptions and /v1/models.


class TranscriptionJson(ServerEvent):
    text: str
    usage: TokenUsage
    token_ids: list[int]


class Segment(ServerEvent):
    """A timed segment of verbose_json, with the fields the pipeline knows (it passes on ids, not scores)."""

    id: int
    seek: int = 0
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float = 0.0  # decoding is greedy
    compression_ratio: float
    # avg_logprob and no_speech_prob are left out: the pipeline passes on ids, not their probabilities.


class Word(ServerEvent):
    word: str
    start: float
    end: float


class VerboseTranscription(ServerEvent):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[Segment]
    words: list[Word] | None = None
    usage: DurationUsage
    token_ids: list[int]


class TextDeltaEvent(ServerEvent):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str
    start_s: float
    end_s: float
    token_ids: list[int]


class TextDoneEvent(ServerEvent):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: TokenUsage
    token_ids: list[int]


class ApiErrorBody(ServerEvent):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ApiError(ServerEvent):
    error: ApiErrorBody


class ModelCard(ServerEvent):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "voxtral-run"


class ModelList(ServerEvent):
    object: Literal["list"] = "list"
    data: list[ModelCard]
