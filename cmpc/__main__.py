"""`python -m cmpc` is the `cmpc` console script."""

from cmpc.cli import main

raise SystemExit(main())
