"""A progress bar on stderr while a file is transcribed: audio seconds done, speed in times real time, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text


class _SpeedColumn(ProgressColumn):
    """Audio seconds transcribed per wall-clock second since the stream started."""

    def render(self, task: Task) -> Text:
        if not task.elapsed or not task.completed:
            return Text("-- x real time")
        return Text(f"{task.completed / task.elapsed:.1f}x real time")


class AudioProgress:
    """How far the transcript has come through a file of `total_s` seconds of audio."""

    def __init__(self, console: Console, total_s: float):
        self._progress = Progress(
            TextColumn("transcribing"),
            BarColumn(),
            TextColumn("{task.completed:.1f} / {task.total:.1f} s of audio"),
            _SpeedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=True,  # the bar is gone once the run ends; the table and the transcript stay
        )
        self._task = self._progress.add_task("audio", total=total_s)
        self._total_s = total_s
        self._progress.start()

    def update(self, done_s: float) -> None:
        """The transcript now covers the first `done_s` seconds of the audio."""
        self._progress.update(self._task, completed=min(done_s, self._total_s))

    def close(self) -> None:
        self._progress.stop()
