"""The real tokenizer families: training is deterministic within and across processes.

The in-process tests: tests/unit/test_tokenizer_families.py."""

import hashlib
import subprocess
import sys

from distft.data import tokenizers as tokenizer_families
from distft.data.tokenizers import build_tokenizer


def test_training_is_deterministic_within_and_across_processes():
    before = {f: tokenizer_families.trained_backend(f, 1000) for f in ("llama2", "llama3")}
    vocab = build_tokenizer("llama2").get_vocab()
    tokenizer_families.clear_cache()
    assert build_tokenizer("llama2").get_vocab() == vocab
    assert {f: tokenizer_families.trained_backend(f, 1000) for f in before} == before
    # Rust hash maps are seeded per process: train again in a fresh one and compare digests.
    code = (
        "import hashlib; from distft.data.tokenizers import trained_backend as t; "
        "print(*(hashlib.sha256(t(f, 1000).encode()).hexdigest() for f in ('llama2', 'llama3')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [hashlib.sha256(before[f].encode()).hexdigest() for f in ("llama2", "llama3")]

