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
file (`distft/data/cache.py`), and the page cache holds it once per machine. Packing works on
`lengths` only and says which samples share a row (`distft/data/batching.py`); the ids are gathered
when a micro-batch is built.

Indexing gives the old shape (`samples[i] == {"input_ids": [...], "labels": [...]}`), so code and
tests that look at single samples read them as before.

On disk each array is a `.npy` file with its size and checksum (`save`'s result, kept in the data
cache's manifest, which compares the checksums: distft/data/cache.py). `load` opens a file only if
it is a regular file of that size (never a link, a FIFO or a device: the cache is untrusted),
checks its header's dtype and shape, and maps it; `problem` says whether the ids fit a
vocabulary. The checksum is xxh3-64: ~15 GB/s on one core, a 1M-row cache (1.3 GB) in ~0.1 s,
where sha256 or blake2b would take ~2 s of a start-up of 5-8 s (bench/RESULTS.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Optional, Union

import numpy as np

from distft.files import NotAFile, open_regular

IGNORE_INDEX = -100  # a label the loss skips (torch cross_entropy's ignore_index); distft.model.build re-exports it

ARRAYS = ("tokens", "targets", "offsets")
DTYPES = {"tokens": np.int32, "targets": np.uint8, "offsets": np.int64}
CHECKSUM = "xxh3_64"  # the manifest's name for `checksum`'s digest


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

    # -- checks

    def problem(self, vocab_size: int) -> Optional[tuple[str, str]]:
        """(the array, why) these samples cannot be trained with a vocabulary of `vocab_size` ids,
        or None: every id in [0, vocab_size), every target flag 0 or 1 (a label is its token or
        -100), no sample of negative length. An id past the embedding would otherwise end in an
        IndexError steps into training."""
        if len(self.tokens):
            # One pass for both bounds: as uint32, a negative int32 id is above 2**31, so above any vocabulary.
            ids = self.tokens.view(np.uint32) if self.tokens.dtype == np.int32 else self.tokens
            if int(ids.max()) >= vocab_size or (ids is self.tokens and int(ids.min()) < 0):
                low = int(self.tokens.min())
                bad = low if low < 0 else int(self.tokens.max())
                return "tokens", f"token id {bad} is outside the tokenizer's vocabulary of {vocab_size} ids"
        if len(self.targets) and int(self.targets.max()) > 1:
            return "targets", (f"a target flag is {int(self.targets.max())}: each must be 0 (label -100) or 1 "
                               "(label = the token)")
        if len(self) and int(self.lengths.min()) < 0:
            return "offsets", "its offsets decrease: a sample would have a negative length"
        return None

    # -- files

    def save(self, directory: str, name: str) -> dict:
        """Write `<name>.<array>.npy` files, new ones, into `directory` (fsynced); {file name:
        {"bytes", CHECKSUM}} of each, for the manifest."""
        return {f"{name}.{array}.npy": save_array(os.path.join(directory, f"{name}.{array}.npy"), getattr(self, array),
                                                  DTYPES[array]) for array in ARRAYS}

    @classmethod
    def load(cls, directory: str, name: str, files: Optional[dict] = None) -> TokenSamples:
        """The arrays `save` wrote, memory-mapped read-only (`load_array`; `files`: `save`'s result,
        each file's size to check)."""
        arrays = []
        for array in ARRAYS:
            file = f"{name}.{array}.npy"
            arrays.append(load_array(os.path.join(directory, file), DTYPES[array], files[file]["bytes"] if files else None))
        try:
            return cls(*arrays)
        except ValueError as err:
            raise ValueError(f"{name}.*.npy: {err}") from None


def checksum(buffer) -> str:
    """xxh3-64 (hex) of the bytes of `buffer`: an array (memory-mapped or not, C-contiguous) or bytes.
    64 bits: it catches damage, it is no seal (whoever can write the cache can rewrite the manifest)."""
    import xxhash

    return xxhash.xxh3_64(memoryview(buffer).cast("B")).hexdigest()


def unreadable(path: str, err: OSError) -> str:
    """Why the file `path` could not be opened, naming it by its name: "x.npy is a named pipe
    (FIFO), not a regular file", "x.npy is 8 bytes, its manifest says 16", "x.npy cannot be read
    (No such file or directory)"."""
    file = os.path.basename(path)
    if isinstance(err, NotAFile):
        return str(err).replace(path, file)
    return f"{file} cannot be read ({err.strerror or err})"


def save_array(path: str, array: np.ndarray, dtype) -> dict:
    """`array` as `dtype` into the new file `path` (np.save's format, fsynced; created with O_EXCL
    and O_NOFOLLOW: never an existing file or a planted link); {"bytes", CHECKSUM}."""
    array = np.ascontiguousarray(array, dtype=dtype)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        _write_npy(f, array)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    return {"bytes": size, CHECKSUM: checksum(array)}


def load_array(path: str, dtype, size: Optional[int] = None) -> np.ndarray:
    """The one-dimensional `dtype` array of the .npy file `path`, memory-mapped read-only. The
    file is opened only if it is a regular file (`distft.files.open_regular`: not a link, a FIFO
    or a device) of `size` bytes, and its header must say `dtype`, one dimension and a length that
    fills the file. A ValueError names the file and what is wrong."""
    file = os.path.basename(path)
    dtype = np.dtype(dtype)
    try:
        with open_regular(path, "rb", size=size) as f:
            size = os.fstat(f.fileno()).st_size
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f"npy format version {version}")
            shape, fortran_order, found = readers[version](f)
            offset = f.tell()
            if found != dtype or len(shape) != 1 or fortran_order:
                raise ValueError(f"it holds {found} of shape {shape}, not one dimension of {dtype}")
            if offset + shape[0] * dtype.itemsize != size:
                raise ValueError(f"its header says {shape[0]} items, its {size} bytes hold another number")
            array = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)
    except OSError as err:  # not there, not a regular file (distft.files.NotAFile), not of its size
        raise ValueError(unreadable(path, err)) from None
    except ValueError as err:
        raise ValueError(f"{file} is not an array file of this cache ({err})") from None
    return array


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
