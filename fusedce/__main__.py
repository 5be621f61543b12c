"""``python -m fusedce``: the ``fusedce`` command (see ``fusedce.app.cli``)."""

import sys

from .app.cli import main

sys.exit(main())
