"""``python -m roadwork.cli ...``: the same as the ``roadwork`` command."""

import sys

from roadwork.cli import main

sys.exit(main())
