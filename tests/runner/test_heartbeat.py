"""The heartbeats' threads: closing either side ends its thread at once, not after a beat interval."""

from __future__ import annotations

import time

import zmq

from voxtral_run.runner.heartbeat import RunnerHeartbeat, StageHeartbeat


def test_closing_a_heartbeat_does_not_wait_for_its_next_beat(tmp_path) -> None:
    """With a 20 s timeout (a beat every 5 s) both sides close well within a second, while beating."""
    context = zmq.Context()
    try:
        runner = RunnerHeartbeat(context, f"ipc://{tmp_path / 'beats'}", timeout_s=20.0)
        runner.watch(["stage"])
        stage = StageHeartbeat(context, runner.endpoint, "stage", timeout_s=20.0)
        time.sleep(0.5)  # both threads have beaten and wait for their next beat, 4.5 s away
        for heartbeat in (stage, runner):
            started = time.monotonic()
            heartbeat.close()
            assert time.monotonic() - started < 1.0
    finally:
        context.destroy(linger=0)
