"""`helios serve`: load the model once, then serve the HTTP API, the realtime WebSocket and the page with uvicorn.

Checks come first (the bind address against the key, the data dir, the model name), then the model loads, then the
jobs a previous run left unfinished in --data-dir are queued again (they resume from their last whole chunk).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ..pipeline.folder import check_model_name, noise_notice, open_model_folder
from ..scale.launch import check_launch, process_device, process_group, rank, world_size
from .common import quiet_libraries


def serve(args) -> int:
    key = args.api_key or os.environ.get("HELIOS_API_KEY") or None
    from ..serve.security import is_loopback

    if not is_loopback(args.host) and key is None and not args.insecure:
        raise ValueError(f"--host {args.host} is not a loopback address: give an API key (--api-key or "
                         "HELIOS_API_KEY), or --insecure to serve anyone who can reach it")
    check_model_name(args.model)
    data_dir = args.data_dir or Path(tempfile.gettempdir()) / "helios-serve"
    data_dir.mkdir(parents=True, exist_ok=True)
    quiet_libraries(args.debug)
    from ..pipeline.generate import HeliosPipeline
    from .checks import check_lora, device_and_dtype, text_encoder_device

    check_lora(args)
    device, dtype = device_and_dtype(args)  # an unusable device is bad input, said before loading
    encoder_device = text_encoder_device(args)
    holder, model = open_model_folder(args.model)
    try:
        check_launch(world_size(), model.attention_heads, args.cfg_parallel, model.defaults.get("guidance_scale", 1.0))
        device = process_device(device)  # under torchrun: this process's GPU
        with process_group(device, args.dist_timeout) as several:
            pipe = HeliosPipeline.from_pretrained(model, torch_dtype=dtype, device=device, offload=args.offload,
                                                  text_encoder_device=encoder_device, quantize=args.quantize)
            for path, scale in args.lora:
                pipe.load_lora_weights(path, scale=scale)
            if several:
                return _serve_in_parallel(args, pipe, model, key, data_dir)
            return _serve(args, pipe, model, key, data_dir)
    finally:
        if holder is not None:
            holder.cleanup()


def _serve_in_parallel(args, pipe, model, key, data_dir) -> int:
    """Under torchrun: rank 0 serves, and every other rank runs each of its streams with it (mirror.py)."""
    from ..scale.mirror import follow, lead
    from ..scale.parallel import parallelize_pipeline

    parallelize_pipeline(pipe, cfg_parallel=args.cfg_parallel)
    if rank() != 0:
        follow(pipe)
        return 0
    end = lead(pipe)
    try:
        return _serve(args, pipe, model, key, data_dir)
    finally:
        end()


def _serve(args, pipe, model, key, data_dir) -> int:
    import uvicorn

    from ..serve.app import Server, create_app
    from ..serve.jobs import Worker
    from ..serve.restore import restore_jobs
    from ..serve.storage import Store

    store = Store(data_dir)
    worker = Worker(pipe, store, args.max_queue, overlap_decode=args.overlap_decode)
    server = Server(pipe, model, args.model, store, worker, key, float(args.max_seconds), args.max_upload_mb * 2**20,
                    float(args.session_timeout))
    restored = restore_jobs(server)
    worker.start()
    if model.builtin:
        print(f"helios: note: {noise_notice(args.model)}", file=sys.stderr)
    print(f"helios: serving {args.model} on http://{_url_host(args.host)}:{args.port}/ (data in {data_dir}; "
          f"{restored} unfinished jobs resumed)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning",
                ws_max_size=8 * 2**20, timeout_graceful_shutdown=2)
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
