"""``python -m fusedce``: the ``fusedce`` command (see ``fusedce.cli``)."""

import sys

from .cli import main

sys.exit(main())
