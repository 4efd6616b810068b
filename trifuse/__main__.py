"""``python -m trifuse``: the ``trifuse`` command."""
import sys

from .cli import main

sys.exit(main())
