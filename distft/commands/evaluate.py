"""`distft evaluate` / `python -m distft.evaluate`: score a checkpoint against its base: loss, perplexity, ROUGE/F1/EM, samples."""

import sys

from distft.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
