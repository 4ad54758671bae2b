"""The built wheel installs everything under `voxtral_run` (no generic top-level `runner`, `stages`, `tools`) and
the installed copy works on its own: from outside the repository, with no PYTHONPATH, through its console scripts."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "voxtral_run"
SUBPACKAGES = ("runner", "stages", "tools")
SCRIPTS = {
    "voxtral-run": "voxtral_run.runner.cli:main",
    "voxtral-tiny-checkpoint": "voxtral_run.tools.make_tiny_checkpoint:main",
}
RUN_TIMEOUT_S = 180


def project_version() -> str:
    """The version pyproject.toml declares (read as text: tomllib is not in Python 3.10)."""
    project = (REPO / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    assert match, "pyproject.toml has no [project] version"
    return match.group(1)


def copy_sources(dest: Path) -> Path:
    """Copy the files git knows about (tracked or untracked, not ignored) that exist, so the build sees no
    build/, *.egg-info or caches left in the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would point Python at the repository or another venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"}
    return {key: value for key, value in os.environ.items() if key not in drop}


def run(command: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a command in its own session with the clean environment; kill what is left of its group afterwards."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # stage processes the runner may have left behind
        except ProcessLookupError:
            pass
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Fail with the command's output when it did not exit 0."""
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result


def borrow_site_packages(env_dir: Path) -> None:
    """When this interpreter is itself a venv, --system-site-packages reaches only the base interpreter's packages:
    hand the new venv this one's site-packages too (as a .pth that runs site.addsitedir, so their .pth files count)."""
    if sys.prefix == sys.base_prefix:
        return
    purelib = run(
        [str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=env_dir
    )
    lines = [f"import site; site.addsitedir({directory!r})" for directory in site.getsitepackages()]
    (Path(check(purelib).stdout.strip()) / "_borrowed_site_packages.pth").write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    elsewhere: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.venv / "bin" / name


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build a wheel from a copy of the sources and install it (no deps, no index) into a venv that borrows the
    system's site-packages for torch and the other dependencies."""
    root = tmp_path_factory.mktemp("packaging")
    source = copy_sources(root / "source")
    wheels = root / "wheels"
    check(
        run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
            cwd=root,
        )
    )
    (wheel,) = wheels.glob("*.whl")
    env_dir = root / "venv"
    # The system pip serves the venv through --system-site-packages, so the venv needs none of its own.
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    borrow_site_packages(env_dir)
    # --ignore-installed: the system site-packages holds the repository's editable install of the same version,
    # which pip would otherwise take as already satisfying the wheel.
    check(
        run(
            [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
            + ["--disable-pip-version-check", str(wheel)],
            cwd=root,
        )
    )
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return Installed(wheel, env_dir, elsewhere)


@pytest.mark.slow
def test_wheel_holds_only_voxtral_run(installed: Installed) -> None:
    """Every module in the wheel lies under voxtral_run/; nothing else but the dist-info is top level."""
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        dist_info = next(name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {PACKAGE, dist_info}
    assert not top_level & set(SUBPACKAGES)
    modules = [name for name in names if name.endswith((".py", ".pyc", ".so"))]
    assert modules and all(name.startswith(f"{PACKAGE}/") for name in modules)
    for sub in SUBPACKAGES:
        assert f"{PACKAGE}/{sub}/__init__.py" in names
    assert f"{PACKAGE}/runner/cli.py" in names
    assert f"{PACKAGE}/tools/make_tiny_checkpoint.py" in names
    assert not any("/tests/" in f"/{name}" for name in names)
    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == SCRIPTS


@pytest.mark.slow
def test_installed_copy_wins_and_no_generic_names(installed: Installed) -> None:
    """From outside the repository the venv imports its own installed voxtral_run (not the system's editable
    install pointing at the checkout), and `runner` / `stages` / `tools` are not importable at all."""
    code = (
        "import voxtral_run.stages.factory, voxtral_run.runner.cli, voxtral_run.tools.make_tiny_checkpoint\n"
        "print(voxtral_run.stages.factory.__file__)\n"
        "print(voxtral_run.runner.cli.__file__)\n"
        "print(voxtral_run.tools.make_tiny_checkpoint.__file__)\n"
    )
    result = check(run([str(installed.python), "-c", code], cwd=installed.elsewhere))
    files = [Path(line) for line in result.stdout.split()]
    assert len(files) == 3
    for file in files:
        assert file.is_relative_to(installed.venv), file
        assert not file.resolve().is_relative_to(REPO), file
    for name in SUBPACKAGES:
        probe = (
            f"try:\n    import {name}\nexcept ModuleNotFoundError as error:\n    print(error.name)\n"
            f"else:\n    print('imported', {name}.__file__)"
        )
        result = check(run([str(installed.python), "-c", probe], cwd=installed.elsewhere))
        assert result.stdout.strip() == name, f"`import {name}` should fail, got: {result.stdout}"


@pytest.mark.slow
def test_console_scripts_run_from_anywhere(installed: Installed) -> None:
    """The installed console scripts, run outside the repository, print the version, write a tiny checkpoint,
    and transcribe the example with the built-in default pipeline (model stages on the CPU here)."""
    result = check(run([str(installed.script("voxtral-run")), "--version"], cwd=installed.elsewhere))
    assert result.stdout.strip() == f"voxtral-run {project_version()}"

    model = installed.elsewhere / "tiny-model"
    check(run([str(installed.script("voxtral-tiny-checkpoint")), str(model)], cwd=installed.elsewhere))
    for name in ("params.json", "consolidated.safetensors", "tekken.json"):
        assert (model / name).is_file(), f"voxtral-tiny-checkpoint wrote no {name}"

    audio = REPO / "examples" / "hello.wav"
    command = [str(installed.script("voxtral-run")), str(audio), "--model", str(model), "--quiet"]
    result = check(run(command, cwd=installed.elsewhere))
    assert result.stdout.strip(), f"no transcript on stdout; stderr:\n{result.stderr}"
