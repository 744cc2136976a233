"""`python -m mbv2.summary <dir> [--sort KEY] [--no-plot]` (see mbv2.summary)."""
import sys

from mbv2.summary.report import main

sys.exit(main())
