"""``python -m causalpatch``: the same command line as the ``causalpatch`` script (and
``python -m causalpatch.cli``)."""

from __future__ import annotations

import sys

from causalpatch.cli import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app(prog_name="causalpatch"))
