"""Developer tools: benchmarks of helios against the reference implementation (diffusers 0.42.1).

Not part of the library's API. They need the reference, which the test extra installs (`pip install -e ".[test]"`),
and run as `python -m helios.bench COMMAND` (see `python -m helios.bench --help` and docs/benchmarks.md).
An app layer: it imports the library layers and the reference; nothing imports it. common.py holds what the
commands share, __main__.py dispatches to them.
"""
