"""WS /v1/realtime/video: a live, steerable video in vLLM-Omni's realtime protocol, so that its clients work.

Client -> server (JSON text):
    session.start        {prompt, format: "m4s", model?, size | width+height, seconds | num_frames, seed, fps,
                          image_reference (data URL), negative_prompt, sampler fields, sampling_params {...}}
    session.interaction  {interaction: {event_id?, event: {prompt}, transition_chunks?}} -> session.interaction.queued
    session.stop         cancels;  session.ping -> session.pong
Server -> client:
    video.start          {request_id, format, config: {width, height, fps, num_frames, num_chunks, seed, mime}}
    video.chunk_metadata {kind: "media", request_id, num_frames, byte_length, transport_chunk_index,
                          generation_chunk_index, started/active/completed_event_ids, + chunk_index, num_chunks,
                          timings, prompt}, then one binary fMP4 fragment (the first one starts with the init segment)
    session.done         {request_id, chunks, stopped};  error {message, code, request_id?, event_id?}

The session is a job like a POST one (same plan, same queue, one at a time on the device) that is not listed or
kept. It ends when the video is done, on session.stop, when the client goes away (the job is cancelled, other jobs
go on), or after `session_timeout` seconds with no generation progress and no ping.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import WebSocket
from fastapi.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from ..pipeline.steering import DEFAULT_TRANSITION_CHUNKS, check_change
from ..pipeline.video_io import VideoSettings, codec_string, stream_header
from .errors import ApiError
from .jobs import ACTIVE, Job
from .params import check_prompt, decode_data_url, make_request, plan_of, save_input
from .security import KEY_SUBPROTOCOL, key_matches
from .storage import SESSION_PREFIX, new_id

START_TIMEOUT = 10.0  # seconds to wait for session.start (vLLM-Omni's)
START_LIMIT = 4 * 2**20  # session.start may carry an image
CONTROL_LIMIT = 128 * 2**10  # every later message
START_EXTRA = ("type", "format", "image_reference", "sampling_params", "extra_params")


class ProtocolError(Exception):
    def __init__(self, message: str, code: str, fatal: bool = False, event_id=None):
        super().__init__(message)
        self.code, self.fatal, self.event_id = code, fatal, event_id


async def realtime_session(ws: WebSocket, server) -> None:
    protocols = ws.scope.get("subprotocols", [])
    if not key_matches(server.api_key, ws.headers, protocols):
        await ws.close(code=1008, reason="missing or wrong API key")  # before accept: the handshake fails (403)
        return
    await ws.accept(subprotocol=next((p for p in protocols if p.startswith(KEY_SUBPROTOCOL)), None))
    session = _Session(ws, server)
    try:
        await session.run()
    except WebSocketDisconnect:
        pass
    finally:
        session.end()


class _Session:
    def __init__(self, ws: WebSocket, server):
        self.ws, self.server, self.worker = ws, server, server.worker
        self.job: Job | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.alive = time.monotonic()  # the last progress or ping
        self.events: set[str] = set()
        self.active_event: str | None = None  # the change of the last chunk sent
        self.completed_event: str | None = None  # the last change reported complete
        self.reported_superseded = 0
        self.sent = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            start = await asyncio.wait_for(self._receive(START_LIMIT), START_TIMEOUT)
        except asyncio.TimeoutError:
            return await self._fail(ProtocolError(f"no session.start within {START_TIMEOUT:g} s", "start_timeout"))
        except ProtocolError as err:
            return await self._fail(err)
        if start["type"] != "session.start":
            return await self._fail(ProtocolError(f"the first message must be session.start, got {start['type']!r}",
                                                  "session_not_started"))
        try:
            self.job = await run_in_threadpool(self._job, start)
        except ApiError as err:
            return await self._fail(ProtocolError(err.message, err.code or "invalid_request"))
        await self._send_start()
        tasks = [asyncio.create_task(t) for t in (self._pump(), self._control(), self._watchdog())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._close()

    def end(self) -> None:
        """However the session ends (done, stopped, timed out, disconnected), its job stops."""
        if self.job is not None:
            self.worker.unsubscribe(self.job, self.queue)
            if self.job.status in ACTIVE:
                self.worker.cancel(self.job)

    # -- starting ---------------------------------------------------------------------------------------------

    def _job(self, start: dict) -> Job:
        if start.get("format", "m4s") != "m4s":
            raise ApiError(400, f"format must be 'm4s', got {start.get('format')!r}", "format", "invalid_value")
        body = {k: v for k, v in start.items() if k not in START_EXTRA}
        params = start.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise ApiError(400, "sampling_params must be an object", "sampling_params", "invalid_value")
        body.update({k: v for k, v in params.items() if k not in body})
        server = self.server
        request = make_request(body, server)
        job_id = SESSION_PREFIX + new_id()
        plan = plan_of(request, server.model)
        try:
            chosen = None
            if start.get("image_reference") is not None:
                data = decode_data_url("image_reference", start["image_reference"])
                chosen = save_input(server.store.folder(job_id), data, "image_reference", plan.window_frames,
                                    server.max_upload_bytes)
            job = Job(job_id, request, plan, listed=False, input=chosen)
            self.worker.subscribe(job, self.loop, self.queue)
            self.worker.submit(job)
        except BaseException:
            server.store.remove(job_id)
            raise
        return job

    async def _send_start(self) -> None:
        job = self.job
        opts = job.plan.opts
        from fractions import Fraction

        settings = VideoSettings(opts.width, opts.height, Fraction(job.request["fps"]).limit_denominator(1001))
        codec = codec_string(await run_in_threadpool(stream_header, settings))
        config = {"width": opts.width, "height": opts.height, "fps": job.request["fps"],
                  "num_frames": job.plan.num_frames, "num_chunks": job.plan.num_chunks, "seed": job.request["seed"],
                  "model": self.server.model_name, "mime": f'video/mp4; codecs="{codec}"'}
        await self.ws.send_json({"type": "video.start", "request_id": job.id, "format": "m4s", "config": config})

    # -- the three loops ----------------------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Worker events -> the client: metadata + fragment per chunk, then session.done."""
        while True:
            event = await self.queue.get()
            self.alive = time.monotonic()
            if event["type"] == "chunk":
                await self.ws.send_json(self._metadata(event["chunk"], len(event["data"])))
                await self.ws.send_bytes(event["data"])
                self.sent += 1
            elif event["type"] == "done":
                if event["status"] == "failed":
                    await self._error(f"generation failed: {event['error']['message']}", "generation_failed")
                await self.ws.send_json({"type": "session.done", "request_id": self.job.id, "chunks": self.sent,
                                         "stopped": event["status"] == "cancelled"})
                return

    async def _control(self) -> None:
        """Client messages: steering, stop, ping. A bad message gets an error; the session goes on."""
        while True:
            try:
                message = await self._receive(CONTROL_LIMIT)
                kind = message["type"]
                if kind == "session.ping":
                    self.alive = time.monotonic()
                    await self.ws.send_json({"type": "session.pong"})
                elif kind == "session.stop":
                    self.worker.cancel(self.job)  # the pump sends session.done(stopped) when the worker stops
                elif kind == "session.interaction":
                    await self._interaction(message)
                elif kind == "session.start":
                    raise ProtocolError("the session has already started", "session_already_started")
                else:
                    raise ProtocolError(f"unknown message type {kind!r}", "unknown_type")
            except ProtocolError as err:
                await self._error(str(err), err.code, err.event_id)

    async def _watchdog(self) -> None:
        steps = -1
        while True:
            await asyncio.sleep(min(1.0, self.server.session_timeout / 4))
            if self.job.progress != steps:
                steps, self.alive = self.job.progress, time.monotonic()
            if time.monotonic() - self.alive > self.server.session_timeout:
                await self._error(f"Stall timeout: no generation progress and no ping for "
                                  f"{self.server.session_timeout:g} s", "stall_timeout")
                return

    # -- messages -----------------------------------------------------------------------------------------------

    async def _receive(self, limit: int) -> dict:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        text = message.get("text")
        if text is None:
            raise ProtocolError("binary messages are not accepted; send JSON text", "invalid_message")
        if len(text) > limit:
            raise ProtocolError(f"message of {len(text)} bytes, over the limit of {limit}", "message_too_large")
        try:
            data = json.loads(text)
        except ValueError:
            raise ProtocolError("the message is not valid JSON", "invalid_json") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise ProtocolError("a message must be a JSON object with a string 'type'", "invalid_message")
        return data

    async def _interaction(self, message: dict) -> None:
        interaction = message.get("interaction")
        event = interaction.get("event") if isinstance(interaction, dict) else None
        if not isinstance(event, dict):
            raise ProtocolError("session.interaction needs interaction.event.prompt", "invalid_message")
        event_id = interaction.get("event_id")
        event_id = f"evt_{secrets.token_hex(8)}" if event_id is None else str(event_id)
        if "negative_prompt" in event:
            raise ProtocolError("negative_prompt updates are not supported", "unsupported", event_id=event_id)
        if event_id in self.events:
            raise ProtocolError(f"event_id {event_id!r} was used before", "event_id_conflict", event_id=event_id)
        prompt, transition = event.get("prompt"), interaction.get("transition_chunks", DEFAULT_TRANSITION_CHUNKS)
        try:
            check_change(prompt, transition)
            await run_in_threadpool(check_prompt, prompt, self.server, "prompt")
        except (ValueError, ApiError) as err:
            raise ProtocolError(getattr(err, "message", str(err)), "invalid_value", event_id=event_id) from None
        if self.job.status not in ACTIVE:
            raise ProtocolError("the video has ended", "session_ended", event_id=event_id)
        self.events.add(event_id)
        await run_in_threadpool(self.job.steering.set, prompt, transition, event_id)  # encodes the prompt now
        await self.ws.send_json({"type": "session.interaction.queued", "request_id": self.job.id,
                                 "event_id": event_id, "prompt": prompt, "transition_chunks": transition})

    def _metadata(self, chunk: dict, size: int) -> dict:
        change = chunk["prompt"].get("change") or {}
        current = change.get("event_id")
        started = [current] if current and change["chunk"] == chunk["index"] else []
        completed = [c.event_id for c in self.job.steering.superseded[self.reported_superseded :] if c.event_id]
        self.reported_superseded = len(self.job.steering.superseded)
        if started and self.active_event and self.active_event != current:
            completed.append(self.active_event)  # replaced mid-transition
        active = [current] if current and chunk["prompt"]["weight"] < 1 else []
        if current and chunk["prompt"]["weight"] == 1 and current != self.completed_event:
            completed.append(current)
            self.completed_event = current
        self.active_event = current
        return {"type": "video.chunk_metadata", "kind": "media", "request_id": self.job.id,
                "num_frames": chunk["num_frames"], "byte_length": size, "transport_chunk_index": self.sent,
                "generation_chunk_index": chunk["index"], "started_event_ids": started, "active_event_ids": active,
                "completed_event_ids": completed, "chunk_index": chunk["index"], "num_chunks": chunk["num_chunks"],
                "timings": chunk["timings"], "prompt": chunk["prompt"]}

    async def _error(self, message: str, code: str, event_id=None) -> None:
        payload = {"type": "error", "message": message, "code": code}
        if self.job is not None:
            payload["request_id"] = self.job.id
        if event_id is not None:
            payload["event_id"] = event_id
        await self.ws.send_json(payload)

    async def _fail(self, err: ProtocolError) -> None:
        await self._error(str(err), err.code, err.event_id)
        await self._close()

    async def _close(self) -> None:
        try:
            await self.ws.close()
        except RuntimeError:  # already closed
            pass
