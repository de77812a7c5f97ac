"""`distft sweep` / `python -m distft.sweep`: summarise a Hydra multirun: one table and a plot of every point."""

import sys

from distft.evaluation.sweep import main

if __name__ == "__main__":
    sys.exit(main())
