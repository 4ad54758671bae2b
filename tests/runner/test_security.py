"""A split run on loopback tcp under attack from a peer without the key, and a keyed peer that misbehaves."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import yaml
import zmq

from tests.runner.conftest import wait_until_gone, write_noise_wav, write_toy_pipeline
from tests.runner.test_cli import expected_ids, jsonl_events, one_error_line
from tests.runner.test_pipeline_model import free_port_block
from voxtral_run.runner.security import KEYS_VARIABLE, load_or_create_key_file
from voxtral_run.runner.wire import Envelope, Kind, encode

HERE = "capture,output"  # the capture and the sink; the relay and the last stage run in the other invocation
THERE = "relay,detokenize"
RUN_TIMEOUT_S = 60


def split_pipeline(tmp_path: Path, **top: object) -> tuple[Path, int]:
    """The toy pipeline on a free block of ports: queue 0 (capture -> relay) and 2 (detokenize -> output) cross."""
    path = write_toy_pipeline(tmp_path / "split.yaml")
    data = yaml.safe_load(path.read_text())
    base = free_port_block(3)
    data |= {"base_port": base, **top}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, base


def start_split(runner, tmp_path: Path, wav: Path, **top: object):
    """Both invocations with a shared key file; the one with the sink writes JSONL to stdout."""
    runner.env[KEYS_VARIABLE] = str(tmp_path / "curve.key")
    pipeline, base = split_pipeline(tmp_path, **top)
    there = runner.start(pipeline, "--stages", THERE)
    here = runner.start(pipeline, "--stages", HERE, "--input", wav, "--realtime", "--format", "jsonl")
    return here, there, base


def finish(process, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


class Attacker:
    """Keeps attacking the data ports of a run from another thread until stopped."""

    def __init__(self, ports: list[int], attack):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ports, attack), daemon=True)
        self._thread.start()

    def _run(self, ports, attack) -> None:
        while not self._stop.is_set():
            for port in ports:
                attack(port)
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def zmq_attack(port: int, public: bytes | None = None) -> None:
    """A DEALER without the key (plain, or CURVE with keys of its own) that says hello, sends garbage, a fake end
    of stream and a fake delta for an unknown stream id, then idles connected."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if public is not None:
        dealer.curve_serverkey = public
        dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
    dealer.routing_id = b"relay->detokenize" if port % 3 == 2 else b"capture->relay"
    dealer.connect(f"tcp://127.0.0.1:{port}")
    fake_delta = {"type": "delta", "text": " INJECTED TEXT", "token_ids": [1], "start_s": 0.0, "end_s": 0.08}
    for frames in (
        [b"voxtral-run hello"],
        [b"\xff\x00garbage"],
        [bytes(frame) for frame in encode(Envelope("deadbeef", 0, 0.0, Kind.EOS))],
        [bytes(frame) for frame in encode(Envelope("deadbeef", 0, 0.0, Kind.DATA, fake_delta))],
    ):
        dealer.send_multipart(frames, zmq.NOBLOCK)
    time.sleep(0.2)
    dealer.close()


def oversized_frame_attack(port: int) -> None:
    """A raw connection: a ZMTP 3 greeting (NULL mechanism), then a frame header claiming 10 GiB and data."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)
            raw.sendall(greeting + b"\x02" + struct.pack(">Q", 10 << 30))
            for _ in range(64):
                raw.sendall(bytes(1 << 16))
    except OSError:  # the stage hung up on it: what should happen
        pass


def test_attacks_without_the_key_are_rejected_and_the_run_gives_the_solo_ids(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 2.0)
    # The attacker even knows the public key (it is no secret): it still lacks the secret one.
    public = load_or_create_key_file(tmp_path / "curve.key", "--keys").public
    here, there, base = start_split(runner, tmp_path, wav)

    def attack(port: int) -> None:
        zmq_attack(port)
        zmq_attack(port, public)
        oversized_frame_attack(port)

    attacker = Attacker([base, base + 2], attack)
    try:
        status, out, err = finish(here)
    finally:
        attacker.stop()
    assert status == 0, err
    events = jsonl_events(out)
    assert events[-1]["token_ids"] == expected_ids(wav)
    assert "INJECTED" not in out
    assert finish(there, 20)[0] == 0
    assert wait_until_gone(runner.marker) == []


def test_a_keyed_peer_that_is_not_the_sender_fails_the_run_in_one_line(runner, tmp_path):
    """A peer holding the key but not the queue's sender is refused: one line naming the queue, on both sides."""
    wav = write_noise_wav(tmp_path / "a.wav", 3.0)
    keys = load_or_create_key_file(tmp_path / "curve.key", "--keys")
    here, there, base = start_split(runner, tmp_path, wav, heartbeat_timeout_s=2)

    def keyed_garbage(port: int) -> None:
        context = zmq.Context.instance()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.curve_serverkey = dealer.curve_publickey = keys.public
        dealer.curve_secretkey = keys.secret
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send_multipart([b"\xff\x00garbage"])
        time.sleep(0.2)
        dealer.close()

    attacker = Attacker([base + 2], keyed_garbage)
    try:
        status, _, err = finish(here)
    finally:
        attacker.stop()
    assert status == 1
    assert one_error_line(err) == (
        "voxtral-run: error: queue detokenize -> output: a message from a peer that is not this queue's sender"
    )
    status, _, err = finish(there, 20)
    assert status == 1 and "lost the link" in one_error_line(err)  # whichever queue to this half noticed first
    assert wait_until_gone(runner.marker) == []


def test_the_other_half_dying_fails_the_run_within_the_timeout(runner, tmp_path):
    """SIGKILL of the other invocation's runner: its stages die with it, and this half fails in one line."""
    wav = write_noise_wav(tmp_path / "a.wav", 10.0)
    here, there, _ = start_split(runner, tmp_path, wav, heartbeat_timeout_s=2)
    deadline = time.monotonic() + 30
    while "ready in" not in (here.stderr.readline() if here.poll() is None else "ready in"):
        assert time.monotonic() < deadline
    time.sleep(0.5)  # audio is flowing
    there.kill()
    killed_at = time.monotonic()
    status, _, err = finish(here)
    assert status == 1 and time.monotonic() - killed_at < 2 + 3
    assert "lost the link" in one_error_line(err)
    assert wait_until_gone(runner.marker) == []
