"""The page at / in headless Chromium, its microphone a fake device fed from a WAV file: press Start, then Stop,
and the page shows the transcript, the final usage and the per-token latency, in either dialect."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import speechlike_audio
from tests.runner.serve.conftest import write_wav

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
PAGE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory) -> Iterator[str]:
    """Headless Chromium on the page, hearing a WAV file; its DevTools WebSocket URL."""
    folder = tmp_path_factory.mktemp("chromium")
    wav = write_wav(folder / "talk.wav", speechlike_audio(3.0, seed=18))
    profile = folder / "profile"
    command = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
        f"--user-data-dir={profile}", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required", "about:blank",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ports = profile / "DevToolsActivePort"
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while not (ports.exists() and len(ports.read_text().splitlines()) == 2):
            assert process.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.05)
        port, path = ports.read_text().splitlines()
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the browser and the processes it started
        process.wait()


class DevTools:
    """Just enough of the DevTools protocol: open a page and evaluate JavaScript in it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.number = 0
        self.session: str | None = None

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.number += 1
        message = {"id": self.number, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self.ws.send(json.dumps(message))
        while (answer := json.loads(await asyncio.wait_for(self.ws.recv(), PAGE_TIMEOUT_S))).get("id") != self.number:
            pass
        assert "error" not in answer, answer
        return answer["result"]

    async def open(self, url: str) -> None:
        target = await self.call("Target.createTarget", url=url)
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session = attached["sessionId"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True)
        return result["result"].get("value")

    async def until(self, expression: str) -> Any:
        """The value of `expression` once it is truthy."""
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                status = await self.evaluate(text_of("status"))
                raise AssertionError(f"the page never showed {expression}; its status: {status}")
            await asyncio.sleep(0.1)
        return value


def text_of(element: str) -> str:
    return f"document.getElementById('{element}').textContent"


@pytest.mark.parametrize("dialect", ["vllm", "openai"])
def test_the_page_shows_the_transcript_of_the_microphone(server, browser, dialect):
    async def speak() -> tuple[str, str, str]:
        async with connect(browser, proxy=None, max_size=None) as ws:
            page = DevTools(ws)
            await page.open(f"{server.http}/")
            await page.until("document.readyState === 'complete' && document.getElementById('toggle') !== null")
            await page.evaluate(f"document.getElementById('dialect').value = '{dialect}'")
            await page.evaluate("document.getElementById('toggle').click()")
            await page.until(f"{text_of('status')}.startsWith('Listening')")
            await page.until(f"{text_of('transcript')}.length > 0")
            await page.evaluate("document.getElementById('toggle').click()")
            status = await page.until(f"{text_of('status')}.startsWith('Done') && {text_of('status')}")
            return status, await page.evaluate(text_of("transcript")), await page.evaluate(text_of("latency"))

    status, transcript, latency = asyncio.run(speak())
    assert transcript.strip()
    usage = json.loads(status.removeprefix("Done: "))
    assert usage["completion_tokens" if dialect == "vllm" else "output_tokens"] > 0
    assert latency.startswith("Latency per token beyond the delay: ") and " ms (p50 " in latency
