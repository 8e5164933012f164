"""Shared pieces of the studio page's browser tests: a real `segue serve` on loopback, Debian's Chromium
driven by Playwright, console errors collected per page, keyframe images, and small PNG screenshots.

Screenshots go to a temporary folder, or to ``SEGUE_STUDIO_SCREENSHOTS`` when set (``docs/images`` refreshes
the README's pictures).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
SERVER_START_S = 120  # the model loads in the worker; the API answers before
JOB_S = 300  # bound on one small job of the built-in model on a 2-core machine busy with other work (a guard)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`segue serve` on 127.0.0.1 with the built-in model, one worker and its own data folder."""

    def __init__(self, data: Path, token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log = data.parent / f"{data.name}.log"
        cmd = [sys.executable, "-m", "segue", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data", str(data), "--workers", "1", "--threads", "2"]  # fmt: skip
        if token:
            cmd += ["--token", token]
        env = {k: v for k, v in os.environ.items() if k != "SEGUE_TOKEN"}  # a token only where a test gives one
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"segue serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self.request("GET", "/health")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"segue serve did not answer /health in {SERVER_START_S} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
        """(status, parsed JSON or bytes) of one request, with the token when the server has one."""
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                status, data, kind = res.status, res.read(), res.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, data, kind = e.code, e.read(), e.headers.get("content-type", "")
        return status, (json.loads(data) if "json" in kind and data else data)

    def post_form(self, fields: dict[str, str], files: dict[str, bytes]):
        """POST /v1/videos with multipart form data, as a browser sends it."""
        boundary = "segue-test-boundary"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]  # fmt: skip
        for name, data in files.items():
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                    "Content-Type: image/png\r\n\r\n")  # fmt: skip
            parts.append(head.encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", "/v1/videos", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def job(self, job_id: str) -> dict[str, Any]:
        status, job = self.request("GET", f"/v1/videos/{job_id}")
        assert status == 200, (status, job)
        return job

    def wait(self, job_id: str, statuses: tuple[str, ...], timeout: float = JOB_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not {statuses} in {timeout} s: {job}\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server's own process group
                self.proc.wait(10)


class Console:
    """Every console error and uncaught exception of a page; ``allow`` names expected network refusals."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.allowed: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def allow(self, pattern: str) -> None:
        self.allowed.append(pattern)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(re.search(p, e) for p in self.allowed)]


def keyframe(i: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A PNG keyframe: a dark disc at a place that moves with i, on a sky colour that changes with i."""
    w, h = size
    colours = [(70, 130, 220), (230, 140, 60), (60, 170, 90), (200, 60, 120), (120, 90, 200)]
    im = Image.new("RGB", size, colours[i % len(colours)])
    d = ImageDraw.Draw(im)
    x, r = int(w * (0.15 + 0.15 * i)), max(4, w // 6)
    d.ellipse([x, h // 2 - r, x + 2 * r, h // 2 + r], fill=(25, 25, 30))
    d.rectangle([0, int(h * 0.8), w, h], fill=(150, 100, 50))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def clip_keyframes(seed: int, picks: tuple[int, ...], size: int = 64) -> tuple[list[Image.Image], str]:
    """Frames ``picks`` of a procedural clip like those the built-in model learned from, and its caption."""
    from segue.data.synthetic import make_clip

    clip = make_clip(seed, frames=17, size=(size, size))
    return [Image.fromarray(clip.frames[i]) for i in picks], clip.caption


def png(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> bytes:
    """PNG bytes of ``image``, cropped to ``box`` (left, top, right, bottom) when given."""
    buf = io.BytesIO()
    (image.crop(box) if box else image).save(buf, format="PNG")
    return buf.getvalue()


def file_payload(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "mimeType": "image/png", "buffer": data}


def drop_file(page, selector: str, name: str, data: bytes) -> None:
    """Drags a PNG file from outside the page onto ``selector`` (dragover, then drop)."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            return dt;
        }""",
        [name, base64.b64encode(data).decode()],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def screenshot(page, folder: Path, name: str, full_page: bool = True) -> Path:
    """A PNG of the page in 256 colours (small enough for the README)."""
    raw = page.screenshot(full_page=full_page)
    im = Image.open(io.BytesIO(raw)).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    im.save(path, optimize=True)
    return path


# Records a job card's progress bar and text, and its shots' states, at every change (installed before submit).
WATCH_JS = """() => {
    window.__seen = [];
    const record = () => {
        for (const card of document.querySelectorAll(".job")) {
            const bar = card.querySelector("progress");
            window.__seen.push({
                id: card.dataset.id, status: card.dataset.status, value: bar.value,
                text: card.querySelector(".progress-text").textContent,
                shots: [...card.querySelectorAll(".shots li")].map((li) => li.textContent),
            });
        }
    };
    new MutationObserver(record).observe(document.body, {
        subtree: true, childList: true, attributes: true, characterData: true,
    });
}"""
