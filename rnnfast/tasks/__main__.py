"""``python -m rnnfast.tasks``: see :mod:`rnnfast.tasks`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
