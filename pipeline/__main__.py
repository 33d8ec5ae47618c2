"""``python -m pipeline`` is the ``unlearnable`` command."""

import sys

from pipeline.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports it again
    sys.exit(main())
