"""`python -m helios.bench`: see helios/bench/reference.py."""

from .reference import main

main()
