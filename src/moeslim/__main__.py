"""``python -m moeslim``: the same command line as the ``moeslim`` script."""

from moeslim.cli import main

raise SystemExit(main())
