"""``python -m scripts``: the same entry point as the ``pvemu`` console script."""

from __future__ import annotations

from pvemu.scripts.cli import main

raise SystemExit(main())
