"""`python -m mbv2.summary <dir> [--sort KEY] [--no-plot]` and `python -m mbv2.summary grid
<sweep dir> --rows KEY --cols KEY --out PREFIX` (see mbv2.summary)."""
import sys

from mbv2.summary.report import main

sys.exit(main())
