"""NVIDIA MPS for the stage processes of one host: with a private control daemon, the encoder's and decoder's
processes on one GPU run their kernels side by side, where without it the GPU switches between them (their steps
then wait on each other's; docs/PERFORMANCE.md measures both)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console

from voxtral_run.runner.config import MPS_AUTO, MPS_OFF, MPS_ON, Pipeline
from voxtral_run.runner.errors import RunnerError

MPS_CONTROL = "nvidia-cuda-mps-control"
# Where NVIDIA's container images and drivers put it when it is not on PATH.
MPS_CONTROL_PLACES = ("/usr/local/nvidia/bin", "/usr/bin", "/usr/local/bin")
PIPE_VARIABLE = "CUDA_MPS_PIPE_DIRECTORY"  # a CUDA process finds its daemon here; the daemon reads it too
LOG_VARIABLE = "CUDA_MPS_LOG_DIRECTORY"
FOLDER_PREFIX = "voxtral-run-mps-"
CONTROL_TIMEOUT_S = 30.0  # starting the daemon, and quitting it once the stages are gone


def shared_gpus(pipelines: Iterable[Pipeline], local: Iterable[str]) -> dict[str, list[str]]:
    """The CUDA devices that two or more of this host's stage processes compute on, each with those stages
    (devices as placed: `place_local_stages` has made `auto` concrete)."""
    local = set(local)
    users: dict[str, list[str]] = {}
    for pipeline in pipelines:
        for name, stage in pipeline.stages.items():
            if name in local and stage.device.startswith("cuda"):
                device = stage.device if ":" in stage.device else "cuda:0"
                users.setdefault(device, []).append(name)
    return {device: names for device, names in users.items() if len(names) > 1}


def find_control() -> str | None:
    """The MPS control program: on PATH, else where NVIDIA installs it; None when there is none."""
    installed = (Path(place) / MPS_CONTROL for place in MPS_CONTROL_PLACES)
    return shutil.which(MPS_CONTROL) or next((str(path) for path in installed if os.access(path, os.X_OK)), None)


class MpsDaemon:
    """A control daemon of this run's own (its pipe and log folders private to it), whose variables the stage
    processes spawned while it runs inherit; `close` quits it and restores the environment."""

    def __init__(self, control: str):
        self.control = control
        self.folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
        self._saved = {variable: os.environ.get(variable) for variable in (PIPE_VARIABLE, LOG_VARIABLE)}
        self._variables = {PIPE_VARIABLE: str(self.folder / "pipe"), LOG_VARIABLE: str(self.folder / "log")}
        for path in self._variables.values():
            Path(path).mkdir()
        self._call(["-d"], "start")
        os.environ.update(self._variables)

    def _call(self, args: list[str], what: str, stdin: str | None = None) -> None:
        # Its output goes to a file: a pipe would stay open in the daemon it forks, and the wait would never end.
        said = self.folder / f"{what}.out"
        try:
            with said.open("w") as output:
                done = subprocess.run(
                    [self.control, *args],
                    input=stdin,
                    env=os.environ | self._variables,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=CONTROL_TIMEOUT_S,
                )
        except (OSError, subprocess.TimeoutExpired) as error:
            self._remove_folder()
            raise RunnerError(f"mps: {self.control} did not {what}: {error}") from None
        if done.returncode != 0:
            last = (said.read_text(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            self._remove_folder()
            raise RunnerError(f"mps: {self.control} did not {what}: {last}")

    def _remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self, console: Console) -> None:
        """Quit the daemon (its servers with it) once every stage process has exited, and restore the variables; a
        daemon that will not quit is a warning on `console`: the run's own outcome stands."""
        for variable, value in self._saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        try:
            self._call([], "quit", stdin="quit\n")
        except RunnerError as error:
            console.print(f"voxtral-run: warning: {error}", markup=False, soft_wrap=True)
        finally:
            self._remove_folder()


def start_mps(
    mode: str, pipelines: Iterable[Pipeline], local: Iterable[str], console: Console, *, quiet: bool = False
) -> MpsDaemon | None:
    """The daemon `mode` asks for this host's stages: `on` always (a RunnerError when it cannot start), `auto` when
    two stage processes share a GPU and the control program is there, `off` never; none either when the operator
    runs MPS already (its pipe folder is in the environment). Unless `quiet`, says so on `console`."""
    if mode == MPS_OFF or PIPE_VARIABLE in os.environ:
        return None
    shared = shared_gpus(pipelines, local)
    if mode == MPS_AUTO and not shared:
        return None
    control = find_control()
    if control is None:
        if mode == MPS_ON:
            raise RunnerError(f"mps: on, but {MPS_CONTROL} is not installed (it comes with NVIDIA's driver); mps: off")
        return None
    daemon = MpsDaemon(control)
    if not quiet:
        sharing = "; ".join(f"{', '.join(names)} on {device}" for device, names in shared.items())
        console.print(f"voxtral-run: NVIDIA MPS on{f' ({sharing})' if sharing else ''}", highlight=False)
    return daemon


def with_mps_hint(error: RunnerError, daemon: MpsDaemon | None) -> RunnerError:
    """A stage's CUDA failure under the daemon the run started, with what to do if MPS is the cause (another
    user's MPS server or the GPU's compute mode can keep this one from serving); other errors as they are."""
    if daemon is None or "CUDA" not in str(error):
        return error
    return RunnerError(f"{error} (under the NVIDIA MPS this run started: mps: off runs without it)")


@contextlib.contextmanager
def mps_for(
    mode: str, pipelines: Iterable[Pipeline], local: Iterable[str], console: Console, *, quiet: bool = False
) -> Iterator[None]:
    """`start_mps` around a block that starts and stops the stage processes."""
    daemon = start_mps(mode, pipelines, local, console, quiet=quiet)
    try:
        yield
    except RunnerError as error:
        raise with_mps_hint(error, daemon) from None
    finally:
        if daemon is not None:
            daemon.close(console)
