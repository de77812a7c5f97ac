"""`distft data` / `python -m distft.data`: prepare a run's data ahead of a job: clean, template, tokenize, cache, report."""

import sys

from distft.data.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
