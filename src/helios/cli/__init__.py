"""The `helios` command: generate videos to files, and inspect models.

A thin consumer of the library (pipeline/generate.py, sampling/plan.py, pipeline/folder.py). It checks what it can
before loading anything heavy (paths, the model name, sizes), then writes the pipeline's chunks to a video file as they
arrive (pipeline/video_io.py) while reporting progress (progress.py). Errors are one line on stderr: exit code 2 for
bad input, 1 for other failures, 130 for Ctrl-C; --debug shows the traceback instead.
The top app layer: it may import every layer below it, serve/ included (helios serve), never bench/.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import metadata
from pathlib import Path

from ..pipeline.folder import BUILTIN_MODELS, PUBLISHED
from . import checks
from .common import BAD_INPUT, EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, quiet_libraries, show_warnings

EXAMPLES = f"""
examples:
  # a first run, anywhere (CPU, seconds): a tiny random model, so the video is noise
  helios generate --model helios-tiny --prompt "a red fox running through fresh snow" --output fox.mp4

  # the published 14B model (GPU): 240 frames ask for 8 chunks of 33, so 261 frames (10.9 s at 24 fps)
  helios generate --model {PUBLISHED[2]} --prompt "a red fox running through fresh snow" \\
      --num-frames 240 --output fox.mp4

  # image-to-video, video-to-video
  helios generate --model {PUBLISHED[2]} --prompt "..." --image first_frame.png --output i2v.mp4
  helios generate --model {PUBLISHED[2]} --prompt "..." --video clip.mp4 --output v2v.mp4

  # a long, interactive video: prompts change on a schedule (lines of n_chunks<TAB>prompt, or a CSV)
  helios generate --model {PUBLISHED[2]} --prompt-schedule story.tsv --state story.state --output story.mp4
  # ... interrupted? The state alone continues it (story.partial.mp4 holds what is done)
  helios generate --resume story.state

  # a GPU with 24 GB or less: --offload auto (the default) picks a plan that fits and says which; or choose one
  helios generate --model {PUBLISHED[2]} --prompt "..." --offload blocks --output fox.mp4
  # int8 weights (half the memory; pip install "helios[quantize]") and a LoRA adapter at scale 0.8
  helios generate --model {PUBLISHED[2]} --prompt "..." --quantize int8 --lora my_style.safetensors:0.8 -o fox.mp4

  # one video on 8 GPUs: each process holds 1/8 of the tokens; --cfg-parallel (Base, Mid) splits guidance's passes
  torchrun --nproc-per-node 8 -m helios generate --model {PUBLISHED[0]} --prompt "..." --cfg-parallel --output fox.mp4

  helios info {PUBLISHED[2]}

  # serve an OpenAI-style video API, a live steerable stream and a web page on http://127.0.0.1:8000/
  helios serve --model helios-tiny

built-in models: {", ".join(BUILTIN_MODELS)} (tiny random weights; no download)
"""
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage is one --help away."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"helios: error: {message} (see: {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_warnings(getattr(args, "quiet", False), args.debug)
    previous = checks.handle_sigterm()  # SIGTERM ends a run as Ctrl-C does, keeping what is finished
    try:
        return args.run(args)
    except KeyboardInterrupt as err:
        print("helios: interrupted", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_INTERRUPTED)
    except Exception as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        rank = os.environ.get("RANK", "0")  # under torchrun every process reports its own failure
        print(f"helios{'' if rank == '0' else f' (rank {rank})'}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(err, BAD_INPUT) else EXIT_FAILURE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="helios", description="Helios: long videos from text, an image or a video.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"helios {metadata.version('helios')}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(metavar="COMMAND", required=True, parser_class=_Parser)
    generate = commands.add_parser("generate", parents=[common], help="generate a video file",
                                   description="Generate a video, chunk by chunk, into an MP4 file.",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _generate_arguments(generate)
    generate.set_defaults(run=_run_generate)
    info = commands.add_parser("info", parents=[common], help="describe and check a model",
                               description="Describe a model (variant, sampler, defaults, config, parameters, "
                               "dtypes, size) and check that every component is present and loads.")
    info.add_argument("model", metavar="MODEL", help="a model folder, a Hugging Face repo id, or a built-in name")
    info.add_argument("--quick", action="store_true",
                      help="read no weights: check configs, file completeness and the transformer's names/shapes")
    info.set_defaults(run=_run_info)
    serve = commands.add_parser("serve", parents=[common], help="serve a video API, a live stream and a web page",
                                description="Serve the model over HTTP: OpenAI's /v1/videos API, a steerable live "
                                "stream (WebSocket /v1/realtime/video, vLLM-Omni's protocol), and a web page at /. "
                                "Jobs run one at a time, first come first served; they survive a restart with the "
                                "same --data-dir.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _serve_arguments(serve)
    _lora_argument(serve)
    _memory_arguments(serve)
    _speed_arguments(serve)
    serve.set_defaults(run=_run_serve)
    return parser


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="M",
                   help=f"a model folder, a Hugging Face repo id, or a built-in model ({', '.join(BUILTIN_MODELS)})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs an API "
                   "key or --insecure)")
    p.add_argument("--port", type=int, default=8000, help="(default 8000)")
    p.add_argument("--api-key", metavar="K", help="require 'Authorization: Bearer K' on every route but /health "
                   "(default: $HELIOS_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="where jobs and videos are kept; a restart with the "
                   "same folder lists them and resumes unfinished ones (default: a helios-serve folder in the "
                   "temporary directory)")
    p.add_argument("--max-queue", type=checks.positive_int, default=16, metavar="N",
                   help="jobs that may wait; more get HTTP 429 (default 16)")
    p.add_argument("--max-seconds", type=_positive_fps, default=120, metavar="S",
                   help="longest video a request may ask for, in seconds (default 120)")
    p.add_argument("--max-upload-mb", type=checks.positive_int, default=50, metavar="N",
                   help="largest input_reference upload (default 50)")
    p.add_argument("--session-timeout", type=_positive_fps, default=60, metavar="S",
                   help="close a live session with no generation progress and no ping for S seconds (default 60)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="transformer and text encoder dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    _parallel_arguments(p)


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to generate")
    # --model and a prompt are required unless --resume gives them (resume.resolve_arguments); the arguments whose
    # default is None there get their default in resume.DEFAULTS, or the saved run's value.
    g.add_argument("--model", metavar="M",
                   help=f"(required) a model folder, a Hugging Face repo id ({', '.join(PUBLISHED)}), or a built-in "
                   f"model ({', '.join(BUILTIN_MODELS)}: tiny random weights, its videos are noise)")
    prompts = g.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", metavar="TEXT")
    prompts.add_argument("--prompt-schedule", metavar="FILE", type=Path,
                         help="prompts that change over the video: lines of 'n_chunks<TAB>prompt', or a CSV with a "
                         "'prompt' column (optional 'n_chunks', 'id', 'prompt_index'; the official interactive CSV "
                         "works) or header-less rows 'n_chunks,prompt'. A new prompt is blended in over "
                         "--interpolation-steps chunks")
    g.add_argument("--schedule-id", metavar="ID", help="the video to take from a CSV holding several (its 'id')")
    g.add_argument("--chunks-per-prompt", type=checks.positive_int, default=7, metavar="N",
                   help="chunks per prompt for a CSV without a chunk count column (default: 7, as the official script)")
    g.add_argument("--negative-prompt", metavar="TEXT", help="(default: the official negative prompt; used with "
                   "guidance > 1 only)")
    conditioning = g.add_mutually_exclusive_group()
    conditioning.add_argument("--image", type=Path, metavar="PATH", help="image-to-video: start from this image")
    conditioning.add_argument("--video", type=Path, metavar="PATH",
                              help="video-to-video: continue this video (at least 33 frames)")
    _lora_argument(g, " (with --resume, the run's own)")
    v = p.add_argument_group("video")
    v.add_argument("--num-frames", type=checks.frame_count, metavar="N",
                   help="frames to generate, rounded up to whole 33-frame chunks, then trimmed to 4n+1 (default: "
                   "the model's; 240 for Distilled, 99 for Base and Mid; the schedule's length with "
                   "--prompt-schedule; at most a day of video, 2073600)")
    v.add_argument("--height", type=checks.positive_int, metavar="H", help="(default 384; a multiple of 64 for Mid and "
                   "Distilled, of 16 for Base; built-in models default to 128x192)")
    v.add_argument("--width", type=checks.positive_int, metavar="W", help="(default 640)")
    v.add_argument("--fps", type=_positive_fps, metavar="F", help="frame rate of the file (default 24)")
    v.add_argument("--output", "-o", type=Path, metavar="PATH",
                   help="the .mp4 to write (default output.mp4); it grows beside it as NAME.partial.mp4, which "
                   "plays at any time, and is renamed at the end")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --output (it stays until the new "
                   "video is complete), or an interrupted run's NAME.partial.mp4; without it they are kept and the "
                   "run refused")
    v.add_argument("--crf", type=int, choices=range(52), metavar="0-51",
                   help="H.264 quality: 0 lossless (in 4:2:0 YUV), 18 visually lossless (default), 23 smaller")
    v.add_argument("--lossless", action="store_true", default=None,
                   help="exact 8-bit RGB frames (libx264rgb); plays in ffmpeg, mpv, VLC, not in browsers")
    _sampler_arguments(p)
    _speed_arguments(p)
    _memory_arguments(p, auto=True)


def _sampler_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("sampler (defaults: the official scripts' settings for the model's variant)")
    s.add_argument("--steps", type=checks.positive_int, metavar="N", help="denoising steps, Base (default 50)")
    s.add_argument("--pyramid-steps", type=checks.positive_int, nargs="+", metavar="N",
                   help="steps per pyramid stage, Mid and Distilled (default 20 20 20 for Mid, 2 2 2 for Distilled)")
    s.add_argument("--guidance", type=checks.guidance, metavar="G", help="classifier-free guidance scale (default 5.0 for "
                   "Base and Mid, 1.0 = none for Distilled)")
    s.add_argument("--amplify-first-chunk", action=argparse.BooleanOptionalAction,
                   help="twice the steps for chunk 0 (default: on for Distilled)")
    s.add_argument("--skip-first-chunk", action="store_true", default=None,
                   help="anchor on chunk 1 instead of chunk 0 (if the first chunk of I2V/V2V comes out static)")
    s.add_argument("--interpolation-steps", type=checks.positive_int, metavar="N",
                   help="chunks over which a scheduled prompt change is blended (default 3; 1 = switch at once)")
    s.add_argument("--seed", type=checks.seed, metavar="S", help="(default: random, printed at the end; an integer "
                   "in [-2**63, 2**64))")
    s.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                   help="transformer and text encoder dtype (default auto: bfloat16 on CUDA, float32 on CPU; with "
                   "--resume, the run's own; the VAE runs in float32)")
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default auto: cuda if available; with --resume, the "
                   "run's choice)")
    s.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks, for GPUs: one graph "
                   "per stage size, all compiled before the first chunk (the wait is printed); on a CPU it gains "
                   "nothing")
    s.add_argument("--compile-mode", choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead"),
                   help="implies --compile. default: Inductor's defaults; max-autotune-no-cudagraphs: also tunes the "
                   "matmuls (a longer compile, what the official scripts use); reduce-overhead: CUDA graphs, CUDA "
                   "only (default: default)")
    _parallel_arguments(p)
    r = p.add_argument_group("long runs and output")
    r.add_argument("--state", type=Path, metavar="PATH", help="save the generation state here after every chunk")
    r.add_argument("--resume", type=Path, metavar="PATH", help="continue an interrupted run from its --state file; "
                   "the state holds the run's arguments (other arguments given must agree with them, --device may "
                   "change), and keeps being saved there")
    out = r.add_mutually_exclusive_group()
    out.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    out.add_argument("--json", action="store_true", help="one JSON object per chunk on stdout, then a summary")


def _lora_argument(p, more: str = "") -> None:
    p.add_argument("--lora", action="append", type=checks.lora_spec, default=[], metavar="PATH[:SCALE]",
                   help="a LoRA adapter: a safetensors file, a folder holding pytorch_lora_weights.safetensors, or a "
                   f"Hugging Face repo id; SCALE defaults to 1. Repeat for several adapters{more}")


def _speed_arguments(p: argparse.ArgumentParser) -> None:
    # Not saved in --state: it changes when frames are made, not which (resume may choose again).
    p.add_argument("--overlap-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="decode chunk k while chunk k + 1 denoises, on a CUDA stream of its own (same frames; a "
                   "prompt change may land one chunk later). Default auto: on for CUDA without --offload, off on a "
                   "CPU, where it gains nothing; not with --offload")


def _memory_arguments(p: argparse.ArgumentParser, auto: bool = False) -> None:
    m = p.add_argument_group("low memory (README: Low memory)")
    # generate: None = not given, so that --resume can take the run's own; it then means auto (generate.py)
    m.add_argument("--offload", choices=("auto", "none", "text_encoder", "model", "blocks") if auto else ("model", "blocks"),
                   help=("auto (the default on CUDA): the fastest plan that fits the GPU's free memory, said in one "
                         "line; on a CPU, none; none: everything stays on the device; text_encoder: the text encoder "
                         "and the transformer take turns on the GPU, each staying until the other needs it; " if auto
                         else "") +
                   "model: keep the text encoder, transformer and VAE in RAM, each on the GPU only while it runs "
                   "(the GPU holds the largest one, 28.6 GB at 14B); blocks: also stream the transformer's blocks "
                   "to the GPU at every forward (a few GB of GPU memory; from pinned RAM when it holds them, else "
                   "from the checkpoint; bound by PCIe; with --quantize, the quantized blocks are held in RAM, half "
                   "the bytes)" + ("" if auto else ". Default: everything stays on the device"))
    m.add_argument("--quantize", choices=("int8", "fp8", "fp8-compute"), help="quantize the transformer's blocks "
                   "while loading, about half the bytes of bf16 (14.6 GB at 14B). int8, fp8: weight-only, for memory "
                   "(slower than bf16 on a GPU); fp8-compute: fp8 activations x fp8 weights, for speed, on GPUs with "
                   "fp8 tensor cores (compute capability 8.9+: L4, H100). Needs torchao: pip install "
                   "\"helios[quantize]\"; with --resume, the run's own")
    m.add_argument("--text-encoder-device", metavar="DEVICE",
                   help="run the text encoder here for good, e.g. cpu (then it needs no GPU memory; it runs once per "
                   "prompt). Default: --device")


def _parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several GPUs (under torchrun --nproc-per-node N; see the README)")
    g.add_argument("--cfg-parallel", action=argparse.BooleanOptionalAction,
                   help="run the two passes of classifier-free guidance (Base, Mid) on two halves of the processes, "
                   "each half splitting the tokens among its own (needs an even number of processes; with --resume, "
                   "the run's choice when the launch has an even number)")
    g.add_argument("--dist-timeout", type=checks.positive_int, default=600, metavar="S",
                   help="seconds a process waits for the others before it gives up with an error (default 600)")


def _positive_fps(text: str):
    from fractions import Fraction

    try:
        value = Fraction(text).limit_denominator(1001)  # 30000/1001 and 29.97 both work
    except (ValueError, ZeroDivisionError):
        value = Fraction(0)
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"must be a frame rate in (0, 1000], got {text!r}")
    return value


def _run_generate(args) -> int:
    from .generate import generate

    return generate(args)


def _run_serve(args) -> int:
    from .serve import serve

    return serve(args)


def _run_info(args) -> int:
    from ..pipeline.folder import BUILTIN_MODELS, model_path
    from .info import describe

    quiet_libraries(args.debug)
    with model_path(args.model) as (folder, builtin):
        title = (f"{args.model}: built-in tiny model with random weights (its videos are noise), built in a "
                 "temporary folder"
                 if builtin else f"{args.model}: {folder.resolve()}")
        lines, ok = describe(folder, title, BUILTIN_MODELS[builtin].defaults if builtin else None, quick=args.quick)
    print("\n".join(lines))
    return 0 if ok else EXIT_FAILURE


