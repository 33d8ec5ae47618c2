"""``python -m pipeline`` is the ``unlearnable`` command."""

import sys

from pipeline.cli import main

sys.exit(main())
