"""What the `helios` subcommands share: exit codes, the failure class, quieting other libraries, path checks."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

HELIOS_DIR = str(Path(__file__).resolve().parents[1])  # warnings raised from here on are helios' own

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


class GenerationFailed(RuntimeError):
    """A failure after generation started (not bad input): exit code 1."""


def show_warnings(quiet: bool, debug: bool) -> None:
    """helios' warnings as one "helios: warning: ..." line each; other libraries' only with --debug (as they word
    them); none at all with --quiet. Set first thing, so that warnings raised while importing are covered too."""
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if str(filename).startswith(HELIOS_DIR):
            return f"helios: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    if quiet:
        warnings.simplefilter("ignore")
    elif not debug:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"helios(\.|$)")  # inserted first: wins over "ignore"


def quiet_libraries(debug: bool) -> None:
    """Keep other libraries' logs and loading bars out of the command's output (--debug keeps them): for example
    diffusers' advice to install accelerate. Each library through a switch that holds even if it sets up its logger
    later: setting a logger's level before the library's first import is undone by that import. (Download bars of the
    hub stay: they are progress on a long wait.)"""
    if debug:
        return
    import logging

    # torchao (the quantize extra: diffusers imports it whenever it is installed) logs lines about optional native
    # kernels it does not need and about deprecated torch.compile registrations (through torch's pytree logger) when
    # it is imported; these loggers keep a level set before that import.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()
    # diffusers (imported by the VAE code only) takes its level from DIFFUSERS_VERBOSITY at its first import; if it is
    # imported already, its logger keeps the level set here.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def check_writable(path: Path, what: str) -> None:
    """Fail now, not after an hour of generation, if `path` cannot be written."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{what} {path}: the folder {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.")
    except OSError as err:
        raise PermissionError(f"{what} {path} cannot be written: cannot create a file in {parent} "
                              f"({err.strerror or err})") from err
    os.close(fd)
    os.unlink(probe)
