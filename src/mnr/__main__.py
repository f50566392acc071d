"""``python -m mnr`` (what torchrun launches) is the ``mnr`` command."""

import sys

from mnr.cli import main

sys.exit(main())
