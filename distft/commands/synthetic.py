"""`distft synthetic` / `python -m distft.synthetic`: write the embedded synthetic instruction tasks as JSONL."""

import sys

from distft.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
