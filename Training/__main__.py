"""``python -m Training <command>``: see :mod:`Training.cli`."""

import sys

from .cli import main

sys.exit(main())
