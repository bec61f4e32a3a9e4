"""`python -m analysis.cli`: the `landscape` command without its installed script (torchrun -m, subprocess tests)."""

import sys

from analysis.cli import main

sys.exit(main())
