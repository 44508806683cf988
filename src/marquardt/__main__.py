"""``python -m marquardt``: the command line of :mod:`marquardt.cli`."""

from .cli import main

raise SystemExit(main())
