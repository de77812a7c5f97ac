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

import random
from typing import Optional

import torch

from distft.config import PACK_STRATEGIES
from distft.errors import DataError
from distft.model import IGNORE_INDEX


def pack(samples: list[dict], max_seq_len: int, pad_id: int, strategy: str = "best_fit") -> list[dict]:
    """Rows of exactly max_seq_len tokens; position_ids restart per sample, and the padding at
    the end of a row is a segment of its own (labels -100). No sample is split.

    best_fit: row by row, longest sample first, then the longest samples that keep the row
    fillable (see _best_fit_order); rows come out longest-first, so callers that train shuffle
    them. in_order: greedy in the given order, a new row whenever the next sample does not fit.
    """
    if strategy == "best_fit":
        samples = [samples[i] for i in _best_fit_order(samples, max_seq_len)]
    elif strategy != "in_order":
        raise ValueError(f"unknown packing strategy {strategy!r}; choose one of {', '.join(PACK_STRATEGIES)}")
    return _pack_in_order(samples, max_seq_len, pad_id)


def _best_fit_order(samples: list[dict], max_seq_len: int) -> list[int]:
    """Sample indices grouped row by row, so that packing them in order gives the best-fit rows.

    Each row takes the longest samples left while its room exceeds twice the longest length
    (up to FILL_WINDOW tokens), then fills what is left as fully as any subset of the remaining
    samples can (a bounded subset sum over their distinct lengths, bit sets as Python ints):
    a plain longest-first fill strands gaps shorter than every sample, ~5% padding on the
    tiny synthetic data against <1% this way. Among equal lengths the earliest sample goes first.
    """
    import bisect

    by_length: dict[int, list[int]] = {}
    for i in reversed(range(len(samples))):  # stacks: pop() gives the earliest sample of a length
        by_length.setdefault(len(samples[i]["input_ids"]), []).append(i)
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
    """Lengths (with repeats, within the samples left) whose sum is the largest possible <= room."""
    fitting = [n for n in lengths if n <= room]
    if not fitting:
        return []
    mask = (1 << (room + 1)) - 1
    reach = [1]  # reach[j]: bit s set when sum s is reachable with fitting[:j]
    for n in fitting:
        bits = reach[-1]
        for _ in range(min(len(by_length[n]), room // n)):
            bits |= (bits << n) & mask
        reach.append(bits)
    target = reach[-1].bit_length() - 1
    chosen: list[int] = []
    for j in range(len(fitting) - 1, -1, -1):  # walk back: how many of fitting[j] the target needs
        n, copies = fitting[j], 0
        while not (reach[j] >> target) & 1:
            target -= n
            copies += 1
        chosen += [n] * copies
    return chosen


def _pack_in_order(samples: list[dict], max_seq_len: int, pad_id: int) -> list[dict]:
    rows: list[dict] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}

    def flush() -> None:
        pad = max_seq_len - len(current["input_ids"])
        rows.append(
            {
                "input_ids": current["input_ids"] + [pad_id] * pad,
                "labels": current["labels"] + [IGNORE_INDEX] * pad,
                "position_ids": current["position_ids"] + list(range(pad)),
            }
        )
        current.update(input_ids=[], labels=[], position_ids=[])

    for sample in samples:
        n = len(sample["input_ids"])
        if n > max_seq_len:
            raise ValueError(f"sample of {n} tokens does not fit max_seq_len={max_seq_len}")  # cleaning prevents it
        if len(current["input_ids"]) + n > max_seq_len:
            flush()
        current["input_ids"] += sample["input_ids"]
        current["labels"] += sample["labels"]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        flush()
    return rows


def collate(rows: list[dict], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows -> input_ids/labels/position_ids; samples -> right-padded with attention_mask."""
    if packing:
        keys = ("input_ids", "labels", "position_ids")
        return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in keys}
    width = max(len(r["input_ids"]) for r in rows)
    pads = [width - len(r["input_ids"]) for r in rows]
    return {
        "input_ids": torch.tensor([r["input_ids"] + [pad_id] * p for r, p in zip(rows, pads)], dtype=torch.long),
        "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * p for r, p in zip(rows, pads)], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * (width - p) + [0] * p for p in pads], dtype=torch.long),
    }


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
        samples: list[dict],
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
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.samples, self.micro_batch_size, self.max_seq_len = samples, micro_batch_size, max_seq_len
        self.packing, self.pad_id, self.seed, self.shuffle = packing, pad_id, seed, shuffle
        self.pack_strategy = pack_strategy
        self.rank, self.world_size, self.accumulation_steps = rank, world_size, accumulation_steps
        self.epoch, self.index = 0, 0
        self._built_epoch: Optional[int] = None
        self._rows: list[dict] = []
        self._load_epoch()

    def _load_epoch(self) -> None:
        if self._built_epoch == self.epoch:
            return
        order = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        ordered = [self.samples[i] for i in order]
        self._rows = pack(ordered, self.max_seq_len, self.pad_id, self.pack_strategy) if self.packing else ordered
        if self.packing and self.pack_strategy == "best_fit" and self.shuffle:
            # Best fit emits rows by the length of their longest sample: shuffle the rows too.
            random.Random(f"rows-{self.seed}-{self.epoch}").shuffle(self._rows)
        self._built_epoch = self.epoch
        if self.batches_per_epoch == 0:
            group = self.micro_batch_size * self.world_size * self.accumulation_steps
            raise DataError(
                f"only {len(self._rows)} training sequences per epoch, fewer than one optimizer step needs "
                f"(micro_batch_size x world size x accumulation = {group}); add data or lower train.global_batch_size"
            )

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
        return collate(self._rows[start : start + self.micro_batch_size], self.packing, self.pad_id)

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


def eval_batches(samples: list[dict], batch_size: int, max_seq_len: int, packing: bool, pad_id: int,
                 pack_strategy: str = "best_fit") -> list[dict]:
    """Every eval sample, in batches (the last one may be smaller)."""
    rows = pack(samples, max_seq_len, pad_id, pack_strategy) if packing else samples
    return [collate(rows[i : i + batch_size], packing, pad_id) for i in range(0, len(rows), batch_size)]
