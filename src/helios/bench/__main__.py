"""`python -m helios.bench COMMAND ...`: the one dispatcher; each command is a module with main(argv), and no
command imports this file."""

import importlib
import sys

COMMANDS = {  # command -> (module, what it measures)
    "transformer": ("reference", "one forward at Helios's token layout, ours vs the reference"),
    "pipeline": ("reference", "a whole tiny generation, ours vs the reference pipeline"),
    "load": ("reference", "from_pretrained(torch_dtype=bf16) of a sharded checkpoint: peak RSS, time, vs the reference"),
    "_load": ("reference", None),
    "memory": ("memory", 'offload="blocks" against a resident transformer, in host memory'),
    "phases": ("phases", "the README's first command: its wall time, and its time per phase"),
    "serve": ("serve", "the server's overhead against the library call"),
    "parallel": ("parallel", "sequence parallelism on 1, 2, 4 processes: time per step, bytes moved"),
    "quantize": ("quantize", "int8 / fp8 weight-only against bf16: bytes, error, time, PSNR, load peak"),
    "realtime": ("realtime", "Helios-Distilled end to end with each speed option, vs the reference (GPU: 14B)"),
}


def usage() -> str:
    lines = ["usage: python -m helios.bench COMMAND [--help | options]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items() if text]
    return "\n".join(lines + ["", "Measurements and how to read them: docs/benchmarks.md"])


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    module = importlib.import_module(f".{COMMANDS[argv[0]][0]}", __package__)
    # reference.py parses its own subcommands (they share options); the others take what follows the name
    module.main(argv if module.__name__.endswith(".reference") else argv[1:])


main(sys.argv[1:])
