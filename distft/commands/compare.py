"""`distft compare` / `python -m distft.compare`: score several checkpoints or runs on the same prompts, one report."""

import sys

from distft.evaluation.compare import main

if __name__ == "__main__":
    sys.exit(main())
