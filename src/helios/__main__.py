"""`python -m helios ...` (and `torchrun -m helios ...`): the helios command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
