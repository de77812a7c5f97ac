"""What preparing a run's data produced: the samples, the eval rows, and the report of every row.

Shared by `distft/data/pipeline.py`, which builds it, and `distft/data/cache.py`, which stores and reads it
(so neither imports the other's module for its types).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from distft.config import DataConfig
from distft.data.batching import mix_counts, pack_index
from distft.data.samples import TokenSamples


@dataclass
class DataReport:
    """What happened to the rows. loaded = malformed + empty + duplicate + overlong + kept, and
    kept = eval + (train rows before augmentation). Counts cover the eval file too when there is one.
    train counts rows after augmentation; *_sequences are packed rows (packing) or samples."""

    loaded: int = 0
    malformed: int = 0
    empty: int = 0
    duplicate: int = 0
    overlong: int = 0
    identical: int = 0  # preference pairs whose two answers are the same (objective=dpo)
    pairs: bool = False  # objective=dpo: the counts are preference pairs (a row is a pair; train/eval: pairs)
    truncated: int = 0  # kept, cut to max_seq_len (drop_overlong=false)
    kept: int = 0
    train: int = 0
    eval: int = 0
    augmented: int = 0  # training rows changed or added by augmentation
    augment_dropped: int = 0  # training rows an augmentation function removed, or made empty/over-long
    train_sequences: int = 0
    eval_sequences: int = 0
    train_tokens: int = 0
    train_target_tokens: int = 0
    packing_fill: Optional[float] = None  # share of non-pad tokens in the packed training rows
    # data.sources: [{"name", "weight", "samples"}] (training samples kept per source); [] for one source
    sources: list = field(default_factory=list)
    # The first dropped row of each kind ("malformed", ...): "row 3 (line 4) of FILE: why".
    first_dropped: dict = field(default_factory=dict)
    # From the token lengths of the rows that reached the length check (kept and over-long): the
    # data.max_seq_len that keeps 90% of them, and all of them (`lengths_that_keep`); 0 when
    # not known (a row too long to be measured whole; a report of an older data cache).
    max_seq_len_p90: int = 0
    max_seq_len_all: int = 0
    # The formats the training rows were rendered in, per source: [{"source", "format", "rows"}],
    # format "chat" (the chat template: messages/ShareGPT rows, or data.template=chat), an
    # instruction template (alpaca, alpaca_short, plain) or "text". What chat, compare and export
    # prompt the model in (templates.prompt_format), whatever data.template says.
    formats: list = field(default_factory=list)
    # The tokenizer ships a chat template (its own, not data.chat_template's) and no training row
    # was rendered in it: instruction rows in the Alpaca format for a model tuned on its chat format.
    chat_template_unused: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    def notes(self, cfg: DataConfig) -> list[tuple[str, str]]:
        """(level, message) lines that say why rows were dropped: the first row of each kind of
        drop, then a warning naming the likely fix when more than DROP_WARNING of the rows went."""
        row, samples = ("pair", "pairs") if self.pairs else ("row", "samples")
        lines = [("info", f"data: first {rule} {row} dropped: {where}") for rule, where in self.first_dropped.items()]
        if self.sources:
            counts = mix_counts([s["samples"] for s in self.sources], [s["weight"] for s in self.sources])
            total = sum(counts)
            lines.append(("info", "data: mix per epoch: " + "; ".join(
                f"{s['name']} {n} of {total} {samples} ({n / total:.0%}, weight {s['weight']:g}; "
                f"{n / s['samples']:.2f}x its {s['samples']} {samples})" for s, n in zip(self.sources, counts))))
        if self.chat_template_unused:
            used = sorted({f["format"] for f in self.formats if f["format"] != "text"})
            lines.append(("info", f"data: the tokenizer has a chat template, which these rows do not use (rendered as "
                                  f"{', '.join(used) or 'text'}); data.template=chat renders instruction rows through it, "
                                  "as an instruction-tuned model was trained to be prompted"))
        rules = ("malformed", "empty", "duplicate", "overlong", *(("identical",) if self.pairs else ()))
        dropped = {rule: getattr(self, rule) for rule in rules}
        total = sum(dropped.values())
        if self.loaded and total > DROP_WARNING * self.loaded:
            worst = max(dropped, key=dropped.get)
            lines.append(("warning", f"data: {total} of {self.loaded} {row}s ({total / self.loaded:.0%}) were dropped, "
                                     f"most as {worst} ({dropped[worst]}); {_likely_fix(worst, cfg, self)}"))
        return lines

    def summary(self) -> str:
        dropped = self.malformed + self.empty + self.duplicate + self.overlong + self.identical
        if self.pairs:
            return (f"data: loaded {self.loaded} preference rows, dropped {dropped} (malformed {self.malformed}, "
                    f"empty {self.empty}, identical {self.identical}, duplicate {self.duplicate}, overlong "
                    f"{self.overlong}), kept {self.kept}; train {self.train} pairs, eval {self.eval}; "
                    f"{self.train_tokens} train tokens ({self.train_target_tokens} answer tokens)")
        identical = f", identical {self.identical}" if self.identical else ""
        return (
            f"data: loaded {self.loaded} rows, dropped {dropped} (malformed {self.malformed}, empty {self.empty}, "
            f"duplicate {self.duplicate}, overlong {self.overlong}{identical}), truncated {self.truncated}, "
            f"kept {self.kept}; "
            f"train {self.train} rows ({self.augmented} augmented, {self.augment_dropped} dropped by augmentation), "
            f"eval {self.eval}; {self.train_sequences} train / {self.eval_sequences} eval sequences, "
            f"{self.train_tokens} train tokens ({self.train_target_tokens} targets)"
            + (f", packed {self.packing_fill:.1%} non-pad" if self.packing_fill is not None else "")
        )


DROP_WARNING = 0.10  # share of dropped rows above which the data report warns


def lengths_that_keep(lengths: Sequence[int], share: float = 0.9) -> tuple[int, int]:
    """(the data.max_seq_len that keeps `share` of the rows, the one that keeps all of them), from
    the rows' token lengths: a row of n tokens fits when data.max_seq_len >= n, packed or not.
    A length of -1 is a row too long to be measured whole (data._measured_length): longer than
    every measured one; 0 where the answer is such a row."""
    if not lengths:
        return 0, 0
    ordered = sorted(lengths, key=lambda n: math.inf if n < 0 else n)

    def known(n: int) -> int:
        return max(0, int(n))

    return known(ordered[max(0, math.ceil(share * len(ordered)) - 1)]), known(ordered[-1])


def _likely_fix(rule: str, cfg: DataConfig, report: Optional[DataReport] = None) -> str:
    if rule == "malformed":
        return (f"check data.format={cfg.format} and the field names (data.instruction_field={cfg.instruction_field}, "
                f"output_field={cfg.output_field}, messages_field={cfg.messages_field}, text_field={cfg.text_field}); "
                "for conversations the chat template rejects, data.chat_template (e.g. headers)")
    if rule == "overlong":
        return f"{_longer_rows_fix(cfg.max_seq_len, report)}, or data.drop_overlong=false to cut such rows instead"
    if rule == "empty":
        return f"check that data.output_field={cfg.output_field} (or the messages' content) names the filled column"
    if rule == "identical":
        return ("a pair whose chosen and rejected answers are the same text prefers nothing: fix the rejected answers "
                "at the source (a wrong, worse or off-style answer to the same prompt)")
    return "the data repeats rows (same prompt and response after collapsing whitespace): deduplicate it at the source"


def _longer_rows_fix(max_seq_len: int, report: Optional[DataReport]) -> str:
    """What data.max_seq_len keeps the rows, from the report's lengths where it knows them."""
    p90, every = (report.max_seq_len_p90, report.max_seq_len_all) if report is not None else (0, 0)
    keeps = []
    if p90 > max_seq_len:
        keeps.append(f"data.max_seq_len={p90} keeps 90% of the rows")
    if every > max_seq_len:
        keeps.append(f"data.max_seq_len={every} keeps all of them")
    elif p90:  # lengths known, the longest not: a row encoded only in part
        keeps.append("some rows are too long to be measured whole")
    return f"raise data.max_seq_len (now {max_seq_len})" + (f": {'; '.join(keeps)}" if keeps else "")


@dataclass
class PreparedData:
    train: TokenSamples  # samples[i] == {"input_ids": [...], "labels": [...]} (distft/data/samples.py)
    eval: TokenSamples
    eval_rows: list[dict]  # {"prompt": str without bos, "prompt_ids", "reference": str without eos, "task"?: str}
    report: DataReport
    stop_ids: list[int] = field(default_factory=list)  # ids that end an answer (templates.stop_token_ids)
    train_sources: Optional[np.ndarray] = None  # data.sources: each training sample's source index
    packed_as: Optional[list] = None  # [data.packing, data.pack_strategy] the report's sequence counts are for
    # objective=dpo (distft/data/preference.py build_pairs): `train`/`eval` hold the pairs' chosen
    # answers, these their rejected ones, pair by pair.
    train_rejected: Optional[TokenSamples] = None
    eval_rejected: Optional[TokenSamples] = None




def count_sequences(report: DataReport, cfg: DataConfig, train: TokenSamples, eval: TokenSamples) -> None:
    """The report's sequence counts and packing fill: packed rows (from the lengths alone) or samples.
    (Best-fit packing of a million samples takes seconds: the cache keeps the counts it was built with.)"""
    if cfg.packing:
        report.train_sequences = len(pack_index(train.lengths, cfg.max_seq_len, cfg.pack_strategy)[1]) - 1
        report.eval_sequences = len(pack_index(eval.lengths, cfg.max_seq_len, cfg.pack_strategy)[1]) - 1
        report.packing_fill = round(report.train_tokens / max(1, report.train_sequences * cfg.max_seq_len), 4)
    else:
        report.train_sequences, report.eval_sequences, report.packing_fill = len(train), len(eval), None
