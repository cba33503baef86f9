"""The HTTP app: OpenAI's /v1/videos routes, steering, health, the page, and errors in OpenAI's shape.

Routes (all but GET /health need the API key when one is set):
    POST   /v1/videos                  create (JSON, or multipart with an input_reference file); answers at once
    GET    /v1/videos                  list, newest first (limit, after, order)
    GET    /v1/videos/{id}             retrieve
    DELETE /v1/videos/{id}             cancel if queued or running, then remove the video and its files
    GET    /v1/videos/{id}/content     the MP4; while the job runs, the growing fragmented MP4 (chunked transfer)
    POST   /v1/videos/{id}/prompt      steer a queued or running job: {"prompt", "transition_chunks"}
    WS     /v1/realtime/video          a live, steerable stream (realtime.py)
    GET    /                           the live page (static/)
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..pipeline.steering import DEFAULT_TRANSITION_CHUNKS, check_change
from ..pipeline.video_io import partial_path
from .errors import ApiError, bad_field, not_found
from .jobs import ACTIVE, Job, Worker
from .params import check_prompt, decode_data_url, make_request, plan_of, save_input
from .realtime import realtime_session
from .security import BodyLimit, key_matches, unauthorized
from .storage import Store, new_id, valid_id

POLL_AFTER_MS = "250"  # the openai client's poll interval follows this header
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


@dataclass
class Server:
    """What the routes share: the loaded pipeline, the model, the store, the worker and the limits."""

    pipe: object  # HeliosPipeline
    model: object  # folder.ModelFolder
    model_name: str
    store: Store
    worker: Worker
    api_key: str | None = None
    max_seconds: float = 120.0
    max_upload_bytes: int = 50 * 2**20
    session_timeout: float = 60.0

    @property
    def tokenizer(self):
        return self.pipe.text_encoder.tokenizer

    def job(self, video_id: str) -> Job:
        job = self.worker.jobs.get(video_id) if valid_id(video_id) else None
        if job is None or not job.listed:
            raise not_found(video_id)
        return job


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="helios", docs_url=None, redoc_url=None, openapi_url=None)
    _error_handlers(app)

    def guard(request: Request):
        if not key_matches(server.api_key, request.headers):
            raise unauthorized()

    keyed = [Depends(guard)]

    @app.get("/health")
    def health():
        jobs = list(server.worker.jobs.values())
        return {"status": "ok", "model": server.model_name, "queued": len(server.worker.queue),
                "live_sessions": sum(not j.listed for j in jobs)}

    @app.get("/", dependencies=keyed)
    def page():
        return _static("index.html")

    @app.get("/static/{name}", dependencies=keyed)
    def static(name: str):
        if name not in STATIC:
            raise ApiError(404, f"no such file: {name}", None, "not_found")
        return _static(name)

    _video_routes(app, server, keyed)

    @app.websocket("/v1/realtime/video")
    async def realtime(websocket: WebSocket):
        await realtime_session(websocket, server)

    return BodyLimit(app, server.max_upload_bytes + 2**20)


def _video_routes(app: FastAPI, server: Server, keyed: list) -> None:
    """OpenAI's /v1/videos routes, and steering."""

    @app.post("/v1/videos", dependencies=keyed)
    async def create(request: Request):
        body, upload = await _body(request, server)
        return await run_in_threadpool(_create, server, body, upload, _is_form(request))

    @app.get("/v1/videos", dependencies=keyed)
    def list_videos(limit: str = "20", after: str | None = None, order: str = "desc"):
        return _list(server, limit, after, order)

    @app.get("/v1/videos/{video_id}", dependencies=keyed)
    def retrieve(video_id: str):
        video = server.job(video_id).public(server.model_name)
        return JSONResponse(video, headers={"openai-poll-after-ms": POLL_AFTER_MS})

    @app.delete("/v1/videos/{video_id}", dependencies=keyed)
    async def delete(video_id: str):
        job = server.job(video_id)
        was = job.status
        server.worker.cancel(job)
        if not await run_in_threadpool(job.finished.wait, 30) and was in ACTIVE:
            raise ApiError(409, "cancellation in progress; try again", "video_id", "cancellation_in_progress")
        server.worker.forget(job)
        return {"id": video_id, "object": "video.deleted", "deleted": True,
                "status": "cancelled" if was in ACTIVE else job.status}

    @app.get("/v1/videos/{video_id}/content", dependencies=keyed)
    def content(video_id: str, variant: str = "video"):
        job = server.job(video_id)
        if variant != "video":
            raise bad_field("variant", f"variant {variant!r} is not available; this server makes 'video' only")
        if job.status in ("failed", "cancelled"):
            raise ApiError(409, f"video {video_id} {job.status}; it has no content", "video_id", f"video_{job.status}")
        if job.status == "completed":
            return FileResponse(server.store.video(video_id), media_type="video/mp4")
        return StreamingResponse(_growing(server, job), media_type="video/mp4")

    @app.post("/v1/videos/{video_id}/prompt", dependencies=keyed)
    async def steer(video_id: str, request: Request):
        job = server.job(video_id)
        body = await _json(request)
        change = await run_in_threadpool(_steer, server, job, body)
        return {"object": "video.prompt_update", "video_id": video_id, "status": "queued", **change}


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return ApiError(err.status_code, str(err.detail), None, code).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = str(first.get("loc", ["", "body"])[-1])
        return bad_field(param, f"{param}: {first.get('msg', 'invalid')}").response()

    @app.exception_handler(Exception)
    async def crash(request, err: Exception):  # a bug: say so in the same shape, never with a traceback
        import traceback

        traceback.print_exc()
        return ApiError(500, f"internal error ({type(err).__name__})", None, "internal_error", "server_error").response()


def _static(name: str) -> Response:
    data = (resources.files("helios.serve") / "static" / name).read_bytes()
    return Response(data, media_type=STATIC[name])


def _is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "")
    return kind.startswith("multipart/form-data") or kind.startswith("application/x-www-form-urlencoded")


async def _json(request: Request):
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


async def _body(request: Request, server: Server) -> tuple[dict, bytes | None]:
    """The create fields and the uploaded input_reference, if any (JSON data URL or multipart file)."""
    if not _is_form(request):
        body = await _json(request)
        upload = body.pop("input_reference", None)
        return body, None if upload is None else decode_data_url("input_reference", upload)
    try:
        form = await request.form(max_files=1, max_fields=64, max_part_size=server.max_upload_bytes)
    except HTTPException as err:  # starlette's multipart limits
        raise ApiError(400, f"multipart body: {err.detail}", None, "invalid_multipart") from None
    body, upload = {}, None
    for name, value in form.multi_items():
        if name in body or (name == "input_reference" and upload is not None):
            raise bad_field(name, f"{name} is given twice")
        if isinstance(value, UploadFile):
            if name != "input_reference":
                raise bad_field(name, f"{name}: only input_reference may be a file")
            upload = await value.read(server.max_upload_bytes + 1)
        elif name == "input_reference":
            upload = decode_data_url(name, value)
        else:
            body[name] = value
    return body, upload


def _create(server: Server, body: dict, upload: bytes | None, form: bool) -> JSONResponse:
    request = make_request(body, server, form)
    video_id = new_id()
    folder = server.store.folder(video_id)
    try:
        plan = plan_of(request, server.model)
        chosen = None if upload is None else save_input(folder, upload, "input_reference", plan.window_frames,
                                                        server.max_upload_bytes)
        job = Job(video_id, request, plan, input=chosen)
        server.worker.submit(job)
    except BaseException:
        server.store.remove(video_id)
        raise
    return JSONResponse(job.public(server.model_name), headers={"openai-poll-after-ms": POLL_AFTER_MS})


def _list(server: Server, limit: str, after: str | None, order: str) -> dict:
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise bad_field("limit", f"limit must be an integer from 1 to 100, got {limit!r}")
    if order not in ("asc", "desc"):
        raise bad_field("order", f"order must be 'asc' or 'desc', got {order!r}")
    jobs = server.worker.listed()[:: -1 if order == "desc" else 1]
    if after is not None:
        ids = [j.id for j in jobs]
        if after not in ids:
            raise bad_field("after", f"after: no video with id {after!r}")
        jobs = jobs[ids.index(after) + 1 :]
    page = [j.public(server.model_name) for j in jobs[: int(limit)]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(jobs) > int(limit)}


def _steer(server: Server, job: Job, body: dict) -> dict:
    unknown = set(body) - {"prompt", "transition_chunks", "event_id"}
    if unknown:
        name = sorted(unknown)[0]
        raise bad_field(name, f"unknown field {name!r}; known fields: prompt, transition_chunks, event_id")
    prompt, transition = body.get("prompt"), body.get("transition_chunks", DEFAULT_TRANSITION_CHUNKS)
    try:
        check_change(prompt, transition)
    except ValueError as err:
        raise bad_field(str(err).split()[0], str(err)) from None
    check_prompt(prompt, server, "prompt")
    if job.status not in ACTIVE:
        raise ApiError(409, f"video {job.id} is {job.status}; only a queued or running video can be steered",
                       "video_id", "not_running")
    event_id = body.get("event_id")
    job.steering.set(prompt, transition, None if event_id is None else str(event_id))  # encodes the prompt now
    return {"prompt": prompt, "transition_chunks": transition, "event_id": event_id}


async def _growing(server: Server, job: Job):
    """The video so far, then each chunk's fragment as it is made, until the job ends."""
    queue: asyncio.Queue = asyncio.Queue()
    before, done = server.worker.subscribe(job, asyncio.get_running_loop(), queue)
    try:
        if before or done:
            yield await run_in_threadpool(_prefix, server, job, None if done else before)
        while not done:
            event = await queue.get()
            if event["type"] == "chunk":
                yield event["data"]
            done = event["type"] == "done"
    finally:
        server.worker.unsubscribe(job, queue)


def _prefix(server: Server, job: Job, size: int | None) -> bytes:
    """The first `size` bytes (all if None) of the job's video, growing or finished."""
    output = server.store.video(job.id)
    for path in (partial_path(output), output):
        try:
            with open(path, "rb") as f:
                return f.read() if size is None else f.read(size)
        except FileNotFoundError:
            continue
    return b""
