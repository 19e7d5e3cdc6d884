"""``python -m fedlora_lite ...`` is the same as the ``fedlora-lite`` console command."""

import sys

from .course.cli import main

sys.exit(main())
