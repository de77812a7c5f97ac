"""Packing and batching: tokenized samples -> micro-batches of tensors, in a resumable order.

Packed rows carry position_ids that restart at 0 per sample and no attention_mask: transformers
builds a block-diagonal causal mask from them (only when no KV cache is built: call the model
with use_cache=False), so packed samples neither attend to nor shift the positions of one
another. Unpacked rows are right-padded per micro-batch and carry an attention_mask instead.

The order is a pure function of (seed, epoch, index), which is why resuming needs only
`{"epoch", "index"}` and why runs with the same global batch on different numbers of ranks see
the same data.
"""

from __future__ import annotations

import bisect
import copy
import random
from typing import TYPE_CHECKING, Optional

import numpy as np

from distft.config import PACK_STRATEGIES
from distft.data.samples import IGNORE_INDEX, TokenSamples
from distft.errors import DataError

if TYPE_CHECKING:
    import torch


def pack(samples, max_seq_len: int, pad_id: int, strategy: str = "best_fit") -> list[dict]:
    """Rows of exactly max_seq_len tokens, as lists (for looking at them; training builds its rows
    from `pack_index` as it goes); position_ids restart per sample, and the padding at the end of
    a row is a segment of its own (labels -100). No sample is split. `samples`: TokenSamples or
    `{"input_ids", "labels"}` dicts.

    best_fit: row by row, longest sample first, then the longest samples that keep the row
    fillable (see _best_fit_order); rows come out longest-first, so callers that train shuffle
    them. in_order: greedy in the given order, a new row whenever the next sample does not fit.
    """
    samples = as_samples(samples)
    order, bounds = pack_index(samples.lengths, max_seq_len, strategy)
    batch = collate_packed(samples, [order[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)],
                           max_seq_len, pad_id)
    return [{k: v[r].tolist() for k, v in batch.items()} for r in range(len(bounds) - 1)] if len(bounds) > 1 else []


def mix_counts(available: list[int], weights: list[float]) -> list[int]:
    """Samples each source gives an epoch of sum(available) samples: weight / sum(weights) of it,
    rounded by largest remainder (ties to the earlier source) so that the counts add up."""
    total, weight_sum = sum(available), float(sum(weights))
    shares = [w / weight_sum * total for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mixed_order(sources: np.ndarray, weights: list[float], seed: int, epoch: int) -> list[int]:
    """The samples of one epoch of a mix, before the epoch's shuffle: source i gives
    mix_counts(...)[i] samples, each of its samples whole times over (weights above its size
    repeat it) plus a draw without replacement, seeded by (seed, epoch), for the rest. A pure
    function of (seed, epoch), like the order of an unmixed epoch."""
    members = [np.flatnonzero(sources == i).tolist() for i in range(len(weights))]
    rng = random.Random(f"mix-{seed}-{epoch}")
    order: list[int] = []
    for own, count in zip(members, mix_counts([len(m) for m in members], weights)):
        whole, rest = divmod(count, len(own))
        order += own * whole + sorted(rng.sample(own, rest))
    return order


def as_samples(samples) -> TokenSamples:
    return samples if isinstance(samples, TokenSamples) else TokenSamples.from_samples(samples)


def pack_index(lengths: np.ndarray, max_seq_len: int, strategy: str = "best_fit") -> tuple[np.ndarray, np.ndarray]:
    """Packing as index arrays: (order, bounds), where row r holds the samples
    order[bounds[r]:bounds[r + 1]] (positions in `lengths`), in that order; len(bounds) = rows + 1.
    What `pack` lays out, without touching a token."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > max_seq_len:  # cleaning prevents it
        raise ValueError(f"sample of {int(lengths.max())} tokens does not fit max_seq_len={max_seq_len}")
    if strategy == "best_fit":
        order = np.asarray(_best_fit_order(lengths.tolist(), max_seq_len), dtype=np.int64)
    elif strategy == "in_order":
        order = np.arange(len(lengths), dtype=np.int64)
    else:
        raise ValueError(f"unknown packing strategy {strategy!r}; choose one of {', '.join(PACK_STRATEGIES)}")
    return order, _row_bounds(lengths[order].tolist(), max_seq_len)


def _row_bounds(lengths: list[int], max_seq_len: int) -> np.ndarray:
    """Where each row starts when samples of these lengths are packed greedily in this order."""
    bounds, used = [0], 0
    for i, n in enumerate(lengths):
        if used + n > max_seq_len:
            bounds.append(i)
            used = 0
        used += n
    if lengths:
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


def _best_fit_order(lengths: list[int], max_seq_len: int) -> list[int]:
    """Sample indices grouped row by row, so that packing them in order gives the best-fit rows.
    Each row takes the longest samples left while its room exceeds twice the longest length
    (up to FILL_WINDOW tokens), then fills what is left as fully as any subset of the remaining
    samples can (a bounded subset sum over their distinct lengths, bit sets as Python ints):
    a plain longest-first fill strands gaps shorter than every sample, ~5% padding on the
    tiny synthetic data against <1% this way. Among equal lengths the earliest sample goes first.
    """

    by_length: dict[int, list[int]] = {}
    for i in reversed(range(len(lengths))):  # stacks: pop() gives the earliest sample of a length
        by_length.setdefault(lengths[i], []).append(i)
    lengths = sorted(by_length)  # distinct lengths still present, ascending
    order: list[int] = []

    def take(n: int) -> None:
        stack = by_length[n]
        order.append(stack.pop())
        if not stack:
            del by_length[n]
            lengths.pop(bisect.bisect_left(lengths, n))

    while lengths:
        room = max_seq_len - lengths[-1]
        take(lengths[-1])
        while lengths and room > min(3 * lengths[-1], FILL_WINDOW):
            n = lengths[bisect.bisect_right(lengths, room) - 1] if lengths[0] <= room else 0
            if not n:
                break
            room -= n
            take(n)
        for n in _best_subset(room, lengths, by_length):
            take(n)
    return order


FILL_WINDOW = 1024  # rooms up to this many tokens are filled by exact subset sum


def _best_subset(room: int, lengths: list[int], by_length: dict[int, list[int]]) -> list[int]:
    """Lengths (with repeats, within the samples left) whose sum is the largest possible <= room.

    A bounded subset sum: bit s of reach[j] is set when sum s is reachable with fitting[:j]. The
    copies of a length are added in binary pieces (1, 2, 4, ... of them: the same reachable sums in
    log2 shifts), and the scan stops once `room` itself is reachable: the walk back then takes no
    copy of a later length, so the choice is the one the full scan makes."""
    fitting = lengths[: bisect.bisect_right(lengths, room)]
    if not fitting:
        return []
    mask = (1 << (room + 1)) - 1
    full = 1 << room
    reach = [1]
    bits = 1
    for n in fitting:
        copies, cap, piece = len(by_length[n]), room // n, 1
        if cap < copies:
            copies = cap
        while copies:
            take = piece if piece < copies else copies
            bits |= (bits << (n * take)) & mask
            copies -= take
            piece <<= 1
        reach.append(bits)
        if bits & full:
            break
    target = reach[-1].bit_length() - 1
    chosen: list[int] = []
    for j in range(len(reach) - 2, -1, -1):  # walk back: how many of fitting[j] the target needs
        n, copies = fitting[j], 0
        while not (reach[j] >> target) & 1:
            target -= n
            copies += 1
        chosen += [n] * copies
    return chosen


def collate_packed(samples: TokenSamples, rows: list[np.ndarray], max_seq_len: int, pad_id: int) -> dict:
    """Packed rows (each a list of sample indices) -> input_ids/labels/position_ids of max_seq_len."""
    shape = (len(rows), max_seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty(shape, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            a, b = int(samples.offsets[i]), int(samples.offsets[i + 1])
            n = b - a
            ids = samples.tokens[a:b]
            input_ids[r, at : at + n] = ids
            labels[r, at : at + n] = np.where(samples.targets[a:b] != 0, ids, IGNORE_INDEX)
            position_ids[r, at : at + n] = _ARANGE[:n] if n <= len(_ARANGE) else np.arange(n)
            at += n
        position_ids[r, at:] = np.arange(max_seq_len - at)  # the padding: a segment of its own
    import torch  # here, not at the top: the tokenizing processes import this module and need no torch

    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids)}


_ARANGE = np.arange(1 << 16, dtype=np.int64)


def collate_padded(samples: TokenSamples, indices, pad_id: int) -> dict:
    """Unpacked samples -> right-padded input_ids/labels with an attention_mask, as wide as the longest."""
    spans = [(int(samples.offsets[i]), int(samples.offsets[i + 1])) for i in indices]
    width = max(b - a for a, b in spans)
    input_ids = np.full((len(spans), width), pad_id, dtype=np.int64)
    labels = np.full((len(spans), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(spans), width), dtype=np.int64)
    for r, (a, b) in enumerate(spans):
        ids = samples.tokens[a:b]
        input_ids[r, : b - a] = ids
        labels[r, : b - a] = np.where(samples.targets[a:b] != 0, ids, IGNORE_INDEX)
        attention_mask[r, : b - a] = 1
    import torch

    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(attention_mask)}


class TrainBatches:
    """Infinite, deterministic, resumable micro-batches for one rank.

    Epoch e shuffles the samples with seed + e, packs them (or not; best-fit rows are shuffled
    again) and cuts the rows into
    micro-batches; the epoch is trimmed to a whole number of optimizer steps over all ranks
    (micro_batch_size x world_size x accumulation_steps rows), and rank r takes micro-batches
    r, r + world_size, ... So one optimizer step consumes the same rows whatever the split between
    ranks and accumulation, and (epoch, index) is the whole state.
    """

    def __init__(
        self,
        samples,
        micro_batch_size: int,
        max_seq_len: int,
        packing: bool,
        pad_id: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        accumulation_steps: int = 1,
        pack_strategy: str = "best_fit",
        sources: Optional[np.ndarray] = None,
        weights: Optional[list[float]] = None,
    ):
        """`sources` and `weights`: a mix (data.sources): each sample's source index, and the
        sources' weights; every epoch then holds mixed_order's samples."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.samples = self._as_samples(samples)
        self.micro_batch_size, self.max_seq_len = micro_batch_size, max_seq_len
        self.packing, self.pad_id, self.seed, self.shuffle = packing, pad_id, seed, shuffle
        self.pack_strategy = pack_strategy
        self.sources, self.weights = sources, weights
        self.rank, self.world_size, self.accumulation_steps = rank, world_size, accumulation_steps
        self.epoch, self.index = 0, 0
        self._built_epoch: Optional[int] = None
        # The epoch as index arrays: row k of the epoch holds the samples
        # _order[_bounds[_rows[k]] : _bounds[_rows[k] + 1]] (unpacked: the one sample _order[_rows[k]]).
        self._order = self._bounds = self._rows = np.zeros(0, dtype=np.int64)
        self._load_epoch()

    @staticmethod
    def _as_samples(samples):
        return as_samples(samples)

    def _load_epoch(self) -> None:
        if self._built_epoch == self.epoch:
            return
        if self.sources is not None:
            order = mixed_order(self.sources, self.weights, self.seed, self.epoch)
        else:
            order = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        self._order = np.asarray(order, dtype=np.int64)
        del order
        if self.packing:
            within, self._bounds = pack_index(self.samples.lengths[self._order], self.max_seq_len, self.pack_strategy)
            self._order = self._order[within]
            rows = list(range(len(self._bounds) - 1))
            if self.pack_strategy == "best_fit" and self.shuffle:
                # Best fit emits rows by the length of their longest sample: shuffle the rows too.
                random.Random(f"rows-{self.seed}-{self.epoch}").shuffle(rows)
            self._rows = np.asarray(rows, dtype=np.int64)
        else:
            self._rows = np.arange(len(self._order), dtype=np.int64)
        self._built_epoch = self.epoch
        if self.batches_per_epoch == 0:
            group = self.micro_batch_size * self.world_size * self.accumulation_steps
            raise DataError(
                f"only {len(self._rows)} training sequences per epoch, fewer than one optimizer step needs "
                f"(micro_batch_size x world size x accumulation = {group}); add data or lower train.global_batch_size"
            )

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.packing:
            members = [self._order[self._bounds[r] : self._bounds[r + 1]] for r in rows]
            return collate_packed(self.samples, members, self.max_seq_len, self.pad_id)
        return collate_padded(self.samples, self._order[rows], self.pad_id)

    @property
    def rows_per_epoch(self) -> int:
        """Packed rows (or samples) of the current epoch, over all ranks, before trimming."""
        self._load_epoch()
        return len(self._rows)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields in the current epoch."""
        group = self.world_size * self.accumulation_steps
        return len(self._rows) // self.micro_batch_size // group * group // self.world_size

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self._load_epoch()
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._load_epoch()
        start = (self.index * self.world_size + self.rank) * self.micro_batch_size
        self.index += 1
        return self._batch(self._rows[start : start + self.micro_batch_size])

    def state_dict(self) -> dict:
        """The position in the data as rows consumed this epoch over all ranks, so it means the
        same on any number of ranks (`index` is this rank's micro-batch count)."""
        return {"epoch": self.epoch, "rows_consumed": self.index * self.world_size * self.micro_batch_size,
                "index": self.index, "world_size": self.world_size, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        rows, per_index = int(state["rows_consumed"]), self.world_size * self.micro_batch_size
        if rows % per_index:
            raise ValueError(
                f"the data position ({rows} rows into epoch {state['epoch']}) is not a whole number of "
                f"micro-batches of {self.micro_batch_size} on {self.world_size} ranks; resume with a "
                "train.micro_batch_size and world size whose product divides it"
            )
        self.epoch, self.index = int(state["epoch"]), rows // per_index
        self._load_epoch()


def eval_batches(samples, batch_size: int, max_seq_len: int, packing: bool, pad_id: int,
                 pack_strategy: str = "best_fit") -> EvalBatches:
    """Every eval sample, in batches (the last one may be smaller)."""
    return EvalBatches(as_samples(samples), batch_size, max_seq_len, packing, pad_id, pack_strategy)


class EvalBatches:
    """The eval split's batches, built when read (a list of tensors for a large eval split would
    hold it all in memory on every rank, 24 bytes per token); indexing and slicing as a list."""

    def __init__(self, samples: TokenSamples, batch_size: int, max_seq_len: int, packing: bool, pad_id: int,
                 pack_strategy: str = "best_fit"):
        self.samples, self.batch_size, self.max_seq_len = samples, batch_size, max_seq_len
        self.packing, self.pad_id, self.pack_strategy = packing, pad_id, pack_strategy
        if packing:
            order, bounds = pack_index(samples.lengths, max_seq_len, pack_strategy)
            self._rows = [order[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]
        else:
            self._rows = list(range(len(samples)))
        self._count = -(-len(self._rows) // batch_size)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step != 1 or start != 0:
                return [self[i] for i in range(start, stop, step)]
            limited = copy.copy(self)
            limited._count = max(0, stop)
            return limited
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(f"eval batch {index} of {self._count}")
        rows = self._rows[index * self.batch_size : (index + 1) * self.batch_size]
        if self.packing:
            return collate_packed(self.samples, rows, self.max_seq_len, self.pad_id)
        return collate_padded(self.samples, rows, self.pad_id)

    def __iter__(self):
        return (self[i] for i in range(self._count))
