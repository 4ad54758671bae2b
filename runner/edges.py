"""Bounded queues between processes: a DEALER (sender) to ROUTER (receiver) pair per edge, with credit-based flow
control, one accepted sender, checked messages and, on tcp, CURVE-authenticated links.

The receiver grants one credit per message it takes, and only to the edge's own sender (known by its routing id
and its hello), so at most `capacity` messages are ever in an edge and other connections get nothing; the
sender applies the edge's policy when it has no credit: wait (block), or drop the newest or the oldest. An edge
carries many streams interleaved, each opened by its first message and closed by its end (or its failure), and
ends with the sender's last message. Every message is checked as it arrives (size, envelope, stream id, its
stream's order, streams open at once); a bad one is a one-line RunnerError naming the edge. An edge to another
invocation (`remote`) also watches its link: ZeroMQ heartbeats drop a connection whose peer process stopped
answering, and a lost link fails the stage instead of waiting for ever.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import zmq
from zmq.utils.monitor import recv_monitor_message

from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.security import CurveKeys, make_client, make_server
from voxtral_run.runner.wire import LAST_STREAM_ID, Envelope, Kind, WireError, decode, encode, payload_bytes
from voxtral_run.stages.audio.capture import MAX_STREAMS

LINGER_MS = 1000  # how long a closing socket may still try to deliver queued messages
_HELLO = b"voxtral-run hello"  # first message a sender puts on an edge; the receiver answers with the credits
_CREDIT = struct.Struct("<I")
CREDIT_MAX_BYTES = 4096  # what a sender accepts from its receiver: credit frames, and the CURVE handshake
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0
DEFAULT_LINK_TIMEOUT_S = 600.0
_LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
_LINK_EVENTS |= zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
# Streams open at once on an edge. A capture opens at most MAX_STREAMS; a stage that batches may emit a new
# stream's first items before the end of one the capture already closed, so downstream edges get room beyond it.
MAX_OPEN_STREAMS = 4 * MAX_STREAMS
# Ended stream ids an edge remembers, to refuse a message after its stream's end: the most recent this many, so
# a run of any number of streams keeps this bookkeeping bounded.
ENDED_STREAMS_REMEMBERED = MAX_OPEN_STREAMS
ENDING_KINDS = (Kind.EOS, Kind.FAILED)  # the last message of a stream


class Policy(str, Enum):
    """What a sender does when its edge is full."""

    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


@dataclass(frozen=True)
class EdgeSpec:
    """One queue of the pipeline as both ends see it: names, where to bind and connect, size and policy, the
    largest frame it carries, and whether its other end belongs to another invocation (link watched)."""

    source: str
    target: str
    bind: str
    connect: str
    capacity: int
    policy: Policy
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    remote: bool = False
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S  # how long the other end may take to appear

    @property
    def name(self) -> str:
        return f"{self.source} -> {self.target}"

    @property
    def window(self) -> int:
        """Credits the receiver grants: the whole capacity, except that drop_oldest keeps all but one message
        at the sender, where the oldest can still be dropped."""
        return 1 if self.policy is Policy.DROP_OLDEST else self.capacity

    @property
    def routing_id(self) -> bytes:
        """The sender's identity at the receiver: the only peer the receiver takes messages from."""
        return f"{self.source}->{self.target}".encode()

    @property
    def check_every_s(self) -> float:
        """How often a waiting end looks at its link."""
        return self.heartbeat_timeout_s / 4

    @property
    def is_tcp(self) -> bool:
        return self.connect.startswith("tcp://")


def _data_socket(context: zmq.Context, kind: int, spec: EdgeSpec, keys: CurveKeys | None) -> zmq.Socket:
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, LINGER_MS)
    # Credits bound the queue exactly; ZeroMQ's own high-water marks must never block or drop before that.
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    if spec.remote:
        # ZMTP pings from the I/O thread, so a busy stage still answers; a stopped or vanished peer does not,
        # and its connection is dropped within the heartbeat timeout.
        interval_ms = max(1, int(spec.heartbeat_timeout_s * 1000 / 4))
        socket.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2 * interval_ms)
        socket.setsockopt(zmq.HEARTBEAT_TTL, 2 * interval_ms)
    if spec.is_tcp:
        if keys is None:
            raise RunnerError(f"queue {spec.name}: a tcp queue needs the run's CURVE keys")
        (make_server if kind == zmq.ROUTER else make_client)(socket, keys)
    return socket


def add_gap(gaps: list[list[float]], gap: list[float]) -> None:
    """Append an audio gap to a list in time order, merging it into the last one when they touch."""
    if gaps and abs(gaps[-1][0] + gaps[-1][1] - gap[0]) < 1e-9:
        gaps[-1] = [gaps[-1][0], gaps[-1][1] + gap[1]]
    else:
        gaps.append(list(gap))


class EdgeReceiver:
    """The input end of an edge: binds its endpoint, takes messages from its own sender only and grants a credit
    for every message taken."""

    def __init__(self, context: zmq.Context, spec: EdgeSpec, keys: CurveKeys | None = None):
        self.spec = spec
        self.socket = _data_socket(context, zmq.ROUTER, spec, keys)
        # Sends to a sender that is not (or no longer) connected fail at once instead of vanishing: the link check.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, spec.max_message_bytes)
        try:
            self.socket.bind(spec.bind)
        except zmq.ZMQError as error:
            self.socket.close(linger=0)
            raise RunnerError(f"queue {spec.name}: cannot bind {spec.bind} ({error.strerror})") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)  # the port too, where the OS chose it
        self._linked = False  # the sender's hello came
        self._open: dict[str, int] = {}  # stream id -> the sequence number of its last message
        self._ended: dict[str, None] = {}  # the most recently ended stream ids, oldest first (an ordered set)
        self._opened = 0  # streams opened so far: the sender's last message must count as many
        self._last = False  # the sender's last message came
        self._created = time.monotonic()
        self._next_check = self._created

    def receive(self) -> Envelope | None:
        """Take one waiting message (call when the socket is readable); None for the sender's hello. A message
        from another peer, a malformed one, or one out of its stream's order is a RunnerError naming the edge."""
        envelope = self._take(self.socket.recv_multipart(copy=True))
        if envelope is not None:
            self._grant(1)
        return envelope

    def receive_waiting(self, limit: int) -> list[Envelope]:
        """Take every message waiting, up to `limit`, without blocking (a hello is taken, not returned), and grant
        their credits at once; checked as `receive` checks them."""
        taken: list[Envelope] = []
        while len(taken) < limit:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            envelope = self._take(frames)
            if envelope is not None:
                taken.append(envelope)
        if taken:
            self._grant(len(taken))
        return taken

    def gather(self, taken: list[Envelope], wait_s: float, limit: int) -> list[Envelope]:
        """`taken` and what arrives within `wait_s`, until every stream open on the queue has a message among them
        (the sender's last message comes after every stream ended) or `limit` are taken."""
        deadline = time.monotonic() + wait_s
        taken = list(taken)
        while len(taken) < limit and set(self._open) - {envelope.stream_id for envelope in taken}:
            left_ms = round((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self.socket.poll(left_ms, zmq.POLLIN):
                break
            taken += self.receive_waiting(limit - len(taken))
        return taken

    def _take(self, message: list[bytes]) -> Envelope | None:
        identity, *frames = message
        if identity != self.spec.routing_id:
            raise self._error("a message from a peer that is not this queue's sender")
        if frames == [_HELLO]:
            if self._linked:
                raise self._error("a second hello from the sender")
            self._linked = True
            self._grant(self.spec.window)
            return None
        if not self._linked:
            raise self._error("a message before the sender's hello")
        try:
            envelope = decode(frames)
        except WireError as error:
            raise self._error(str(error)) from None
        self._check_order(envelope)
        return envelope

    def _check_order(self, envelope: Envelope) -> None:
        """Streams interleave: a stream's first message (data, end or failure) opens it, with its options, and its
        end or failure closes it; its sequence numbers only grow (a dropping queue skips some), and a message for
        it after its end is refused. At most MAX_OPEN_STREAMS are open at once. The sender's last message comes
        once every stream has ended, counts them, and nothing follows it."""
        if self._last:
            raise self._error("a message after the sender's last")
        stream = envelope.stream_id
        if envelope.kind is Kind.LAST:
            if self._open:
                raise self._error(f"the sender's last message while {len(self._open)} streams are open")
            if envelope.seq != self._opened:
                raise self._error(f"the sender's last message counts {envelope.seq} streams, not {self._opened}")
            self._last = True
            return
        if stream in self._ended:
            raise self._error(f"a message for stream {stream!r} after its end")
        last_seq = self._open.get(stream)
        if last_seq is None:
            if len(self._open) >= MAX_OPEN_STREAMS:
                raise self._error(f"more than {MAX_OPEN_STREAMS} streams open at once (stream {stream!r})")
            self._opened += 1
        elif envelope.seq <= last_seq:
            raise self._error(f"stream {stream!r}: message {envelope.seq} after {last_seq}")
        elif envelope.options:
            raise self._error(f"stream {stream!r}: options on message {envelope.seq}, not on its first")
        if envelope.kind in ENDING_KINDS:
            self._open.pop(stream, None)
            self._ended[stream] = None
            if len(self._ended) > ENDED_STREAMS_REMEMBERED:
                del self._ended[next(iter(self._ended))]
        else:
            self._open[stream] = envelope.seq

    @property
    def linked(self) -> bool:
        """Whether the sender's hello came: the link is up."""
        return self._linked

    @property
    def open_streams(self) -> int:
        """Streams opened on this edge and not yet ended."""
        return len(self._open)

    @property
    def remembered_streams(self) -> int:
        """Ended stream ids remembered (at most ENDED_STREAMS_REMEMBERED)."""
        return len(self._ended)

    def _error(self, problem: str) -> RunnerError:
        return RunnerError(f"queue {self.spec.name}: {problem}")

    def _grant(self, credits: int) -> None:
        try:  # a sender that already left (it sent its end of stream) needs no credit: never wait for it
            self.socket.send_multipart([self.spec.routing_id, _CREDIT.pack(credits)], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):
            pass

    @property
    def streaming(self) -> bool:
        """Whether the link still matters: until the sender's last message."""
        return not self._last

    def check_link(self) -> None:
        """For a remote edge: fail if the sender never connected within the link timeout, or left mid-stream."""
        now = time.monotonic()
        if not self.spec.remote or now < self._next_check or not self.streaming:
            return
        self._next_check = now + self.spec.check_every_s
        if not self._linked:
            if now - self._created > self.spec.link_timeout_s:
                raise self._error(
                    f"no sender connected to {self.spec.bind} within {self.spec.link_timeout_s:g} s "
                    "(startup_timeout_s); is the invocation running its other end started, with the same key?"
                )
            return
        try:  # a zero credit: costs the sender nothing, and fails here if its connection is gone
            self.socket.send_multipart([self.spec.routing_id, _CREDIT.pack(0)], zmq.NOBLOCK)
        except zmq.Again:
            pass
        except zmq.ZMQError:
            raise self._error(
                "lost the link to the sending stage (its invocation stopped, or its host is unreachable)"
            ) from None

    def close(self) -> None:
        self.socket.close()


class EdgeSender:
    """The output end of an edge: connects, sends while it has credit, otherwise applies the edge's policy.

    While blocked it also watches `interrupts` (sockets or file descriptors) and calls `on_interrupt` when
    one is readable or, on a remote edge, at every link check; that callback may raise to give up the send.
    `on_drop` hears of every envelope the policy drops; `annotate` adds audio gaps to a stream's next envelope
    sent. A dropped first message's stream options go on that stream's next envelope sent.
    """

    def __init__(
        self,
        context: zmq.Context,
        spec: EdgeSpec,
        *,
        keys: CurveKeys | None = None,
        interrupts: Sequence[zmq.Socket | int] = (),
        on_interrupt: Callable[[], None] = lambda: None,
        on_drop: Callable[[Envelope], None] = lambda envelope: None,
    ):
        self.spec = spec
        self.socket = _data_socket(context, zmq.DEALER, spec, keys)
        self.socket.setsockopt(zmq.ROUTING_ID, spec.routing_id)
        self.socket.setsockopt(zmq.MAXMSGSIZE, CREDIT_MAX_BYTES)
        self._monitor = self.socket.get_monitor_socket(_LINK_EVENTS) if spec.remote else None
        self.socket.connect(spec.connect)
        self.socket.send(_HELLO)
        self._credits = 0
        self._linked = False
        self._ended = False  # the last message sent: the receiver may leave from here on
        self._created = time.monotonic()
        self._pending: deque[Envelope] = deque()  # drop_oldest only: messages waiting at the sender
        self._gaps: dict[str, list[list[float]]] = {}  # per stream: audio gaps to carry on its next envelope
        self._options: dict[str, dict] = {}  # per stream: options of a dropped first message, for its next one
        self._open: set[str] = set()  # streams with a message on the wire and no end yet
        self._opened = 0  # streams put on the wire so far: the last message counts them
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        for interrupt in interrupts:
            self._poller.register(interrupt, zmq.POLLIN)
        self._on_interrupt = on_interrupt
        self._on_drop = on_drop
        self.sent = 0
        self.dropped = 0
        self.peak_depth = 0  # most messages ever in the edge (unacknowledged plus pending): at most capacity

    def send(self, envelope: Envelope) -> int:
        """Send (or queue, or drop, as the policy says) one envelope; return its size in bytes.

        Only data is ever dropped: a stream's end or failure, and the last message, wait for credit whatever the
        policy.
        """
        self._take_credits()
        self._flush_pending()
        if self._credits > 0 and not self._pending:
            return self._put(envelope)
        if envelope.kind is not Kind.DATA or self.spec.policy is Policy.BLOCK:
            self._flush_pending(wait=True)
            self._wait_for_credit()
            return self._put(envelope)
        if self.spec.policy is Policy.DROP_NEWEST:
            self._drop(envelope)
        else:
            if len(self._pending) >= self.spec.capacity - self.spec.window:
                self._drop(self._pending.popleft())
            self._pending.append(envelope)
            self._note_depth()
        return 0

    def can_send(self) -> bool:
        """Whether `send` puts a message on the wire now, without waiting: a credit is here (taking the credits
        that arrived), and no message waits before it. For a sender that must never block (a server's loop)."""
        self._take_credits()
        self._flush_pending()
        return self._credits > 0 and not self._pending

    def send_last(self) -> int:
        """Send the last message: every stream this edge carried has ended (sent once all have)."""
        return self.send(Envelope(LAST_STREAM_ID, self._opened, time.time(), Kind.LAST))

    def annotate(self, stream_id: str, gap: list[float]) -> None:
        """Carry an audio gap ([start s, length s] of dropped audio) on the stream's next envelope put on the wire;
        one that starts where the last ends extends it, so a run of drops stays one gap."""
        add_gap(self._gaps.setdefault(stream_id, []), gap)

    @property
    def tracked_streams(self) -> int:
        """Streams this end keeps anything for: open on the wire, gaps or options waiting."""
        return len(self._open | set(self._gaps) | set(self._options))

    def _drop(self, envelope: Envelope) -> None:
        self.dropped += 1
        if envelope.options:
            self._options[envelope.stream_id] = envelope.options
        self._on_drop(envelope)

    def _put(self, envelope: Envelope) -> int:
        stream = envelope.stream_id
        gaps = self._gaps.pop(stream, [])
        if gaps:  # in time order: the drops before this envelope, then the audio lost just before it
            envelope.gaps = [*gaps, *envelope.gaps]
        if stream in self._options:
            envelope.options = self._options.pop(stream) | envelope.options
        frames = encode(envelope)
        self.socket.send_multipart(frames, copy=False)
        self._credits -= 1
        if envelope.kind is Kind.LAST:
            self._ended = True
        else:  # `sent` counts the streams' messages, as the receiving stage counts what it takes
            self.sent += 1
            if stream not in self._open:  # its first message: the receiver opens it now
                self._opened += 1
            if envelope.kind in ENDING_KINDS:
                self._open.discard(stream)
            else:
                self._open.add(stream)
        self._note_depth()
        return payload_bytes(frames)

    def _note_depth(self) -> None:
        self.peak_depth = max(self.peak_depth, self.spec.window - self._credits + len(self._pending))

    def _take_credits(self) -> None:
        while self.socket.poll(0, zmq.POLLIN):
            frame = self.socket.recv()
            if len(frame) != _CREDIT.size:
                raise RunnerError(f"queue {self.spec.name}: a malformed credit from the receiver")
            credits = _CREDIT.unpack(frame)[0]
            if self._credits + credits > self.spec.window:
                raise RunnerError(f"queue {self.spec.name}: the receiver granted more credit than the queue holds")
            self._credits += credits

    def _flush_pending(self, *, wait: bool = False) -> None:
        while self._pending and (self._credits > 0 or wait):
            self._wait_for_credit()
            self._put(self._pending.popleft())

    def _wait_for_credit(self) -> None:
        timeout_ms = int(self.spec.check_every_s * 1000) if self.spec.remote else None
        while self._credits == 0:
            events = dict(self._poller.poll(timeout_ms))
            if self.socket in events:
                self._take_credits()
            if any(ready is not self.socket for ready in events):
                self._on_interrupt()
            self.check_link()

    def check_link(self) -> None:
        """For a remote edge: fail on a rejected key, on a receiver that never appeared within the link timeout,
        or on a link lost before the last message went out."""
        if self._monitor is None:
            return
        while self._monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._linked = True
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise RunnerError(
                    f"queue {self.spec.name}: the receiver at {self.spec.connect} rejected this invocation's key "
                    "(every invocation of a run needs the same key file: --keys or VOXTRAL_RUN_KEYS)"
                )
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and not self._linked:
                raise RunnerError(
                    f"queue {self.spec.name}: {self.spec.connect} does not answer as a voxtral-run stage "
                    "(failed secure handshake)"
                )
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not self._linked:
                # The connection dropped mid-handshake: a receiver whose invocation just died looks like this.
                raise RunnerError(
                    f"queue {self.spec.name}: lost the link to the receiving stage at {self.spec.connect} during "
                    "its secure handshake (its invocation stopped, or it is not a voxtral-run stage)"
                )
            elif event == zmq.EVENT_DISCONNECTED and self._linked and not self._ended:
                raise RunnerError(
                    f"queue {self.spec.name}: lost the link to the receiving stage at {self.spec.connect} "
                    "(its invocation stopped, or its host is unreachable)"
                )
        if not self._linked and time.monotonic() - self._created > self.spec.link_timeout_s:
            raise RunnerError(
                f"queue {self.spec.name}: no receiver at {self.spec.connect} within {self.spec.link_timeout_s:g} s "
                "(startup_timeout_s); is the invocation running its other end started?"
            )

    def close(self) -> None:
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
        self.socket.close()
