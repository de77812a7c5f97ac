"""`distft chat` / `python -m distft.chat`: talk to a checkpoint in the terminal, rendered as training rendered."""

import sys

from distft.evaluation.chat import main

if __name__ == "__main__":
    sys.exit(main())
