"""Preference pairs (issue 40's data side): a prompt, the answer preferred and the one rejected.

Row formats (TRL's, so preference sets from the Hub read as they are):
- text: `{"prompt": str, "chosen": str, "rejected": str}`; rendered like an Alpaca row whose
  instruction is the prompt and whose output is the answer (`data.template`: alpaca, chat, ...);
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
from distft.data.encoding import Encoded
from distft.data.samples import IGNORE_INDEX


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
    extras = {k: v for k, v in value.items() if k not in ("prompt", "chosen", "rejected")}
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        kind, row = "alpaca", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
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
        return {"instruction": row["prompt"], "input": "", "output": row[side]}
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


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """n pairs as one micro-batch of 2n right-padded rows: the chosen, then the rejected."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
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
