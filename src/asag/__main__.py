"""``python -m asag`` runs the command line (same as the ``asag`` script)."""

import sys

from asag.cli import main

sys.exit(main())
