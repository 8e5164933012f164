"""segue serve without workers (no model in any process): every bad input is refused at submission with the
CLI's one-line message and its field, and no job is created; caps on bytes and pixels; the token; listing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serve_support import Server, png, submit

TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("serve-input") / "data"
    s = Server(data, "--workers", "0", "--max-pixels", "40000", "--max-upload-mb", "0.25", token=TOKEN).start()
    yield s
    assert s.stop() in (0, 143)


@pytest.fixture
def c(server: Server):
    with server.client() as client:
        yield client


def post(c: httpx.Client, data: dict[str, str], files: dict[str, bytes]) -> httpx.Response:
    return c.post("/v1/videos", data=data, files={k: (k, v, "image/png") for k, v in files.items()})


@pytest.mark.parametrize(
    ("data", "files", "param", "words"),
    [
        ({}, {"first": b"not an image at all"}, "first", "first: the uploaded file is not an image format"),
        ({}, {"first": b""}, "first", "first: the uploaded file is empty"),
        ({"frames": "10"}, None, "frames", "frames must be 4n+1 (5, 9, ..., 81); got 10, nearest valid: 9 or 13"),
        ({"frames": "ten"}, None, "frames", "frames must be an integer, got 'ten'"),
        ({"solver": "heun"}, None, "solver", "unknown solver 'heun' (solver); choose one of: unipc, dpm++, euler, lcm"),
        ({"size": "8200x8200"}, None, "size", "size 8200x8200: this model covers at most 8192x8192 pixels"),
        ({"size": "20x16"}, None, "size", "not divisible by 8"),
        ({"size": "big"}, None, "size", "size must look like 1280x720"),
        ({"size": "16x16", "max_area": "256"}, None, "size", "give size or max_area, not both"),
        ({"guidance": "nan"}, None, "guidance", "guidance must be a finite number in [0, 50]"),
        ({"steps": "0"}, None, "steps", "steps must be an integer in [1, 1000]"),
        ({"seed": "-1"}, None, "seed", "seed must be an integer in [0"),
        ({"color_match": "maybe"}, None, "color_match", "color_match must be true or false"),
        ({"webhook_url": "file:///etc/passwd"}, None, "webhook_url", "webhook_url must be an http:// or https://"),
        ({"frame": "5"}, None, "frame", "unknown field 'frame'"),
        ({}, {"last": png(1)}, "first", "first: the first keyframe (an image file) is required"),
        ({}, {"first": png(1, 300, 300)}, "first", "300x300 = 90000 pixels; at most 40000 are allowed"),
    ],
)
def test_bad_input_is_422_with_the_cli_message_and_no_job(c: httpx.Client, data, files, param, words) -> None:
    before = c.get("/v1/videos", params={"limit": 100}).json()["data"]
    r = post(c, data, files if files is not None else {"first": png(1), "last": png(2)})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param
    assert "\n" not in err["message"] and "Traceback" not in r.text
    assert c.get("/v1/videos", params={"limit": 100}).json()["data"] == before


@pytest.mark.parametrize(
    ("story", "files", "words"),
    [
        ("{not json", {}, "story: JSON syntax error at line 1, column 2"),
        (json.dumps({"keyframes": [{"image": "a"}, {"image": "b"}], "shots": []}), {"a": png(1), "b": png(2)},
         "2 keyframes need 1 shot"),
        (json.dumps({"keyframes": [{"image": "a"}, {"image": "zz"}], "shots": [{}]}), {"a": png(1)},
         "keyframes[1] image names the upload field 'zz', which this request does not have"),
        (json.dumps({"keyframes": [{"image": "a"}, {"image": "b"}], "shots": [{"frames": 6}]}),
         {"a": png(1), "b": png(2)}, "shots[0]: frames must be 4n+1"),
        (json.dumps({"keyframes": [{"image": "a"}, {"image": "b"}], "shots": [{"solver": "heun"}]}),
         {"a": png(1), "b": png(2)}, "shots[0]: unknown solver 'heun'"),
        (json.dumps({"keyframes": [{"image": "a"}, {"image": "b"}], "shots": [{"prompt": "x", "speed": 2}]}),
         {"a": png(1), "b": png(2)}, "unknown key 'speed'"),
    ],
)  # fmt: skip
def test_bad_storyboards_are_422(c: httpx.Client, story: str, files: dict[str, bytes], words: str) -> None:
    r = post(c, {"story": story}, files)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["param"] == "story"


def test_a_body_over_the_cap_is_413_and_creates_nothing(c: httpx.Client) -> None:
    big = b"\0" * (300 * 1024)
    r = post(c, {}, {"first": big})
    assert r.status_code == 413
    assert "over the 262144 bytes allowed" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the cap counts what arrives
        head = b'--b\r\nContent-Disposition: form-data; name="first"; filename="a.png"\r\n\r\n'
        body = head + big + b"\r\n--b--\r\n"
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = c.post("/v1/videos", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert c.get("/v1/videos").json()["data"] == []


def test_every_route_but_health_needs_the_token(server: Server) -> None:
    with server.client(token=None) as anon, server.client(token="wrong-token") as wrong:
        assert anon.get("/health").status_code == 200
        for method, path in [("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/metrics"),
                             ("GET", "/openapi.json"), ("GET", "/v1/videos/video_" + "0" * 24)]:  # fmt: skip
            for client in (anon, wrong):
                r = client.request(method, path)
                assert r.status_code == 401, (method, path)
                assert "Authorization: Bearer" in r.json()["error"]["message"]
                assert r.headers["www-authenticate"] == "Bearer"
        assert "<" in anon.get("/").text  # the page itself loads, and asks for the token
    with server.client() as ok:
        assert ok.get("/v1/videos").status_code == 200
        spec = ok.get("/openapi.json").json()
        assert {"/v1/videos", "/v1/videos/{video_id}/events", "/health"} <= set(spec["paths"])


def test_a_public_host_needs_a_token(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "segue", "serve", "--host", "0.0.0.0", "--data", str(tmp_path / "d")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: --host 0.0.0.0 is not a loopback address: give --token (or SEGUE_TOKEN) so that every request "
        "must carry it, or serve on 127.0.0.1"
    )
    assert not (tmp_path / "d").exists()  # refused before anything is made


def test_listing_pages_unknown_ids_and_delete(c: httpx.Client, server: Server) -> None:
    ids = [submit(c, seed=i)["id"] for i in range(3)]
    page = c.get("/v1/videos", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"] and page["last_id"] == ids[1]
    rest = c.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert c.get("/v1/videos", params={"status": "done"}).status_code == 422
    assert c.get("/v1/videos", params={"limit": 0}).json()["error"]["param"] == "limit"
    for bad in ("video_" + "0" * 24, "../../etc/passwd", "video_%2e%2e"):
        assert c.get(f"/v1/videos/{bad}").status_code == 404
    r = c.get(f"/v1/videos/{ids[0]}/content")
    assert r.status_code == 409 and "is queued" in r.json()["error"]["message"]
    job_dir = server.data / "jobs" / ids[0]
    assert (job_dir / "inputs" / "first.png").is_file()
    assert c.delete(f"/v1/videos/{ids[0]}").json() == {"id": ids[0], "object": "video.deleted", "deleted": True}
    assert c.get(f"/v1/videos/{ids[0]}").status_code == 404 and not job_dir.exists()
    assert c.delete(f"/v1/videos/{ids[0]}").status_code == 404
    health = c.get("/health").json()
    assert health["queue_depth"] == 2 and health["workers_alive"] == 0 and health["model"]["size_step"] == 8
    metrics = c.get("/metrics").text
    assert 'segue_jobs{status="queued"} 2.0' in metrics and "segue_step_seconds_count" in metrics


def test_the_api_process_never_loads_torch(server: Server, c: httpx.Client) -> None:
    submit(c, seed=9)  # a submission checked against the model's config
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "numpy" in maps  # the model's config came from a child process
