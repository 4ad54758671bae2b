"""Bounded queues between processes: a ZeroMQ DEALER pair per edge with credit-based flow control.

The receiver grants one credit per message it takes, so at most `capacity` messages are ever in an edge, and
the sender applies the edge's policy when it has no credit: wait (block), or drop the newest or the oldest.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import zmq

from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.wire import Envelope, Kind, decode, encode, payload_bytes

LINGER_MS = 1000  # how long a closing socket may still try to deliver queued messages
_HELLO = b""  # first frame a sender puts on an edge; the receiver answers with the initial credits
_CREDIT = struct.Struct("<I")


class Policy(str, Enum):
    """What a sender does when its edge is full."""

    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


@dataclass(frozen=True)
class EdgeSpec:
    """One queue of the pipeline as both ends see it: names, where to bind and connect, size and policy."""

    source: str
    target: str
    bind: str
    connect: str
    capacity: int
    policy: Policy

    @property
    def name(self) -> str:
        return f"{self.source} -> {self.target}"

    @property
    def window(self) -> int:
        """Credits the receiver grants: the whole capacity, except that drop_oldest keeps all but one message
        at the sender, where the oldest can still be dropped."""
        return 1 if self.policy is Policy.DROP_OLDEST else self.capacity


def _data_socket(context: zmq.Context) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, LINGER_MS)
    # Credits bound the queue exactly; ZeroMQ's own high-water marks must never block or drop before that.
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    return socket


class EdgeReceiver:
    """The input end of an edge: binds its endpoint and grants a credit for every message taken."""

    def __init__(self, context: zmq.Context, spec: EdgeSpec):
        self.spec = spec
        self.socket = _data_socket(context)
        try:
            self.socket.bind(spec.bind)
        except zmq.ZMQError as error:
            self.socket.close(linger=0)
            raise RunnerError(f"queue {spec.name}: cannot bind {spec.bind} ({error.strerror})") from None

    def receive(self) -> Envelope | None:
        """Take one waiting message (call when the socket is readable); None for a sender's hello."""
        frames = self.socket.recv_multipart()
        if frames == [_HELLO]:
            self._grant(self.spec.window)
            return None
        self._grant(1)
        return decode(frames)

    def _grant(self, credits: int) -> None:
        try:  # a sender that already left (it sent its end of stream) needs no credit: never wait for it
            self.socket.send(_CREDIT.pack(credits), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.socket.close()


class EdgeSender:
    """The output end of an edge: connects, sends while it has credit, otherwise applies the edge's policy.

    While blocked it also watches `interrupts` (sockets or file descriptors) and calls `on_interrupt` when
    one is readable; that callback may raise to give up the send (the run is stopping).
    """

    def __init__(
        self,
        context: zmq.Context,
        spec: EdgeSpec,
        *,
        interrupts: Sequence[zmq.Socket | int] = (),
        on_interrupt: Callable[[], None] = lambda: None,
    ):
        self.spec = spec
        self.socket = _data_socket(context)
        self.socket.connect(spec.connect)
        self.socket.send(_HELLO)
        self._credits = 0
        self._pending: deque[list] = deque()  # drop_oldest only: messages waiting at the sender
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        for interrupt in interrupts:
            self._poller.register(interrupt, zmq.POLLIN)
        self._on_interrupt = on_interrupt
        self.sent = 0
        self.dropped = 0
        self.peak_depth = 0  # most messages ever in the edge (unacknowledged plus pending): at most capacity

    def send(self, envelope: Envelope) -> int:
        """Send (or queue, or drop, as the policy says) one envelope; return its size in bytes.

        End-of-stream is never dropped: it waits for credit whatever the policy.
        """
        frames = encode(envelope)
        self._take_credits()
        self._flush_pending()
        if self._credits > 0 and not self._pending:
            self._put(frames)
        elif envelope.kind is Kind.EOS or self.spec.policy is Policy.BLOCK:
            self._flush_pending(wait=True)
            self._wait_for_credit()
            self._put(frames)
        elif self.spec.policy is Policy.DROP_NEWEST:
            self.dropped += 1
        else:
            if len(self._pending) >= self.spec.capacity - self.spec.window:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(frames)
            self._note_depth()
        return payload_bytes(frames)

    def _put(self, frames: list) -> None:
        self.socket.send_multipart(frames, copy=False)
        self._credits -= 1
        self.sent += 1
        self._note_depth()

    def _note_depth(self) -> None:
        self.peak_depth = max(self.peak_depth, self.spec.window - self._credits + len(self._pending))

    def _take_credits(self) -> None:
        while self.socket.poll(0, zmq.POLLIN):
            self._credits += _CREDIT.unpack(self.socket.recv())[0]

    def _flush_pending(self, *, wait: bool = False) -> None:
        while self._pending and (self._credits > 0 or wait):
            self._wait_for_credit()
            self._put(self._pending.popleft())

    def _wait_for_credit(self) -> None:
        while self._credits == 0:
            events = dict(self._poller.poll())
            if self.socket in events:
                self._take_credits()
            if any(ready is not self.socket for ready in events):
                self._on_interrupt()

    def close(self) -> None:
        self.socket.close()
