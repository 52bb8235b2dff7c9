"""``python -m drift_monitor.cli``: the console script without its entry point (torchrun runs it so)."""

import sys

from . import main

sys.exit(main())
