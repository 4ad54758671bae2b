"""Credit-bounded queues: capacity is exact, policies block or drop as declared, end of stream is never lost;
streams interleave, each checked in its own order, with bounded bookkeeping."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import zmq

from voxtral_run.runner.edges import (
    ENDED_STREAMS_REMEMBERED,
    MAX_OPEN_STREAMS,
    EdgeReceiver,
    EdgeSender,
    EdgeSpec,
    Policy,
)
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.security import CurveKeys
from voxtral_run.runner.wire import LAST_STREAM_ID, Envelope, Kind, encode


class Interrupted(Exception):
    pass


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def make_edge(context, tmp_path, capacity, policy, **sender_kwargs):
    endpoint = f"ipc://{tmp_path / 'edge'}"
    spec = EdgeSpec("a", "b", endpoint, endpoint, capacity, policy)
    return EdgeReceiver(context, spec), EdgeSender(context, spec, **sender_kwargs)


def envelope(seq: int, kind: Kind = Kind.DATA) -> Envelope:
    return Envelope("s", seq, 0.0, kind, np.full(4, seq, dtype=np.int32) if kind is Kind.DATA else None)


def receive_all(receiver: EdgeReceiver, timeout_ms: int = 200) -> list[Envelope]:
    """Take every message that arrives within the timeout (hellos are consumed, not returned)."""
    received = []
    while receiver.socket.poll(timeout_ms, zmq.POLLIN):
        message = receiver.receive()
        if message is not None:
            received.append(message)
    return received


def seqs(envelopes: list[Envelope]) -> list[int]:
    return [message.seq for message in envelopes if message.kind is Kind.DATA]


def test_block_waits_for_credit_and_never_exceeds_capacity(context, tmp_path):
    """With no credit left, a blocking send waits (here until the interrupt socket fires)."""
    interrupt_a, interrupt_b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    interrupt_a.bind("inproc://interrupt")
    interrupt_b.connect("inproc://interrupt")

    def on_interrupt():
        raise Interrupted()

    receiver, sender = make_edge(
        context, tmp_path, 3, Policy.BLOCK, interrupts=[interrupt_b], on_interrupt=on_interrupt
    )
    # The receiver has not taken the hello yet, so the sender has no credit: the first send blocks.
    interrupt_a.send(b"stop")
    with pytest.raises(Interrupted):
        sender.send(envelope(0))
    assert receive_all(receiver) == []  # only the hello was waiting; it granted 3 credits
    for seq in range(3):
        sender.send(envelope(seq))
    interrupt_a.send(b"stop")
    with pytest.raises(Interrupted):
        sender.send(envelope(3))  # the edge holds 3 unacknowledged messages
    assert sender.peak_depth == 3
    assert seqs(receive_all(receiver)) == [0, 1, 2]
    sender.send(envelope(3))  # credits came back as the receiver took the messages
    assert seqs(receive_all(receiver)) == [3]
    assert sender.dropped == 0


def test_drop_newest_discards_what_does_not_fit(context, tmp_path):
    receiver, sender = make_edge(context, tmp_path, 2, Policy.DROP_NEWEST)
    receive_all(receiver)  # the hello: 2 credits
    sender._wait_for_credit()
    for seq in range(5):
        sender.send(envelope(seq))
    assert sender.dropped == 3
    assert seqs(receive_all(receiver)) == [0, 1]
    sender.send(envelope(5, Kind.EOS))  # end of stream waits for the credit the receiver just returned
    [end] = receive_all(receiver)
    assert end.kind is Kind.EOS


def test_drop_oldest_keeps_the_newest_and_delivers_end_of_stream(context, tmp_path):
    receiver, sender = make_edge(context, tmp_path, 3, Policy.DROP_OLDEST)
    receive_all(receiver)  # the hello: 1 credit; the other 2 places wait at the sender
    sender._wait_for_credit()
    for seq in range(6):
        sender.send(envelope(seq))
    assert sender.dropped == 3
    assert sender.peak_depth == 3
    # End of stream waits for credit, flushing the pending messages first, so it needs a receiver taking them.
    taken = []
    poller_timeout = 0
    while len(taken) < 3:
        if receiver.socket.poll(poller_timeout, zmq.POLLIN):
            message = receiver.receive()
            if message is not None:
                taken.append(message)
        sender._take_credits()
        sender._flush_pending()
        poller_timeout = 100
    sender.send(envelope(6, Kind.EOS))
    received = taken + receive_all(receiver)
    assert seqs(received) == [0, 4, 5]  # the first went out at once; 1..3 were the oldest waiting
    assert received[-1].kind is Kind.EOS


def test_gaps_go_out_in_time_order(context, tmp_path):
    """Gaps of drops before an envelope come before the gap it carries itself (audio its source lost just
    before it), as the sink moves later times past them in order."""
    receiver, sender = make_edge(context, tmp_path, 2, Policy.DROP_NEWEST)
    receive_all(receiver)
    sender._wait_for_credit()
    sender.annotate("s", [0.08, 0.08])  # a dropped chunk
    sender.send(Envelope("s", 2, 0.0, Kind.DATA, np.zeros(4, np.float32), gaps=[[0.24, 0.16]]))
    [message] = receive_all(receiver)
    assert message.gaps == [[0.08, 0.08], [0.24, 0.16]]


def test_payload_survives_the_hop(context, tmp_path):
    receiver, sender = make_edge(context, tmp_path, 4, Policy.BLOCK)
    receive_all(receiver)
    sender._wait_for_credit()
    item = {"samples": np.arange(12, dtype=np.float32).reshape(6, 2), "sample_rate": 44100}
    sender.send(Envelope("stream", 7, 123.5, Kind.DATA, item))
    [message] = receive_all(receiver)
    assert (message.stream_id, message.seq, message.capture_time) == ("stream", 7, 123.5)
    np.testing.assert_array_equal(message.item["samples"], item["samples"])
    assert message.item["sample_rate"] == 44100


def test_receiver_never_waits_on_a_sender_that_left(context, tmp_path):
    """The last message of a sender that already closed is still taken; its credit goes nowhere, at once."""
    receiver, sender = make_edge(context, tmp_path, 2, Policy.BLOCK)
    receive_all(receiver)
    sender._wait_for_credit()
    sender.send(envelope(0, Kind.EOS))
    sender.socket.close(linger=1000)
    time.sleep(0.2)  # the connection is gone before the receiver takes the message
    taken = []
    worker = threading.Thread(target=lambda: taken.extend(receive_all(receiver)), daemon=True)
    worker.start()  # the receiver's socket is used by this thread alone from here on
    worker.join(timeout=5)
    assert not worker.is_alive(), "the receiver blocked granting a credit to a sender that left"
    assert [message.kind for message in taken] == [Kind.EOS]


def test_streams_interleave_and_the_last_message_counts_them(context, tmp_path):
    receiver, sender = make_edge(context, tmp_path, 16, Policy.BLOCK)
    receive_all(receiver)
    sender._wait_for_credit()
    order = [("a", 0, Kind.DATA), ("b", 0, Kind.DATA), ("a", 1, Kind.DATA), ("c", 0, Kind.EOS), ("b", 1, Kind.FAILED)]
    order += [("a", 2, Kind.EOS)]
    for stream, seq, kind in order:
        message = "gave up" if kind is Kind.FAILED else ""
        sender.send(Envelope(stream, seq, 0.0, kind, np.zeros(2) if kind is Kind.DATA else None, message=message))
    assert sender.tracked_streams == 0
    sender.send_last()
    received = receive_all(receiver)
    assert [(message.stream_id, message.seq, message.kind) for message in received] == [
        *order,
        (LAST_STREAM_ID, 3, Kind.LAST),
    ]
    assert receiver.open_streams == 0 and receiver.remembered_streams == 3 and not receiver.streaming


def test_gather_waits_for_a_message_of_every_open_stream_within_its_wait(context, tmp_path):
    """A batching stage's gathering: with "a" and "b" open ("c" ends), a's message waits for b's, which comes 50 ms
    later; with b silent, the wait ends at its bound."""
    receiver, sender = make_edge(context, tmp_path, 16, Policy.BLOCK)
    receive_all(receiver)
    sender._wait_for_credit()
    for stream in "abc":
        sender.send(Envelope(stream, 0, 0.0, Kind.DATA, np.zeros(2)))
    assert len(receive_all(receiver)) == 3 and receiver.open_streams == 3
    sender.send(Envelope("c", 1, 0.0, Kind.EOS))
    sender.send(Envelope("a", 1, 0.0, Kind.DATA, np.zeros(2)))
    later = threading.Timer(0.05, lambda: sender.send(Envelope("b", 1, 0.0, Kind.DATA, np.zeros(2))))
    later.start()
    receiver.socket.poll(1000, zmq.POLLIN)
    started = time.monotonic()
    taken = receiver.gather(receiver.receive_waiting(16), wait_s=5.0, limit=16)
    assert [(message.stream_id, message.seq) for message in taken] == [("c", 1), ("a", 1), ("b", 1)]
    assert 0.03 < time.monotonic() - started < 2.0
    later.join()

    sender.send(Envelope("a", 2, 0.0, Kind.DATA, np.zeros(2)))
    receiver.socket.poll(1000, zmq.POLLIN)
    started = time.monotonic()
    taken = receiver.gather(receiver.receive_waiting(16), wait_s=0.2, limit=16)
    assert [(message.stream_id, message.seq) for message in taken] == [("a", 2)]  # b said nothing within 0.2 s
    assert 0.19 < time.monotonic() - started < 2.0


class RawSender:
    """The edge's sender as a bare socket with its identity: sends whatever envelopes a test makes up."""

    def __init__(self, context, spec: EdgeSpec):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, spec.routing_id)
        self.socket.connect(spec.connect)
        self.socket.send(b"voxtral-run hello")

    def send(self, stream: str, seq: int, kind: Kind = Kind.DATA, **fields) -> None:
        self.socket.send_multipart(encode(Envelope(stream, seq, 0.0, kind, **fields)))


def first_refusal(receiver: EdgeReceiver) -> str:
    """The receiver's error on the messages waiting (each taken in turn until one is refused)."""
    with pytest.raises(RunnerError) as refused:
        while receiver.socket.poll(2000, zmq.POLLIN):
            receiver.receive()
    return str(refused.value)


def m(stream: str, seq: int, kind: Kind = Kind.DATA, **fields) -> tuple:
    """One made-up message: its stream, number, kind and other envelope fields."""
    return stream, seq, kind, fields


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([m("a", 0), m("b", 0), m("a", 1), m("a", 1)], "stream 'a': message 1 after 1"),
        ([m("a", 3), m("b", 0), m("a", 2)], "stream 'a': message 2 after 3"),
        ([m("a", 0), m("b", 0), m("a", 1, Kind.EOS), m("b", 1), m("a", 2)], "a message for stream 'a' after its end"),
        ([m("a", 0, Kind.FAILED, message="gone"), m("a", 1)], "a message for stream 'a' after its end"),
        ([m("a", 0), m("a", 1, options={"delay_ms": 480})], "stream 'a': options on message 1, not on its first"),
        ([m("a", 0), m(LAST_STREAM_ID, 1, Kind.LAST)], "the sender's last message while 1 streams are open"),
        ([m("a", 0, Kind.EOS), m(LAST_STREAM_ID, 2, Kind.LAST)], "the sender's last message counts 2 streams, not 1"),
        ([m(LAST_STREAM_ID, 0, Kind.LAST), m("a", 0)], "a message after the sender's last"),
    ],
)
def test_a_stream_out_of_its_order_is_refused_naming_the_queue(context, tmp_path, messages, expected):
    endpoint = f"ipc://{tmp_path / 'edge'}"
    spec = EdgeSpec("a", "b", endpoint, endpoint, 4, Policy.BLOCK)
    receiver, raw = EdgeReceiver(context, spec), RawSender(context, spec)
    for stream, seq, kind, fields in messages:
        raw.send(stream, seq, kind, **fields)
    assert first_refusal(receiver) == f"queue a -> b: {expected}"


def test_more_streams_open_at_once_than_the_bound_are_refused(context, tmp_path):
    endpoint = f"ipc://{tmp_path / 'edge'}"
    spec = EdgeSpec("a", "b", endpoint, endpoint, 4, Policy.BLOCK)
    receiver, raw = EdgeReceiver(context, spec), RawSender(context, spec)
    for index in range(MAX_OPEN_STREAMS + 1):
        raw.send(f"s{index}", 0)
    refusal = first_refusal(receiver)
    assert refusal == f"queue a -> b: more than {MAX_OPEN_STREAMS} streams open at once (stream 's{MAX_OPEN_STREAMS}')"
    assert receiver.open_streams == MAX_OPEN_STREAMS


def test_ended_streams_are_remembered_within_a_bound(context, tmp_path):
    """Thousands of streams, one after the other: the receiver keeps only the most recent ended ids."""
    endpoint = f"ipc://{tmp_path / 'edge'}"
    spec = EdgeSpec("a", "b", endpoint, endpoint, 4, Policy.BLOCK)
    receiver, raw = EdgeReceiver(context, spec), RawSender(context, spec)
    count = ENDED_STREAMS_REMEMBERED + 1000
    for index in range(count):
        raw.send(f"s{index}", 0)
        raw.send(f"s{index}", 1, Kind.EOS)
    taken = []
    while len(taken) < 2 * count:
        assert receiver.socket.poll(2000, zmq.POLLIN)
        taken += receiver.receive_waiting(4096)
    assert receiver.open_streams == 0 and receiver.remembered_streams == ENDED_STREAMS_REMEMBERED
    raw.send(f"s{count - 1}", 2)  # the latest stream: still known to have ended
    assert "after its end" in first_refusal(receiver)


def test_a_dropped_first_message_passes_its_options_and_gaps_stay_with_their_stream(context, tmp_path):
    receiver, sender = make_edge(context, tmp_path, 1, Policy.DROP_NEWEST)
    receive_all(receiver)
    sender._wait_for_credit()
    sender.send(Envelope("b", 0, 0.0, Kind.DATA, np.zeros(2)))  # takes the one credit
    sender.send(Envelope("a", 0, 0.0, Kind.DATA, np.zeros(2), options={"input": "a.wav"}))  # dropped
    sender.annotate("a", [0.0, 0.08])
    assert sender.tracked_streams == 2  # b open on the wire; a's options and gap waiting
    received = receive_all(receiver)
    sender.send(Envelope("b", 1, 0.0, Kind.EOS))
    received += receive_all(receiver)
    sender.send(Envelope("a", 1, 0.0, Kind.EOS))
    received += receive_all(receiver)
    assert [(message.stream_id, message.options, message.gaps) for message in received] == [
        ("b", {}, []),
        ("b", {}, []),
        ("a", {"input": "a.wav"}, [[0.0, 0.08]]),
    ]
    assert sender.tracked_streams == 0 and receiver.open_streams == 0


def test_a_receiver_that_drops_the_connection_mid_handshake_is_a_lost_link(context):
    """A remote queue's receiver whose invocation dies during the CURVE handshake (here a listener that accepts
    and closes) fails the sender in one line that says the link was lost, not that a stranger answered."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"

    def accept_and_close() -> None:
        connection, _ = listener.accept()
        connection.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    spec = EdgeSpec("a", "b", address, address, 1, Policy.BLOCK, remote=True)
    sender = EdgeSender(context, spec, keys=CurveKeys.generate())
    deadline = time.monotonic() + 5
    with pytest.raises(RunnerError) as failure:
        while time.monotonic() < deadline:
            sender.check_link()
            time.sleep(0.01)
    listener.close()
    assert str(failure.value) == (
        f"queue a -> b: lost the link to the receiving stage at {address} during its secure handshake "
        "(its invocation stopped, or it is not a voxtral-run stage)"
    )
