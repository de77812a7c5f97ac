"""Tokenized samples as three flat arrays, in memory or memory-mapped from the data cache.

A sample is `{"input_ids", "labels"}` where every label is either its token or -100 (distft's
encoding never predicts another token than the one at the position: the loss shifts). So n samples
are stored as
- `tokens`: int32, every sample's ids end to end;
- `targets`: uint8, 1 where the label is the token, 0 where it is -100;
- `offsets`: int64, n + 1 entries; sample i is tokens[offsets[i]:offsets[i + 1]].

Why arrays and not lists of dicts: a Python list of ints costs ~36 bytes per token (an 8-byte
pointer and, above 256, a 28-byte int object) against 5 here, and a memory-mapped array costs a
rank nothing until it reads the rows it trains on: every rank of every node maps the same cache
file (`distft/datacache.py`), and the page cache holds it once per machine. Packing works on
`lengths` only and says which samples share a row (`distft/batching.py`); the ids are gathered
when a micro-batch is built.

Indexing gives the old shape (`samples[i] == {"input_ids": [...], "labels": [...]}`), so code and
tests that look at single samples read them as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Union

import numpy as np

IGNORE_INDEX = -100  # a label the loss skips (torch cross_entropy's ignore_index); distft.model re-exports it

ARRAYS = ("tokens", "targets", "offsets")
DTYPES = {"tokens": np.int32, "targets": np.uint8, "offsets": np.int64}


class TokenSamples:
    """n tokenized samples (see the module docstring); read-only once built."""

    def __init__(self, tokens: np.ndarray, targets: np.ndarray, offsets: np.ndarray):
        if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens) or len(targets) != len(tokens):
            raise ValueError(f"inconsistent sample arrays: {len(tokens)} tokens, {len(targets)} targets, "
                             f"offsets ending at {offsets[-1] if len(offsets) else None}")
        self.tokens, self.targets, self.offsets = tokens, targets, offsets
        self._lengths = None

    # -- building

    @classmethod
    def from_pieces(cls, pieces: Iterable[tuple[np.ndarray, np.ndarray]]) -> TokenSamples:
        """From (ids, targets) array pairs, one per sample, in order."""
        pieces = list(pieces)
        lengths = np.fromiter((len(ids) for ids, _ in pieces), dtype=np.int64, count=len(pieces))
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if pieces:
            tokens = np.concatenate([ids for ids, _ in pieces]).astype(np.int32, copy=False)
            targets = np.concatenate([t for _, t in pieces]).astype(np.uint8, copy=False)
        else:
            tokens, targets = np.zeros(0, np.int32), np.zeros(0, np.uint8)
        return cls(tokens, targets, offsets)

    @classmethod
    def from_samples(cls, samples: Iterable[dict]) -> TokenSamples:
        """From `{"input_ids", "labels"}` dicts (lists of ints)."""
        return cls.from_pieces(piece(s["input_ids"], s["labels"]) for s in samples)

    # -- reading

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = np.diff(self.offsets)
        return self._lengths

    @property
    def token_count(self) -> int:
        return int(self.offsets[-1])

    @property
    def target_count(self) -> int:
        # in chunks: a memory-mapped array is summed without being read into memory at once
        step = 1 << 24
        return int(sum(int(np.count_nonzero(self.targets[i : i + step])) for i in range(0, len(self.targets), step)))

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def labels(self, i: int) -> np.ndarray:
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.where(self.targets[a:b] != 0, self.tokens[a:b], IGNORE_INDEX)

    def __getitem__(self, index: Union[int, slice]):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        return {"input_ids": self.ids(index).tolist(), "labels": self.labels(index).tolist()}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenSamples):
            return (len(self) == len(other) and np.array_equal(self.offsets, other.offsets)
                    and np.array_equal(self.tokens, other.tokens) and np.array_equal(self.targets, other.targets))
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    __hash__ = None  # mutable arrays underneath

    def __repr__(self) -> str:
        return f"TokenSamples({len(self)} samples, {self.token_count} tokens)"

    # -- files

    def save(self, directory: str, name: str) -> dict:
        """Write `<name>.<array>.npy` files into `directory` (fsynced); their sizes, for the manifest."""
        sizes = {}
        for array in ARRAYS:
            path = os.path.join(directory, f"{name}.{array}.npy")
            with open(path, "wb") as f:
                _write_npy(f, np.ascontiguousarray(getattr(self, array), dtype=DTYPES[array]))
                f.flush()
                os.fsync(f.fileno())
            sizes[array] = os.path.getsize(path)
        return sizes

    @classmethod
    def load(cls, directory: str, name: str, mmap: bool = True) -> TokenSamples:
        """The arrays `save` wrote, memory-mapped read-only (or read, mmap=False)."""
        mode = "r" if mmap else None
        arrays = [np.load(os.path.join(directory, f"{name}.{array}.npy"), mmap_mode=mode) for array in ARRAYS]
        for array, value in zip(ARRAYS, arrays):
            if value.dtype != DTYPES[array] or value.ndim != 1:
                raise ValueError(f"{name}.{array}.npy holds {value.dtype} of {value.ndim} dimensions")
        return cls(*arrays)


def _write_npy(f, array: np.ndarray) -> None:
    """np.save's format, written through the file object in chunks: np.save's own write of a real
    file (ndarray.tofile) reports a full disk as "N requested and M written", without its errno,
    so distft.files could not say that the disk is full."""
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
    np.lib.format.write_array_header_1_0(f, header)
    data = memoryview(array).cast("B")
    step = 1 << 24
    for start in range(0, len(data), step):
        f.write(data[start : start + step])


def piece(input_ids, labels) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, targets uint8) of one sample; a label that is neither its token nor -100 is a bug."""
    ids = np.asarray(input_ids, dtype=np.int32)
    lab = np.asarray(labels, dtype=np.int64)
    targets = lab != IGNORE_INDEX
    if len(lab) != len(ids) or not np.array_equal(lab[targets], ids[targets]):
        raise ValueError("a sample's labels must each be its token or -100")
    return ids, targets.astype(np.uint8)
