"""`python -m helios.bench`: see helios/bench/reference.py, and helios/bench/memory.py for `memory`."""

import sys

if sys.argv[1:2] == ["memory"]:
    from .memory import main

    main(sys.argv[2:])
else:
    from .reference import main

    main()
