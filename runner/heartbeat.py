"""Heartbeats between the runner and its stage processes, on their own socket and threads.

Each side beats from a thread, so a stage busy in a long model call, or a runner blocked writing its output, still
beats; a process that is stopped (SIGSTOP) or frozen beats no more. The runner fails the run naming a stage silent
past the timeout; a stage whose runner is silent that long exits, so nothing is left running without it. A
checker that was itself stopped (Ctrl-Z, then fg) restarts its clocks instead of blaming the others.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable

import zmq

from voxtral_run.runner.security import CurveKeys, make_client, make_server

BEAT = b""
BEATS_PER_TIMEOUT = 4
EXIT_RUNNER_SILENT = 1


def beat_identity(name: str) -> bytes:
    return name.encode()


class _Stop:
    """A beating thread's stop signal: a flag, and an inproc pair that wakes the thread's poll at once (else a
    run's end would wait up to a beat interval for the thread to notice)."""

    def __init__(self, context: zmq.Context):
        endpoint = f"inproc://voxtral-run-heartbeat-stop-{id(self)}"
        self.flag = threading.Event()
        self.receiver = context.socket(zmq.PAIR)
        self.receiver.bind(endpoint)
        self._sender = context.socket(zmq.PAIR)
        self._sender.connect(endpoint)

    def poller(self, socket: zmq.Socket) -> zmq.Poller:
        """A poller of `socket` that also returns as soon as the stop is set."""
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(self.receiver, zmq.POLLIN)
        return poller

    def set(self) -> None:
        self.flag.set()
        self._sender.send(b"")

    def close(self) -> None:
        """Once the thread has ended."""
        self.receiver.close(linger=0)
        self._sender.close(linger=0)


class RunnerHeartbeat:
    """The runner's side: a ROUTER at `endpoint` beating to every stage and noting when each last beat; over tcp,
    a CURVE server with `keys`, and `endpoint` may leave the port to the OS (`tcp://HOST:*`)."""

    def __init__(self, context: zmq.Context, endpoint: str, timeout_s: float, keys: CurveKeys | None = None):
        self.timeout_s = timeout_s
        self._interval_s = timeout_s / BEATS_PER_TIMEOUT
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            make_server(self._socket, keys)
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)  # where the stages connect
        self._last_seen: dict[str, float] = {}
        self._names: list[str] = []
        self._lock = threading.Lock()
        self._stop = _Stop(context)
        self._thread = threading.Thread(target=self._run, name="voxtral-run heartbeat", daemon=True)
        self._thread.start()
        self._last_check = time.monotonic()

    def watch(self, names: Iterable[str]) -> None:
        """Beat to these stages from now on; each is watched from its first beat."""
        with self._lock:
            self._names = list(names)

    def _run(self) -> None:
        poller = self._stop.poller(self._socket)
        while not self._stop.flag.is_set():
            with self._lock:
                names = list(self._names)
            for name in names:
                try:
                    self._socket.send_multipart([beat_identity(name), BEAT], zmq.NOBLOCK)
                except zmq.ZMQError:  # not connected yet, or gone: the main loop judges
                    pass
            deadline = time.monotonic() + self._interval_s
            while (left := deadline - time.monotonic()) > 0:
                ready = dict(poller.poll(int(left * 1000) + 1))
                if self._socket not in ready:  # the interval is over, or the stop came
                    break
                identity, *_ = self._socket.recv_multipart()
                with self._lock:
                    self._last_seen[identity.decode(errors="replace")] = time.monotonic()

    def silent(self) -> list[str]:
        """Stages that beat once and then stayed silent past the timeout (none right after this process itself
        was stopped, whose clocks restart)."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_check > self.timeout_s / 2:  # we were stopped ourselves: no one is to blame
                self._last_seen = dict.fromkeys(self._last_seen, now)
            self._last_check = now
            return [name for name, seen in self._last_seen.items() if now - seen > self.timeout_s]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._stop.close()
        self._socket.close()


class StageHeartbeat:
    """A stage's side: a DEALER beating to the runner; exits the process when the runner is silent too long."""

    def __init__(self, context: zmq.Context, endpoint: str, name: str, timeout_s: float, keys: CurveKeys | None = None):
        self._name = name
        self._timeout_s = timeout_s
        self._interval_s = timeout_s / BEATS_PER_TIMEOUT
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, beat_identity(name))
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            make_client(self._socket, keys)
        self._socket.connect(endpoint)
        self._stop = _Stop(context)
        self._thread = threading.Thread(target=self._run, name="voxtral-run heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = self._stop.poller(self._socket)
        heard = checked = time.monotonic()
        while not self._stop.flag.is_set():
            try:
                self._socket.send(BEAT, zmq.NOBLOCK)
            except zmq.Again:
                pass
            if self._socket in dict(poller.poll(int(self._interval_s * 1000))):
                while self._socket.poll(0, zmq.POLLIN):
                    self._socket.recv()
                heard = time.monotonic()
            now = time.monotonic()
            if now - checked > self._timeout_s / 2:  # this process was stopped: the runner is not to blame
                heard = now
            checked = now
            if now - heard > self._timeout_s and not self._stop.flag.is_set():
                silent = f"the runner has been silent for {self._timeout_s:g} s"
                sys.stderr.write(f"voxtral-run: stage '{self._name}': {silent}; exiting\n")
                sys.stderr.flush()
                os._exit(EXIT_RUNNER_SILENT)  # the main thread may be blocked anywhere: leave at once

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._stop.close()
        self._socket.close()
