"""Runner test helpers: run voxtral-run as a child process tagged with a marker, and find or kill what is left."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

REPO = Path(__file__).resolve().parents[2]
MARKER_VARIABLE = "VOXTRAL_RUN_TEST_MARKER"
TOY = "tests.runner.toy_stages"


def marked_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries the marker."""
    found = []
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def wait_until_gone(marker: str, timeout_s: float = 2.0) -> list[int]:
    """Processes still carrying the marker after waiting up to timeout_s for them to exit."""
    deadline = time.monotonic() + timeout_s
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


class Runner:
    """Starts `python -m runner` in the repository with a marker in its environment."""

    def __init__(self, marker: str):
        self.marker = marker
        # SPT_NOENV keeps setproctitle from overwriting the environment, where the marker is looked up.
        self.env = os.environ | {MARKER_VARIABLE: marker, "PYTHONPATH": str(REPO), "SPT_NOENV": "1"}

    def start(self, *args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "runner", *map(str, args)],
            cwd=REPO,
            env=self.env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *args: str, input_bytes: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "runner", *map(str, args)],
            cwd=REPO,
            env=self.env,
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )


def write_toy_pipeline(path: Path, *, relay: dict | None = None, capacity: int = 4, policy: str = "block") -> Path:
    """capture -> relay (Passthrough) -> detokenize (ToyTranscriber) -> output."""
    data = {
        "stages": {
            "capture": {},
            "relay": {"impl": f"{TOY}:Passthrough", **(relay or {})},
            "detokenize": {"impl": f"{TOY}:ToyTranscriber"},
        },
        "queues": [
            {"from": "capture", "to": "relay", "capacity": capacity, "policy": policy},
            {"from": "relay", "to": "detokenize", "capacity": 4},
            {"from": "detokenize", "to": "output", "capacity": 4},
        ],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_noise_wav(path: Path, seconds: float, rate: int = 16000, channels: int = 1, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    soundfile.write(
        path, (rng.standard_normal((int(seconds * rate), channels)) * 0.1).astype(np.float32), rate, "PCM_16"
    )
    return path


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A Ray cluster of two nodes on this machine (Ray's own test utility), `host_a` and `host_b` as custom
    resources, its address; shut down after the session, leaving no Ray process."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Ray's worker processes import the toy stages from the repository.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), previous]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "resources": {"host_a": 1}})
    cluster.add_node(num_cpus=8, resources={"host_b": 1})
    cluster.wait_for_nodes()
    address = cluster.address
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        yield address
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
        assert not _ray_processes(address), "Ray processes left after the cluster's shutdown"


def _ray_processes(address: str) -> list[int]:
    """Live processes whose command line names the cluster's address (its raylets, GCS, workers)."""
    deadline = time.monotonic() + 10
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and address.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
