"""``python -m act_core ...``: the same command line as the ``act`` console script."""

from .cli import main

raise SystemExit(main())
