"""`distft export` / `python -m distft.export`: write a checkpoint as a standalone Hugging Face model (adapter or merged)."""

import sys

from distft.checkpoint.export import main

if __name__ == "__main__":
    sys.exit(main())
