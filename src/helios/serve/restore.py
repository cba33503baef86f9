"""After a restart: every job saved in --data-dir is listed again, and the unfinished ones are queued again in their
original order; the worker resumes each from its saved state (jobs.py), so it makes the same video."""

from __future__ import annotations

from .jobs import ACTIVE, Job
from .params import plan_of


def restore_jobs(server) -> int:
    """Load the saved jobs into the worker; returns how many were queued again."""
    resumed = 0
    for record in server.store.load_all():
        video, request = record["video"], record["request"]
        plan = plan_of(request, server.model)
        job = Job(video["id"], request, plan, video["created_at"], input=record.get("input"))
        for name in ("progress", "completed_at", "error", "chunks_done", "frames_done", "prompt", "started_at"):
            setattr(job, name, video.get(name))
        if video["status"] in ACTIVE:
            server.worker.submit(job, restored=True)  # queued again, whatever the queue's limit
            resumed += 1
        else:
            job.status = video["status"]
            server.worker.add_finished(job)
    return resumed
