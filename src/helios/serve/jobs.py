"""Jobs and the worker: one generation at a time on the device, first come first served.

A job is a video being made: the checked request, its plan, its status and counters, a `Steering` mailbox and a
cancel flag. The worker thread takes jobs from a bounded queue and consumes the pipeline's stream: each chunk is
appended to the job's fragmented MP4 (video_io.py), then the resumable state is saved beside it, then the job record
(storage.py), so that after a crash the job resumes from its last whole chunk and makes the same video.
Subscribers (a growing /content download, a realtime session) get every chunk's fragment as an event on their
asyncio queue; the worker hands events over with call_soon_threadsafe and never waits for a subscriber.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction

from ..pipeline.media import load_image, load_video
from ..pipeline.state import GenerationState
from ..pipeline.steering import Steering
from ..pipeline.video_io import VideoSettings, VideoWriter, partial_path, to_uint8
from ..sampling.options import DEFAULT_NEGATIVE_PROMPT
from ..sampling.plan import GenerationPlan
from .errors import ApiError

ACTIVE = ("queued", "in_progress")


@dataclass
class Job:
    id: str
    request: dict  # params.make_request's: plain JSON, saved
    plan: GenerationPlan
    created_at: int = 0
    seq: int = 0  # order of arrival in the queue (Worker.submit): the order jobs run and are listed in
    listed: bool = True  # False for realtime sessions: not in /v1/videos, not kept on disk
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    started_at: float | None = None
    error: dict | None = None
    chunks_done: int = 0
    frames_done: int = 0
    bytes_done: int = 0  # of the growing video file
    prompt: dict | None = None  # the last chunk's prompt record (steering.py)
    input: dict | None = None  # {"kind": "image" | "video", "file": name in the job's folder}
    steering: Steering = field(default_factory=Steering)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    listeners: list = field(default_factory=list)  # (loop, asyncio.Queue)

    def public(self, model: str) -> dict:
        """The video object: OpenAI's fields, then helios' own."""
        request, plan = self.request, self.plan
        seconds = request.get("seconds")
        return {
            "id": self.id, "object": "video", "model": model, "status": self.status, "progress": self.progress,
            "created_at": self.created_at, "completed_at": self.completed_at, "expires_at": None,
            "seconds": f"{seconds:g}" if seconds is not None else f"{plan.num_frames / request['fps']:.3g}",
            "size": f"{plan.opts.width}x{plan.opts.height}", "error": self.error,
            "prompt": request.get("prompt") or request["prompt_schedule"][0][0], "remixed_from_video_id": None,
            "chunks_done": self.chunks_done, "chunks_total": plan.num_chunks, "num_frames": plan.num_frames,
            "frames_done": self.frames_done, "fps": request["fps"], "seed": request["seed"],
            "prompt_in_effect": self.prompt, "started_at": self.started_at,
        }

    def record(self) -> dict:
        """What job.json keeps: enough to list the job and to make its plan again."""
        keep = ("status", "progress", "completed_at", "started_at", "error", "chunks_done", "frames_done", "prompt")
        return {"video": {"id": self.id, "created_at": self.created_at, **{k: getattr(self, k) for k in keep}},
                "seq": self.seq, "request": self.request, "input": self.input}


class Worker:
    """The queue and the thread that runs jobs on the pipeline, one at a time."""

    def __init__(self, pipe, store, max_queue: int, overlap_decode: bool | None = None):
        """overlap_decode: passed to every pipe.stream (None: the pipeline's choice, see overlap.py)."""
        self.pipe, self.store, self.max_queue, self.overlap_decode = pipe, store, max_queue, overlap_decode
        self.jobs: dict[str, Job] = {}  # every listed job and every live session
        self.queue: deque[Job] = deque()
        self.lock = threading.Condition()
        self.current: Job | None = None
        self.seq = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="helios-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job, restored: bool = False) -> None:
        """Queue a job; 429 when the queue is full (jobs restored after a restart always get in)."""
        with self.lock:
            if not restored and len(self.queue) >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} jobs waiting); try again later", None,
                               "queue_full", "rate_limit_error")
            job.seq = next(self.seq)
            job.created_at = job.created_at or int(time.time())
            self.jobs[job.id] = job
            self.queue.append(job)
            self.store.folder(job.id).mkdir(exist_ok=True)
            self._save(job)
            self.lock.notify_all()

    def subscribe(self, job: Job, loop, queue) -> tuple[int, bool]:
        """Send the job's events to an asyncio queue from now on; returns the bytes of video written before, and
        whether the job has ended (then no event will come)."""
        with self.lock:
            job.listeners.append((loop, queue))
            return job.bytes_done, job.finished.is_set()

    def unsubscribe(self, job: Job, queue) -> None:
        with self.lock:
            job.listeners = [(lp, q) for lp, q in job.listeners if q is not queue]

    def cancel(self, job: Job) -> None:
        """Stop a job: a queued one at once, a running one within one denoising step."""
        job.cancel.set()
        with self.lock:
            if job in self.queue:
                self.queue.remove(job)
                self._finish(job, "cancelled")

    def forget(self, job: Job) -> None:
        with self.lock:
            self.jobs.pop(job.id, None)
        self.store.remove(job.id)

    def listed(self) -> list[Job]:
        """The listed jobs in the order they arrived."""
        with self.lock:
            return sorted((j for j in self.jobs.values() if j.listed), key=lambda j: j.seq)

    def add_finished(self, job: Job) -> None:
        """A job that ended before a restart: listed again, not run."""
        with self.lock:
            job.seq = next(self.seq)
            job.finished.set()
            self.jobs[job.id] = job

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.queue:
                    self.lock.wait()
                job = self.current = self.queue.popleft()
                job.status, job.started_at = "in_progress", time.time()
                self._save(job)
                self._publish(job, {"type": "started"})
            try:
                status = self._generate(job)
                error = None
            except Exception as err:  # a failed job must not stop the worker; the message goes to the client
                traceback.print_exc()
                status, error = "failed", {"code": type(err).__name__, "message": " ".join(str(err).split())[:500]}
            with self.lock:
                self.current = None
                self._finish(job, status, error)

    def _generate(self, job: Job) -> str:
        plan, request, store = job.plan, job.request, self.store
        state_path, output = store.state(job.id), store.video(job.id)
        state = GenerationState.load(state_path) if state_path.is_file() else None
        if state is not None and state.next_chunk >= plan.num_chunks and output.is_file():
            return "completed"  # the crash came after the last rename
        fps = Fraction(request["fps"]).limit_denominator(1001)
        settings = VideoSettings(plan.opts.width, plan.opts.height, fps)
        if state is not None and partial_path(output).is_file():
            writer = VideoWriter.resume(output, settings, state.next_chunk)
        else:
            state, writer = None, VideoWriter.create(output, settings)
        with self.lock:
            job.chunks_done, job.frames_done, job.bytes_done = writer.chunks, writer.frames, writer.partial.stat().st_size
        media = {} if state is not None else self._media(job)
        negative = request.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT)
        try:
            stream = self.pipe.stream(plan, negative_prompt=negative, resume=state, steering=job.steering,
                                      on_step=lambda info: self._step(job, info),
                                      overlap_decode=self.overlap_decode, **media)
            for chunk in stream:
                self._chunk(job, writer, chunk)
                if job.cancel.is_set():
                    break
        finally:
            if job.cancel.is_set() or writer.chunks < plan.num_chunks:
                writer.close()  # keeps the partial video of a failed job (a cancelled one is removed with it)
            else:
                writer.finish()
        return "cancelled" if job.cancel.is_set() else "completed"

    def _media(self, job: Job) -> dict:
        if job.input is None:
            return {}
        path = self.store.folder(job.id) / job.input["file"]
        if job.input["kind"] == "image":
            return {"image": load_image(path)}
        return {"video": load_video(path, min_frames=job.plan.window_frames)}

    def _step(self, job: Job, info) -> bool:
        """on_step: progress from the denoising steps (the other phases' events have no steps: 0 for the chunk)."""
        done = info.step / info.steps if info.steps else 0.0
        job.progress = min(99, int(100 * (info.chunk + done) / info.num_chunks))
        return job.cancel.is_set()

    def _chunk(self, job: Job, writer: VideoWriter, chunk) -> None:
        data = writer.write(to_uint8(chunk.frames))
        if job.listed:
            chunk.state.save(self.store.state(job.id))  # after the video: the file never has fewer chunks
        meta = {"index": chunk.index, "num_chunks": chunk.num_chunks, "num_frames": int(chunk.frames.shape[0]),
                "timings": {k: round(v, 4) for k, v in chunk.timings.items()}, "prompt": chunk.prompt}
        with self.lock:
            job.chunks_done, job.frames_done, job.bytes_done = writer.chunks, writer.frames, job.bytes_done + len(data)
            job.prompt = chunk.prompt
            job.progress = min(99, int(100 * writer.chunks / chunk.num_chunks))
            self._save(job)
            self._publish(job, {"type": "chunk", "chunk": meta, "data": data})

    def _finish(self, job: Job, status: str, error: dict | None = None) -> None:
        """Under the lock."""
        job.status, job.error, job.completed_at = status, error, int(time.time())
        if status == "completed":
            job.progress = 100
        if job.listed:
            self._save(job)
        else:
            self.jobs.pop(job.id, None)
            self.store.remove(job.id)
        self._publish(job, {"type": "done", "status": status, "error": error})
        job.finished.set()

    def _save(self, job: Job) -> None:
        if job.listed:
            self.store.save(job.id, job.record())

    def _publish(self, job: Job, event: dict) -> None:
        for loop, queue in job.listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that event loop is closed: its subscriber is gone
                pass
