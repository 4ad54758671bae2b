"""What a server is called and how far each connection may go: sizes, queues, timeouts."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL_NAME = "mistralai/Voxtral-Mini-4B-Realtime-2602"


@dataclass(frozen=True)
class ServeSettings:
    """A server's name for its model and its per-connection bounds."""

    model_name: str = DEFAULT_MODEL_NAME  # what /v1/models lists and vLLM's dialect must name
    max_message_bytes: int = 2 * 1024 * 1024  # a WebSocket message past this is refused with an error event
    max_outgoing_events: int = 1024  # events a session may have waiting for its client; past it, it is closed
    idle_timeout_s: float = 60.0  # a session with no client event for this long (and no text due) is closed
    max_buffered_s: float = 30.0  # audio vLLM's dialect holds before the commit that starts transcribing
    max_upload_bytes: int = 256 * 1024 * 1024  # the largest POST /v1/audio/transcriptions body

    def __post_init__(self) -> None:
        if not self.model_name or not self.model_name.isprintable():
            raise ValueError(f"model_name must be a printable name, got {self.model_name!r}")
        for name in ("max_message_bytes", "max_outgoing_events", "max_upload_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("idle_timeout_s", "max_buffered_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
                raise ValueError(f"{name} must be a number of seconds in (0, 86400], got {value!r}")
