"""segue serve with one worker on the built-in model: submit -> progress (Server-Sent Events) -> content, cancel
mid-run, idempotency, a storyboard whose edit re-renders only its shot, and signed, retried webhooks."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from segue.media import read_video
from segue.serve.render import JobLost, Progress
from segue.serve.webhooks import verify
from serve_support import Server, png, submit, wait_done, wait_for

SECRET = "webhook-secret-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("serve-jobs") / "data"
    s = Server(data, "--workers", "1", "--threads", "1", "--lease", "10", "--webhook-secret", SECRET,
               "--webhook-backoff", "0.2", "--allow-private-webhooks").start()  # fmt: skip
    s.wait_workers(1)
    yield s
    assert s.stop() in (0, 143)
    assert "Traceback" not in s.output()


@pytest.fixture
def c(server: Server):
    with server.client() as client:
        yield client


def sse(c: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """Every event of the job's stream until the server ends it."""
    events, name = [], None
    with c.stream("GET", f"/v1/videos/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_progress_writes_every_step_and_throttles_only_the_middle_ones() -> None:
    writes: list[tuple[int, int, int]] = []

    def write(step: int, total: int, percent: int, eta: float | None, shot: int | None) -> bool:
        writes.append((step, total, percent))
        return True

    every = Progress(write, threading.Event(), min_interval=0.0)
    for step in range(5):
        every(step, 4)
    percents = [w[2] for w in writes]
    assert [w[0] for w in writes] == [0, 1, 2, 3, 4] and percents == sorted(percents) and percents[0] < percents[-1]
    writes.clear()
    throttled = Progress(write, threading.Event(), min_interval=1e9)
    for step in range(5):
        throttled(step, 4)
    assert [w[0] for w in writes] == [0, 4]  # the first and the last step are always written
    lost = threading.Event()
    held = Progress(lambda *a: False, lost, min_interval=0.0)  # the queue says the job is no longer held
    with pytest.raises(JobLost):
        held(0, 4)
    assert lost.is_set()


def test_submit_progress_content(c: httpx.Client, server: Server) -> None:
    job = submit(c, seed=3, steps="4", prompt="a ball rolls")
    assert job["status"] == "queued" and job["steps"] == 4 and job["settings"]["size"] == "16x16"
    events = sse(c, job["id"])
    # the stream samples the job as it changes: steps only go forward (each step is written: the next test)
    steps = [e["step"] for name, e in events if name == "in_progress"]
    assert steps and steps == sorted(steps) and all(0 <= s <= 4 for s in steps)
    name, last = events[-1]
    assert name == "completed" and last["progress"] == 100 and last["attempts"] == 1 and last["error"] is None
    assert last["report"]["frames"] == 5 and [k["frame"] for k in last["report"]["keyframes"]] == [0, 4]
    assert all(k["psnr"] > 5 for k in last["report"]["keyframes"])
    video = c.get(f"/v1/videos/{job['id']}/content")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = server.data / "downloaded.mp4"
    path.write_bytes(video.content)
    assert read_video(path).shape == (5, 16, 16, 3)
    thumb = Image.open(io.BytesIO(c.get(f"/v1/videos/{job['id']}/content", params={"variant": "thumbnail"}).content))
    frames = zipfile.ZipFile(io.BytesIO(c.get(f"/v1/videos/{job['id']}/content", params={"variant": "frames"}).content))
    names = sorted(frames.namelist())
    assert names == [f"{i:05d}.png" for i in range(5)] and thumb.size == (16, 16)
    assert np.array_equal(np.asarray(thumb), np.asarray(Image.open(frames.open("00002.png"))))  # the middle frame
    outs = list((server.data / "jobs" / job["id"]).glob("out-*"))
    assert len(outs) == 1
    assert c.get(f"/v1/videos/{job['id']}/content", params={"variant": "gif"}).status_code == 422


def test_cancel_mid_run_stops_at_the_next_step(c: httpx.Client) -> None:
    job = submit(c, seed=4, steps="400")
    running = wait_for(lambda: (j := c.get(f"/v1/videos/{job['id']}").json())["step"] >= 2 and j, 60, "steps")
    assert running["status"] == "in_progress" and running["eta_s"] > 0
    first = c.post(f"/v1/videos/{job['id']}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    again = c.post(f"/v1/videos/{job['id']}/cancel")  # idempotent
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    after = c.get(f"/v1/videos/{job['id']}").json()
    assert after["step"] < 400
    assert c.get(f"/v1/videos/{job['id']}/content").status_code == 409
    follow = submit(c, seed=5)  # the worker is free again at once
    assert wait_done(c, follow["id"])["status"] == "completed"
    assert c.get(f"/v1/videos/{job['id']}").json()["step"] <= after["step"] + 1  # it stopped
    assert c.post(f"/v1/videos/{follow['id']}/cancel").status_code == 409  # completed: nothing to cancel


def test_the_same_idempotency_key_returns_the_same_job(c: httpx.Client) -> None:
    files = {"first": ("a.png", png(7), "image/png")}
    first = c.post("/v1/videos", data={"frames": "5", "steps": "1", "size": "16x16"}, files=files,
                   headers={"Idempotency-Key": "key-1"})  # fmt: skip
    second = c.post("/v1/videos", data={"frames": "5", "steps": "1", "size": "16x16"}, files=files,
                    headers={"Idempotency-Key": "key-1"})  # fmt: skip
    assert first.status_code == 201 and second.status_code == 200 and second.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == second.json()["id"]
    listed = [j["id"] for j in c.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert listed.count(first.json()["id"]) == 1
    assert wait_done(c, first.json()["id"])["status"] == "completed"


def test_a_storyboard_re_renders_only_the_changed_shot(c: httpx.Client) -> None:
    story = {"settings": {"steps": 1, "size": "16x16", "seed": 2},
             "keyframes": [{"image": "a"}, {"image": "b"}, {"image": "c"}],
             "shots": [{"prompt": "left", "frames": 5}, {"prompt": "right", "frames": 5}]}  # fmt: skip

    def send(last_seed: int) -> dict:
        files = {k: (f"{k}.png", png(s), "image/png") for k, s in (("a", 11), ("b", 12), ("c", last_seed))}
        r = c.post("/v1/videos", data={"story": json.dumps(story)}, files=files)
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "story" and r.json()["settings"]["story"] == story
        return wait_done(c, r.json()["id"])

    one = send(13)
    assert one["status"] == "completed" and one["report"]["frames"] == 9
    assert [s["reused"] for s in one["report"]["shots"]] == [False, False]
    two = send(14)  # the last keyframe changed: the first shot comes from the cache
    assert [s["reused"] for s in two["report"]["shots"]] == [True, False]
    assert len(two["report"]["keyframes"]) == 3


class Receiver(BaseHTTPRequestHandler):
    """Answers 500 to the first delivery and 200 after; records what it got."""

    got: list[tuple[bytes, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append((body, self.headers["Segue-Signature"]))
        self.send_response(500 if len(Receiver.got) == 1 else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhooks_are_signed_and_retried(c: httpx.Client) -> None:
    hook = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/done"
        job = submit(c, seed=8, steps="1", webhook_url=url)
        assert wait_done(c, job["id"])["status"] == "completed"
        wait_for(lambda: c.get(f"/v1/videos/{job['id']}").json()["webhook"]["state"] == "delivered", 30, "delivery")
    finally:
        hook.shutdown()
    assert len(Receiver.got) == 2  # refused once, then delivered
    for body, signature in Receiver.got:
        assert verify(SECRET, body, signature) and not verify("another-secret", body, signature)
        assert json.loads(body)["id"] == job["id"] and json.loads(body)["status"] == "completed"
    assert c.get(f"/v1/videos/{job['id']}").json()["webhook"]["attempts"] == 2


def frames_of(c: httpx.Client, job_id: str) -> list[np.ndarray]:
    zf = zipfile.ZipFile(io.BytesIO(c.get(f"/v1/videos/{job_id}/content", params={"variant": "frames"}).content))
    return [np.asarray(Image.open(io.BytesIO(zf.read(n)))) for n in sorted(zf.namelist())]


def test_a_remix_renders_the_same_clip_again_and_a_new_seed_changes_it(c: httpx.Client) -> None:
    src = submit(c, seed=5, steps="2", prompt="a ball")
    assert wait_done(c, src["id"])["status"] == "completed"
    same = c.post(f"/v1/videos/{src['id']}/remix").json()
    other = c.post(f"/v1/videos/{src['id']}/remix", json={"seed": 6}).json()
    for job in (same, other):
        assert wait_done(c, job["id"])["status"] == "completed" and job["remix_of"] == src["id"]
    a, b, d = frames_of(c, src["id"]), frames_of(c, same["id"]), frames_of(c, other["id"])
    assert len(a) == len(b) == len(d) == 5
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # same inputs, settings and seed
    assert not all(np.array_equal(x, y) for x, y in zip(a[1:-1], d[1:-1], strict=True))
