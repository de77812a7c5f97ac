"""`distft plan` / `python -m distft.plan`: per-GPU memory, time and advice for a config."""

import sys

from distft.plan.report import main

if __name__ == "__main__":
    sys.exit(main())
