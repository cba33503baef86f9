"""`python -m helios.bench serve`: the server's overhead. Time to first chunk and per-chunk latency of the same
video made by the library call (HeliosPipeline.stream in this process) and through `helios serve` (a realtime
WebSocket session, and a POST job whose growing /content is read), alternating, on the same model and seed.

The server's time includes what the library call does not: H.264 encoding of each chunk, saving the resumable state,
the job record, and the transport. Prints one JSON object; the medians and overheads on stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def _library(pipe, plan) -> list[float]:
    """Seconds from the call to each chunk."""
    start, marks = time.perf_counter(), []
    for _ in pipe.stream(plan):
        marks.append(time.perf_counter() - start)
    return marks


def _realtime(url: str, request: dict) -> tuple[list[float], list[float]]:
    """Seconds from session.start to each chunk's fragment, and each chunk's own compute time (denoise + decode, as
    the server's stream measured it): their difference is what serving adds, measured in the same run."""
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws") + "/v1/realtime/video", max_size=2**28) as ws:
        start, marks, compute = time.perf_counter(), [], []
        ws.send(json.dumps({"type": "session.start", "format": "m4s", **request}))
        while True:
            message = ws.recv(timeout=1200)
            if isinstance(message, bytes):
                marks.append(time.perf_counter() - start)
                continue
            message = json.loads(message)
            if message["type"] == "video.chunk_metadata":
                compute.append(message["timings"]["denoise_s"] + message["timings"]["decode_s"])
            elif message["type"] in ("session.done", "error"):
                return marks, compute


def _post(url: str, request: dict, chunks: int) -> list[float]:
    """Seconds from the POST to the first bytes of the growing /content response, then evenly to its end (the
    response's pieces are network reads, not chunks: only its first byte and its end are chunk boundaries)."""
    import httpx

    with httpx.Client(base_url=url, timeout=1200) as client:
        start, first = time.perf_counter(), None
        video = client.post("/v1/videos", json=request).json()
        with client.stream("GET", f"/v1/videos/{video['id']}/content") as response:
            for _ in response.iter_raw():
                first = first if first is not None else time.perf_counter() - start
        end = time.perf_counter() - start
        client.delete(f"/v1/videos/{video['id']}")
        return [first + (end - first) * i / (chunks - 1) for i in range(chunks)] if chunks > 1 else [first]


def _summary(runs: list[list[float]]) -> dict:
    first = [r[0] for r in runs]
    per_chunk = [b - a for r in runs for a, b in zip(r, r[1:])]
    return {"first_chunk_s": round(statistics.median(first), 3),
            "per_chunk_s": round(statistics.median(per_chunk), 3) if per_chunk else None,
            "runs_s": [[round(m, 3) for m in r] for r in runs]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m helios.bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="helios-tiny")
    p.add_argument("--size", default="320x192", help="WIDTHxHEIGHT (default 320x192)")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--port", type=int, default=8719)
    p.add_argument("--pyramid-steps", type=int, nargs="+", help="(default: the model's)")
    args = p.parse_args(argv)
    import httpx
    import torch

    from ..pipeline.generate import HeliosPipeline
    from ..sampling.options import SamplingOptions

    width, height = map(int, args.size.split("x"))
    request = {"prompt": "a red fox running through fresh snow", "size": args.size, "seed": 1,
               "num_frames": 33 * args.chunks}
    steps = {} if args.pyramid_steps is None else {"pyramid_num_inference_steps_list": tuple(args.pyramid_steps)}
    if args.pyramid_steps is not None:
        request["pyramid_steps"] = args.pyramid_steps
    pipe = HeliosPipeline.from_pretrained(args.model, device="cpu" if not torch.cuda.is_available() else None)
    opts = SamplingOptions(height=height, width=width, num_frames=33 * args.chunks, seed=1, **steps)
    plan = pipe.plan(request["prompt"], opts)
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen([sys.executable, "-m", "helios", "serve", "--model", args.model, "--port",
                                   str(args.port), "--data-dir", data], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{args.port}"
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"helios serve exited with code {server.returncode} (is port {args.port} free?)")
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            _library(pipe, plan), _realtime(url, request)  # warm-ups
            runs, added = {"library": [], "realtime": [], "post_content": []}, []
            for _ in range(args.runs):
                runs["library"].append(_library(pipe, plan))
                marks, compute = _realtime(url, request)
                runs["realtime"].append(marks)
                added += [b - a - c for a, b, c in zip(marks, marks[1:], compute[1:])]
                runs["post_content"].append(_post(url, request, args.chunks))
        finally:
            server.terminate()
            server.wait()
    result = {"model": args.model, "size": args.size, "chunks": args.chunks, "device": str(pipe.device),
              "threads": torch.get_num_threads(), **{k: _summary(v) for k, v in runs.items()}}
    result["realtime"]["added_per_chunk_s"] = round(statistics.median(added), 3) if added else None
    lib = result["library"]
    for way in ("realtime", "post_content"):
        r = result[way]
        r["first_chunk_overhead_s"] = round(r["first_chunk_s"] - lib["first_chunk_s"], 3)
        r["per_chunk_overhead_s"] = round(r["per_chunk_s"] - lib["per_chunk_s"], 3)
        print(f"{way}: first chunk {r['first_chunk_s']} s (library {lib['first_chunk_s']} s), per chunk "
              f"{r['per_chunk_s']} s (library {lib['per_chunk_s']} s)", file=sys.stderr)
    print(f"serving adds {result['realtime']['added_per_chunk_s']} s per chunk to the stream's own compute "
          "(same run)", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
