"""`python -m train <command>`: the same as the `pfc` console script."""

from .cli import main

raise SystemExit(main())
