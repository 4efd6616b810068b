"""``python -m trifuse.bench.device``: see :mod:`trifuse.bench.device`."""

import sys

from . import main

sys.exit(main())
