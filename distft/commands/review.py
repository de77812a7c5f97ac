"""`distft review` / `python -m distft.review`: read predictions side by side on a local page and rate them blind."""

import sys

from distft.evaluation.review import main

if __name__ == "__main__":
    sys.exit(main())
