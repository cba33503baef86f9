"""`python -m helios.bench`: see helios/bench/reference.py; `memory`: helios/bench/memory.py; `serve`:
helios/bench/serve.py."""

import sys

if sys.argv[1:2] == ["memory"]:
    from .memory import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["serve"]:
    from .serve import main

    main(sys.argv[2:])
else:
    from .reference import main

    main()
