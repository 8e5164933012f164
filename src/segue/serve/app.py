"""The HTTP API of ``segue serve`` (FastAPI), shaped like OpenAI's ``/v1/videos``; docs/serve.md is its reference.

This process holds no model and imports no torch: it checks a submission (``submit.py``), writes its images
under names it makes, and inserts the job; workers (other processes) render it. Errors are one line as
``{"error": {"message", "type", "param", "code"}}``: 422 for a bad field (``param`` names it), 413 for a body
over the cap, 401 without the token, 404 for an unknown id, 409 for content asked of an unfinished job.
The page in ``static/`` is served at ``/`` after the API routes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InputError
from ..io import atomic_path
from .jobs import COMPLETED, FAILED, IN_PROGRESS, QUEUED, STATUSES, TERMINAL, VARIANTS, Job, JobFiles, new_id, valid_id
from .metrics import render_metrics
from .modelinfo import ModelInfo
from .queue import Queue
from .submit import CLIP_FIELDS, RequestError, Submission, parse

STATIC = Path(__file__).parent / "static"
MAX_KEY = 255  # characters of an Idempotency-Key
EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0


FIELD_DOCS = {
    "first": "first keyframe (image file)", "last": "last keyframe (image file), optional", "prompt": "text",
    "negative_prompt": "text (default: the model's)", "frames": "4n+1", "steps": "1-1000", "seed": "0-2**63-1",
    "guidance": "0-50", "shift": "(0, 100]", "solver": "unipc, dpm++, euler or lcm", "size": "WIDTHxHEIGHT",
    "max_area": "pixels (the first keyframe's aspect is kept)", "guidance_steps": "guide only the first N steps",
    "color_match": "true or false", "webhook_url": "http(s) URL POSTed the job when it ends",
    "story": "a storyboard (docs/storyboard.md) as JSON; its keyframe image values name file fields of this request",
}  # fmt: skip
REQUEST_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
        name: ({"type": "string", "format": "binary"} if name in ("first", "last") else {"type": "string"})
        | {"description": FIELD_DOCS.get(name, "")} for name in ("first", "last", *CLIP_FIELDS)}}}},
}  # fmt: skip


@dataclass
class ServeState:
    """What the routes share: the queue, the data folder, the model's config and the limits."""

    queue: Queue
    data: Path
    model: ModelInfo
    token: str | None = None
    max_upload: int = 64 * 2**20  # bytes of one request body
    max_pixels: int = 4096 * 4096  # of one uploaded image
    lease_s: float = 30.0
    workers: int = 0  # worker processes this server started


class APIError(HTTPException):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(status_code=status, detail=message)
        self.param, self.kind = param, kind


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413 and one clear line: early by its Content-Length,
    and by counting what arrives when it has none (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (f"the request body is over the {self.limit} bytes allowed ({self.limit / 2**20:g} MiB, "
                   "segue serve --max-upload-mb); send smaller images")  # fmt: skip
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limit:
            await JSONResponse(error_body(message), status_code=413)(scope, receive, send)
            return
        seen, started = 0, False

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        async def watched(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await JSONResponse(error_body(message), status_code=413)(scope, receive, send)


class _TooLarge(Exception):
    pass


def get_state(request: Request) -> ServeState:
    return request.app.state.serve


def authorized(
    state: ServeState = Depends(get_state),  # noqa: B008
    creds: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False)),  # noqa: B008
) -> None:
    if state.token is None:
        return
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), state.token.encode()):
        raise APIError(401, "this server needs its token: send the header Authorization: Bearer TOKEN",
                       kind="authentication_error")  # fmt: skip


State = Annotated[ServeState, Depends(get_state)]
api = APIRouter(dependencies=[Depends(authorized)])


def job_or_404(state: ServeState, job_id: str) -> Job:
    job = state.queue.get(job_id) if valid_id(job_id) else None
    if job is None:
        raise APIError(404, f"no job {job_id!r:.40} (ids look like video_ and 24 hex digits)", "id")
    return job


# -- submit ----------------------------------------------------------------------------------------
@api.post("/v1/videos", status_code=201, openapi_extra={"requestBody": REQUEST_BODY})
async def create_video(
    request: Request, state: State, idempotency_key: str | None = Header(None, alias="Idempotency-Key")
) -> JSONResponse:
    """Submit a clip (keyframes ``first``/``last`` and settings) or a storyboard (``story``)."""
    if idempotency_key is not None:
        if not (0 < len(idempotency_key) <= MAX_KEY and idempotency_key.isprintable()):
            raise APIError(422, f"Idempotency-Key must be 1 to {MAX_KEY} printable characters", "Idempotency-Key")
        found = await run_in_threadpool(state.queue.by_key, idempotency_key)
        if found is not None:
            return JSONResponse(found.public(), 200, headers={"Idempotent-Replayed": "true"})
    fields, files = await read_form(request)
    job, created = await run_in_threadpool(submit_job, state, fields, files, idempotency_key)
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(job.public(), 201 if created else 200, headers=headers)


async def read_form(request: Request) -> tuple[dict[str, str], dict[str, bytes]]:
    """The multipart form as text fields and file contents (the body size is capped by ``BodyLimit``)."""
    form = await request.form(max_files=64, max_fields=64, max_part_size=1024 * 1024)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        for name, value in form.multi_items():
            if name in fields or name in files:
                raise APIError(422, f"field {name!r:.40} is given twice", name)
            if isinstance(value, str):
                fields[name] = value
            else:
                files[name] = await value.read()
    finally:
        await form.close()
    return fields, files


# -- read ------------------------------------------------------------------------------------------
@api.get("/v1/videos")
def list_videos(
    state: State,
    status: str | None = Query(None, description="one of " + ", ".join(STATUSES)),
    limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, description="the last_id of the page before"),
) -> dict[str, Any]:
    """Jobs, newest first, a page at a time."""
    if status is not None and status not in STATUSES:
        raise APIError(422, f"status must be one of {', '.join(STATUSES)}, got {status!r:.40}", "status")
    if after is not None and not valid_id(after):
        raise APIError(422, f"after must be a job id, got {after!r:.40}", "after")
    try:
        jobs, more = state.queue.list(status or None, limit, after)
    except InputError as e:
        raise APIError(422, str(e), "after") from None
    return {"object": "list", "data": [j.public() for j in jobs], "has_more": more,
            "last_id": jobs[-1].id if jobs else None}  # fmt: skip


@api.get("/v1/videos/{video_id}")
def get_video(state: State, video_id: str) -> dict[str, Any]:
    return job_or_404(state, video_id).public()


@api.get("/v1/videos/{video_id}/events")
async def video_events(state: State, video_id: str) -> StreamingResponse:
    """Server-Sent Events: the job (as GET returns it) each time it changes, until it ends."""
    await run_in_threadpool(job_or_404, state, video_id)
    return StreamingResponse(events(state, video_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


@api.get("/v1/videos/{video_id}/content")
def video_content(
    state: State, video_id: str, variant: str = Query("video", description="video, thumbnail or frames")
) -> FileResponse:
    """The finished video (mp4), its middle frame (PNG) or all its frames (zip of PNGs)."""
    if variant not in VARIANTS:
        raise APIError(422, f"variant must be one of {', '.join(VARIANTS)}, got {variant!r:.40}", "variant")
    job = job_or_404(state, video_id)
    if job.status != COMPLETED:
        raise APIError(409, f"job {job.id} is {job.status}: its content is there once it is completed", "id")
    path = JobFiles(state.data, job.id).output(job, variant)
    if path is None:
        raise APIError(404, f"job {job.id}: its {variant} file is missing from the data folder", "variant")
    name, media = VARIANTS[variant]
    return FileResponse(path, media_type=media, filename=f"{job.id}{Path(name).suffix}",
                        content_disposition_type="inline")  # fmt: skip


# -- change ----------------------------------------------------------------------------------------
@api.post("/v1/videos/{video_id}/cancel")
def cancel_video(state: State, video_id: str) -> dict[str, Any]:
    """Cancel a queued or running job (a running one stops at its next step). Cancelling twice is fine."""
    job_or_404(state, video_id)
    job = state.queue.cancel(video_id)
    if job is None:
        raise APIError(404, f"no job {video_id!r:.40}", "id")
    if job.status in (COMPLETED, FAILED):
        raise APIError(409, f"job {job.id} is already {job.status}; there is nothing to cancel", "id")
    return job.public()


@api.delete("/v1/videos/{video_id}")
def delete_video(state: State, video_id: str) -> dict[str, Any]:
    """Delete a job and its files (a running one is stopped first)."""
    job_or_404(state, video_id)
    state.queue.cancel(video_id)
    job = state.queue.delete(video_id)
    JobFiles(state.data, video_id).remove()
    if job is None:
        raise APIError(404, f"no job {video_id!r:.40}", "id")
    return {"id": video_id, "object": "video.deleted", "deleted": True}


# -- the service -----------------------------------------------------------------------------------
@api.get("/metrics", response_class=PlainTextResponse)
def metrics(state: State) -> Response:
    """Prometheus text: jobs by status, seconds per sampling step, queue wait, workers alive."""
    body, media = render_metrics(state.queue, state.lease_s)
    return Response(body, media_type=media)


@api.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()


public = APIRouter()


@public.get("/health")
def health(state: State) -> dict[str, Any]:
    """Workers alive, queue depth and the model; needs no token."""
    now = time.time()
    alive = [w for w in state.queue.workers() if w["beat_at"] > now - state.lease_s]
    counts = state.queue.counts()
    return {"status": "ok", "workers_alive": len(alive), "workers": state.workers, "queue_depth": counts[QUEUED],
            "in_progress": counts[IN_PROGRESS], "model": state.model.public()}  # fmt: skip


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    param, kind = getattr(exc, "param", None), getattr(exc, "kind", "invalid_request_error")
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse(error_body(str(exc.detail), param, kind), status_code=exc.status_code, headers=headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body", "header")]
    param = loc[-1] if loc else None
    return JSONResponse(error_body(f"{param or 'request'}: {first.get('msg', 'invalid')}", param), 422)


def create_app(state: ServeState) -> FastAPI:
    """The API (and the page at /) over ``state``; routes first, the static folder mounted last."""
    app = FastAPI(title="segue serve", version="1", openapi_url=None, docs_url=None, redoc_url=None,
                  description="Keyframes and a prompt in, a video out: a job queue that survives crashes.")  # fmt: skip
    app.state.serve = state
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(public)
    app.include_router(api)
    if STATIC.is_dir():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="studio")
    app.add_middleware(BodyLimit, limit=state.max_upload)
    return app


def submit_job(state: ServeState, fields: dict[str, str], files: dict[str, bytes], key: str | None) -> tuple[Job, bool]:
    """Check, write the inputs, insert; an idempotency race's loser removes its files and returns the winner."""
    try:
        sub = parse(fields, files, state.model, state.max_pixels)
    except RequestError as e:
        raise APIError(422, str(e), e.param) from None
    except InputError as e:
        raise APIError(422, str(e)) from None
    job_id = new_id()
    jf = JobFiles(state.data, job_id)
    write_inputs(jf, sub)
    spec = {"settings": sub.settings, "render": sub.render}
    job = Job(id=job_id, seq=0, kind=sub.kind, status=QUEUED, created_at=time.time(), idempotency_key=key,
              spec=spec, steps=sub.steps, webhook_url=sub.webhook_url)  # fmt: skip
    try:
        saved, created = state.queue.submit(job)
    except BaseException:
        jf.remove()
        raise
    if not created:
        jf.remove()
    return saved, created


def write_inputs(jf: JobFiles, sub: Submission) -> None:
    (jf.root / "inputs").mkdir(parents=True)
    try:
        for name, image in sub.images.items():
            with atomic_path(jf.input(name)) as tmp:
                image.save(tmp, format="PNG")
    except BaseException:
        jf.remove()
        raise


async def events(state: ServeState, job_id: str):
    """The job as JSON each time it changes (event name: its status), until it ends or is deleted."""
    last, quiet = None, time.monotonic()
    while True:
        job = await run_in_threadpool(state.queue.get, job_id)
        if job is None:
            yield f"event: deleted\ndata: {json.dumps({'id': job_id, 'deleted': True})}\n\n"
            return
        view = json.dumps(job.public())
        if view != last:
            last, quiet = view, time.monotonic()
            yield f"event: {job.status}\ndata: {view}\n\n"
        elif time.monotonic() - quiet > KEEPALIVE_S:
            quiet = time.monotonic()
            yield ": keep-alive\n\n"
        if job.status in TERMINAL:
            return
        await asyncio.sleep(EVENT_POLL_S)
