"""Credit-bounded queues: capacity is exact, policies block or drop as declared, end of stream is never lost."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from voxtral_run.runner.edges import EdgeReceiver, EdgeSender, EdgeSpec, Policy
from voxtral_run.runner.wire import Envelope, Kind


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
    sender.annotate([0.08, 0.08])  # a dropped chunk
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
