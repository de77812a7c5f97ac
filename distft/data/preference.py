"""Preference pairs (issue 40's data side): a prompt, the answer preferred and the one rejected.

Row formats (TRL's, so preference sets from the Hub read as they are):
- text: `{"prompt": str, "chosen": str, "rejected": str}` (and an optional Alpaca `input`);
  rendered like an Alpaca row whose instruction is the prompt and whose output is the answer
  (`data.template`: alpaca, chat, ...);
- conversational: `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`, the
  answers usually one assistant message each (a bare string is taken as one); the prompt may hold
  a system turn and earlier turns;
- implicit prompt: `{"chosen": [messages], "rejected": [messages]}`, two whole conversations that
  share their opening: the prompt is the longest run of identical messages they start with.

Each side is encoded exactly as supervised fine-tuning encodes the same conversation
(`pipeline.encode`: the template, the bos the tokenizer adds, eos or the template's end of turn),
so a pair trains on the text an SFT run of the same model would see; its targets are the answer's
tokens only (the last assistant turn: earlier assistant turns of a multi-turn prompt are context).
Cleaning rejects, with the same counting as SFT rows: a malformed row, an empty side, a pair whose
two answers are the same text once whitespace is collapsed (`identical`: it carries no
preference), and a side longer than data.max_seq_len (`overlong`; a pair is never cut, since its
answers' log-probabilities are what is compared).

`pair_batch` lays n pairs out as one micro-batch of 2n rows, the chosen first and the rejected in
the same order (distft.model.preference.split_pairs), right-padded, with an attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distft.config import DataConfig
from distft.data.batching import TrainBatches
from distft.data.encoding import Encoded
from distft.data.samples import IGNORE_INDEX

PAIR_FIELDS = ("prompt", "chosen", "rejected")  # a preference row's own fields; the rest are kept (task, ...)


class RejectedPair(Exception):
    def __init__(self, rule: str, reason: str):
        super().__init__(reason)
        self.rule, self.reason = rule, reason


@dataclass
class Pair:
    kind: str  # "alpaca" or "chat": how each side was rendered
    chosen: Encoded
    rejected: Encoded
    row: dict  # the canonical pair: prompt (text or messages), chosen and rejected answers


def is_preference_row(value: Any) -> bool:
    return isinstance(value, dict) and "chosen" in value and "rejected" in value


def _messages(value: Any, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise RejectedPair("malformed", f"{what} is not a string or a list of {{role: str, content: str}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def canonical_pair(value: Any) -> tuple[str, dict]:
    """(kind, {"prompt", "chosen", "rejected"}) of a raw preference row: kind "alpaca" with text
    fields, "chat" with message lists (an implicit prompt split off); RejectedPair otherwise."""
    if not is_preference_row(value):
        raise RejectedPair("malformed", "a preference row needs the fields 'chosen' and 'rejected' "
                                        f"(and usually 'prompt'); it has {sorted(value) if isinstance(value, dict) else type(value).__name__}")
    prompt, chosen, rejected = value.get("prompt"), value["chosen"], value["rejected"]
    extras = {k: v for k, v in value.items() if k not in PAIR_FIELDS}
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        kind, row = "alpaca", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        extras.pop("input", None)
        if isinstance(value.get("input"), str) and value["input"]:  # Alpaca's input, rendered as SFT renders it
            row["input"] = value["input"]
    else:
        kind = "chat"
        chosen_messages, rejected_messages = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if prompt is None:  # implicit: the shared opening of two whole conversations
            shared = 0
            while (shared < min(len(chosen_messages), len(rejected_messages)) - 1
                   and chosen_messages[shared] == rejected_messages[shared]):
                shared += 1
            prompt_messages = chosen_messages[:shared]
            chosen_messages, rejected_messages = chosen_messages[shared:], rejected_messages[shared:]
        else:
            prompt_messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                               else _messages(prompt, "prompt"))
        if not prompt_messages:
            raise RejectedPair("malformed", "no prompt: give 'prompt', or chosen and rejected conversations that "
                                            "open with the same messages")
        for side, messages in (("chosen", chosen_messages), ("rejected", rejected_messages)):
            if messages[-1]["role"] != "assistant":
                raise RejectedPair("malformed", f"{side} does not end with an assistant message")
        row = {"prompt": prompt_messages, "chosen": chosen_messages, "rejected": rejected_messages}
    for side in ("chosen", "rejected"):
        text = row[side] if kind == "alpaca" else row[side][-1]["content"]
        if not text.strip():
            raise RejectedPair("empty", f"blank {side} answer")
    if (kind == "alpaca" and " ".join(row["prompt"].split()) == "") or (
            kind == "chat" and not any(m["content"].strip() for m in row["prompt"])):
        raise RejectedPair("empty", "blank prompt")
    if _norm(row["chosen"]) == _norm(row["rejected"]):
        raise RejectedPair("identical", "chosen and rejected are the same answer: the pair prefers nothing")
    return kind, {**extras, **row}


def _norm(answer: Any) -> Any:
    if isinstance(answer, str):
        return " ".join(answer.split())
    return tuple((m["role"], " ".join(m["content"].split())) for m in answer)


def side_row(kind: str, row: dict, side: str) -> dict:
    """One side of a canonical pair as the SFT row it is rendered like."""
    if kind == "alpaca":
        return {"instruction": row["prompt"], "input": row.get("input", ""), "output": row[side]}
    return {"messages": row["prompt"] + row[side]}


def encode_pair(value: Any, cfg: DataConfig, tokenizer) -> Pair:
    """A raw preference row encoded: each side as SFT encodes its row (pipeline.encode), its
    targets cut to the final answer; RejectedPair for what cleaning drops (module docstring)."""
    from distft.data.pipeline import RejectedRow, encode

    kind, row = canonical_pair(value)
    sides = []
    for side in ("chosen", "rejected"):
        try:
            encoded, _ = encode(side_row(kind, row, side), kind, cfg, tokenizer)
        except RejectedRow as err:
            raise RejectedPair(err.rule, f"{side}: {err.reason}") from None
        if encoded.capped or len(encoded.input_ids) > cfg.max_seq_len:
            raise RejectedPair("overlong", f"{side} is {len(encoded.input_ids)} tokens, over data.max_seq_len="
                                           f"{cfg.max_seq_len} (a pair is never cut)")
        if encoded.prompt_len is None:
            raise RejectedPair("malformed", f"{side}: no answer tokens to score")
        labels = [IGNORE_INDEX] * encoded.prompt_len + encoded.labels[encoded.prompt_len:]
        sides.append(Encoded(encoded.input_ids, labels, encoded.prompt_len, False))
    return Pair(kind, sides[0], sides[1], row)


def pair_batch(pairs: list[Pair], pad_id: int, pack_len: int = 0) -> dict[str, torch.Tensor]:
    """n pairs as one micro-batch: their 2n answers' rows, the chosen, then the rejected.

    Unpacked (`pack_len` 0): 2n right-padded rows with an attention mask. Packed: the 2n rows
    placed first-fit, longest first, into as few rows of at most `pack_len` tokens as hold them,
    as SFT packs (distft/data/batching.py): position ids restarting at 0 per answer's row and no
    attention mask, so transformers attends within each row's own tokens only (no cross-
    attention between pairs, or between a pair's two sides); `sequences` names each position's
    answer (0..2n-1 in the unpacked order, -1 for the padding) for `answer_sums`. Either way a
    micro-batch holds the same pairs, so the loss is the same up to float rounding."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if not pack_len:
        width = max(len(r.input_ids) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            input_ids[i, :n] = torch.tensor(r.input_ids)
            labels[i, :n] = torch.tensor(r.labels)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(rows)), key=lambda k: (-len(rows[k].input_ids), k)):
        n = len(rows[i].input_ids)
        at = next((b for b, used in enumerate(fill) if used + n <= pack_len), None)
        if at is None:
            bins.append([])
            fill.append(0)
            at = len(bins) - 1
        bins[at].append(i)
        fill[at] += n
    width = max(fill)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    sequences = torch.full((len(bins), width), -1, dtype=torch.long)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(rows[i].input_ids)
            input_ids[b, at:at + n] = torch.tensor(rows[i].input_ids)
            labels[b, at:at + n] = torch.tensor(rows[i].labels)
            position_ids[b, at:at + n] = torch.arange(n)
            sequences[b, at:at + n] = i
            at += n
        position_ids[b, at:] = torch.arange(width - at)  # the padding: a segment of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sequences": sequences}


# --------------------------------------------------------------------------------------------
# A run's pairs: loaded, cleaned with counts, split.

RULES = ("malformed", "empty", "identical", "duplicate", "overlong")


@dataclass
class PairReport:
    """What happened to the preference rows: loaded = the dropped (by rule) + kept; kept = train + eval."""
    loaded: int = 0
    dropped: dict = None  # rule -> count
    first_dropped: dict = None  # rule -> "row 3 (line 4) of FILE: why"
    kept: int = 0
    train: int = 0
    eval: int = 0
    sources: list = None  # data.sources: [{"name", "weight", "samples"}] (training pairs per source)

    def __post_init__(self):
        self.sources = self.sources or []
        self.dropped = self.dropped or {rule: 0 for rule in RULES}
        self.first_dropped = self.first_dropped or {}

    def summary(self) -> str:
        counts = ", ".join(f"{rule} {self.dropped[rule]}" for rule in RULES)
        return (f"data: loaded {self.loaded} preference rows, dropped {sum(self.dropped.values())} ({counts}), "
                f"kept {self.kept}; train {self.train} pairs, eval {self.eval}")


@dataclass
class PreparedPairs:
    train: Any  # list of Pair, or a PairView of the data cache's arrays
    eval: Any
    report: Any  # PairReport while prepared, the DataReport (pairs=True) once cached
    sources: Any = None  # data.sources: each training pair's source index (numpy int32), else None


class PairView:
    """Pairs read from two aligned sample sets (the chosen answers and the rejected ones: the data
    cache's memory-mapped arrays), each pair built when it is indexed: what a run holds of its
    pairs is the cache's index arrays, as for SFT. The rows' texts are not kept (`row` is None);
    the held-out prompts are the cache's eval rows."""

    def __init__(self, chosen, rejected):
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen answers for {len(rejected)} rejected ones")
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)

    def _side(self, samples, i: int) -> Encoded:
        labels = samples.labels(i)
        targets = labels != IGNORE_INDEX
        return Encoded(samples.ids(i).tolist(), labels.tolist(), int(targets.argmax()) if targets.any() else None,
                       False)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return Pair("cached", self._side(self.chosen, index), self._side(self.rejected, index), None)


def synthetic_pairs(num_examples: int, seed: int, tasks) -> list[dict]:
    """The synthetic tasks as pairs: the right answer chosen, and a plausible wrong one rejected:
    the input echoed back unchanged (the lazy answer a small model falls into), or, where the
    input is part of the answer (repeat, an already sorted word), the answer of another row of the
    same task; for booking, the right JSON with the date as the sentence wrote it ("9 January",
    not "January 9"), the near miss a pretrained model makes."""
    import random

    from distft.data.synthetic import generate

    rows = generate(num_examples, seed, tasks)
    by_task: dict[str, list[str]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row["output"])
    rng = random.Random(f"pairs-{seed}")
    pairs = []
    for row in rows:
        others = [o for o in by_task[row["task"]] if o != row["output"]]
        # The echo, unless it is part of the answer (repeat: the word once of three times), which
        # would make the pair a test of length; then another row's answer, of the same form.
        echo = row["input"] if row["input"].strip() and row["input"] not in row["output"] else None
        rejected = echo if echo is not None else (rng.choice(others) if others else None)
        if row["task"] == "booking":  # a near miss, as a pretrained model makes it: the date as the sentence wrote it
            rejected = _date_as_written(row["output"])
        if rejected is not None:
            pairs.append({"prompt": row["instruction"], "input": row["input"], "chosen": row["output"],
                          "rejected": rejected, "task": row["task"]})
    return pairs


def _date_as_written(answer: str) -> str:
    """A booking's JSON answer with its "Month D" date as "D Month" (what the sentences write)."""
    import json

    record = json.loads(answer)
    month, day = record["date"].split()
    return json.dumps({**record, "date": f"{day} {month}"})


def prepare_pairs(cfg: DataConfig, tokenizer, rows: tuple | None = None) -> PreparedPairs:
    """The run's preference pairs, encoded (`encode_pair`), cleaned with counts by rule (a pair
    seen before is a duplicate), split as SFT rows split: data.eval_path's rows, or
    data.eval_size / eval_fraction of the rows, drawn with data.seed. `rows`: (train, eval) raw
    rows already loaded (the planner's sample; one source), instead of reading data.path."""
    import dataclasses
    import hashlib
    import random

    import numpy as np

    from distft.data.sources import RawRow, load_rows, parts, read_eval_path
    from distft.data.templates import use_chat_template
    from distft.errors import DataError

    use_chat_template(tokenizer, cfg.chat_template)
    report, seen = PairReport(), set()

    def clean(rows, part_cfg: DataConfig) -> list:
        kept = []
        for raw_row in rows:
            report.loaded += 1
            try:
                pair = encode_pair(raw_row.value, part_cfg, tokenizer)
                key = hashlib.blake2b(repr((pair.kind, _norm(pair.row["prompt"]), _norm(pair.row.get("input", "")),
                                            _norm(pair.row["chosen"]), _norm(pair.row["rejected"]))).encode(),
                                      digest_size=16).digest()
                if key in seen:
                    raise RejectedPair("duplicate", "the same pair as an earlier row")
                seen.add(key)
            except RejectedPair as err:
                report.dropped[err.rule] += 1
                report.first_dropped.setdefault(err.rule, f"{raw_row.where}: {err.reason}")
                continue
            kept.append(pair)
        return kept

    sources = parts(cfg)
    train: list = []  # (source index, pair)
    held_out: list = []
    for index, part in enumerate(sources):
        if rows is not None:
            raw, held = rows
        elif part.cfg.source == "synthetic":
            syn = part.cfg.synthetic
            raw = [RawRow(r, f"synthetic pair {i}") for i, r in enumerate(synthetic_pairs(
                syn.num_examples, syn.seed, list(syn.tasks)))]
            held = read_eval_path(cfg) if cfg.eval_path else None
        else:
            raw, held = load_rows(part.cfg, part.key)
        kept = clean(raw, part.cfg)
        if cfg.sources and not kept:
            raise DataError(f"no preference pairs left in {part.key}={part.cfg.path} ({report.summary()})"
                            f"{_firsts(report)}; preference rows are {{prompt, chosen, rejected}} with two different "
                            "answers (README: Preference tuning)")
        train += [(index, p) for p in kept]
        if held is not None:
            held_out += clean(held, part.cfg)
    if cfg.sources and cfg.eval_path:  # one eval file for the whole mix
        held_out += clean(read_eval_path(cfg), dataclasses.replace(cfg, template=sources[0].cfg.template))
    if not held_out and train:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        size = cfg.eval_size if cfg.eval_size else int(round(cfg.eval_fraction * len(train)))
        chosen = set(order[:size])
        held_out = [p for i, (_, p) in enumerate(train) if i in chosen]
        train = [item for i, item in enumerate(train) if i not in chosen]
    origin = np.fromiter((i for i, _ in train), dtype=np.int32, count=len(train)) if cfg.sources else None
    train = [p for _, p in train]
    if origin is not None:
        counts = np.bincount(origin, minlength=len(sources))
        report.sources = [{"name": p.name, "weight": p.weight, "samples": int(n)} for p, n in zip(sources, counts)]
        empty = [p.name for p, n in zip(sources, counts) if n == 0]
        if empty:
            raise DataError(f"data.sources: {', '.join(empty)} kept no training pairs after the eval split; give it "
                            "more rows, or lower data.eval_fraction / data.eval_size")
    report.kept, report.train, report.eval = len(train) + len(held_out), len(train), len(held_out)
    if not train or not held_out:
        raise DataError(f"no {'training' if not train else 'held-out'} preference pairs left ({report.summary()})"
                        f"{_firsts(report)}; preference rows are {{prompt, chosen, rejected}} with two different "
                        "answers (README: Preference tuning)")
    return PreparedPairs(train, held_out, report, origin)


def _firsts(report: PairReport) -> str:
    return "".join(f"; first {rule}: {where}" for rule, where in report.first_dropped.items())


def pairs_as_prepared(pairs: PreparedPairs, cfg: DataConfig, tokenizer):
    """The pairs as the SFT data the rest of a run reads (`PreparedData`): the samples of the
    chosen answers (the held-out loss is the loss on the preferred answers), the held-out prompts
    with the chosen answer as reference (the generation eval and its report), the report's counts
    (identical pairs under `identical`), the stop tokens and the format the rows were rendered in."""
    from distft.data.pipeline import Example, eval_row
    from distft.data.report import DataReport, PreparedData
    from distft.data.samples import TokenSamples, piece
    from distft.data.sources import parts
    from distft.data.templates import stop_token_ids

    def side_samples(group: list, side: str) -> TokenSamples:
        return TokenSamples.from_samples({"input_ids": getattr(p, side).input_ids, "labels": getattr(p, side).labels}
                                         for p in group)

    rows = [eval_row(Example(p.kind, side_row(p.kind, p.row, "chosen"), piece(p.chosen.input_ids, p.chosen.labels),
                             prompt_len=p.chosen.prompt_len), cfg, tokenizer) for p in pairs.eval]
    counted = pairs.report
    report = DataReport(loaded=counted.loaded, malformed=counted.dropped["malformed"], empty=counted.dropped["empty"],
                        duplicate=counted.dropped["duplicate"], overlong=counted.dropped["overlong"],
                        identical=counted.dropped["identical"], kept=counted.kept, train=counted.train,
                        eval=counted.eval, train_sequences=2 * counted.train, eval_sequences=counted.eval,
                        first_dropped=dict(counted.first_dropped), sources=list(counted.sources), pairs=True)
    report.train_tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs.train)
    report.train_target_tokens = sum(sum(t != IGNORE_INDEX for t in side.labels)
                                     for p in pairs.train for side in (p.chosen, p.rejected))
    names = [part.name for part in parts(cfg)] if cfg.sources else [cfg.path or cfg.source]
    formats: dict[tuple[int, str], int] = {}
    for i, p in enumerate(pairs.train):
        source = int(pairs.sources[i]) if pairs.sources is not None else 0
        name = "chat" if p.kind == "chat" or cfg.template == "chat" else cfg.template
        formats[(source, name)] = formats.get((source, name), 0) + 1
    report.formats = [{"source": names[i], "format": f, "rows": n} for (i, f), n in sorted(formats.items())]
    return PreparedData(side_samples(pairs.train, "chosen"), side_samples(pairs.eval, "chosen"),
                        [r for r in rows if r], report, stop_ids=stop_token_ids(tokenizer, cfg.stop_tokens),
                        train_sources=pairs.sources, packed_as=[cfg.packing, cfg.pack_strategy],
                        train_rejected=side_samples(pairs.train, "rejected"),
                        eval_rejected=side_samples(pairs.eval, "rejected"))


def build_pairs(cfg: DataConfig, tokenizer, seed: int = 0, rows: tuple | None = None):
    """`prepare_pairs` as the data cache builds it (distft.data.cache.prepared's `build`): a
    PreparedData whose train/eval samples are the chosen answers and train_rejected/eval_rejected
    the rejected ones, aligned pair by pair."""
    return pairs_as_prepared(prepare_pairs(cfg, tokenizer, rows), cfg, tokenizer)


def pairs_from_prepared(data) -> PreparedPairs:
    """The pairs of a PreparedData `build_pairs` made (in memory, or read from the cache)."""
    return PreparedPairs(PairView(data.train, data.train_rejected), PairView(data.eval, data.eval_rejected),
                         data.report, data.train_sources)


class PairBatches(TrainBatches):
    """`TrainBatches` over pairs: the same seeded order per epoch, the same rank and accumulation
    split and the same resumable position ({"epoch", "index"}), each micro-batch `pair_batch` of
    micro_batch_size pairs (2 x micro_batch_size rows) with `pair_index`, the pairs' positions in
    the training split (where their reference log-probs are). `pack_len` (data.packing: the
    max_seq_len): a micro-batch's answers packed into as few rows as hold them (`pair_batch`);
    packing changes the rows, never which pairs a step trains on."""

    def __init__(self, pairs, micro_batch_size: int, pad_id: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, accumulation_steps: int = 1, pack_len: int = 0,
                 sources=None, weights=None):
        super().__init__(pairs, micro_batch_size, 0, False, pad_id, seed=seed, shuffle=shuffle, rank=rank,
                         world_size=world_size, accumulation_steps=accumulation_steps, sources=sources,
                         weights=weights)
        self.pack_len = pack_len

    @staticmethod
    def _as_samples(samples):
        return samples

    def _batch(self, rows) -> dict[str, torch.Tensor]:
        indices = self._order[rows]
        batch = pair_batch([self.samples[int(i)] for i in indices], self.pad_id, self.pack_len)
        batch["pair_index"] = torch.as_tensor(indices, dtype=torch.long)
        return batch
