"""A rendered row as token ids and labels: one tokenizer call over the whole text, masked by offsets.

Why one call: tokenizers do not tokenize a text the way they tokenize its pieces. A LLaMA
SentencePiece tokenizer puts a word marker `▁` in front of every call (`'\\n','The'` inside a text,
`'▁The'` alone), a byte-level BPE merges a space into the next word; so encoding a prompt and a
response apart trains tokens the tokenizer never produces for the real text. Here the training ids
are exactly `tokenizer(text)`: the bos the tokenizer's own call adds, and nothing where it adds
none (`templates.bos_ids`: SmolLM2 and other ChatML models add none; Llama-2/3 do), then, for
templates that do not end turns themselves, eos last, and a token is a target when its characters overlap a target span of the
`Rendered` row (`templates.py`). A token that straddles the prompt/response boundary is a target:
the model has to produce it.

Special tokens: text written by the data never becomes a control id. The Alpaca and text templates
write no special tokens, so their whole text is encoded with the tokenizer's special-token matching
off (`split_special_tokens`: a literal `<s>` or `<|eot_id|>` in a row is ordinary characters). A
chat template writes special tokens as text; when no message contains special-token text (nearly
always), the rendered text is encoded as is. When one does, the message contents are located in the
rendering (`templates.content_spans`) and only the template's own special tokens stay control ids;
a conversation whose rendering cannot be lined up with its messages is rejected as malformed.

`prompt_len` is the number of ids (an added bos included) before the first token of the last target: a
generation eval feeds exactly `input_ids[:prompt_len]`, the prefix the model was trained on.

A text far longer than `max_seq_len` is encoded only as far as matters (see `_encode_text`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distft.data.samples import IGNORE_INDEX
from distft.data.templates import (
    RejectedConversation,
    Rendered,
    bos_ids,
    content_spans,
    special_pattern,
    special_strings,
)

MARGIN_TOKENS = 64  # where a prefix may tokenize differently from the whole text: beyond what is kept


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: Optional[int]  # ids before the last target (the eval prompt); None: no prompt to generate from
    capped: bool  # the text was far longer than max_seq_len and encoded only in part


def encode_row(rendered: Rendered, tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> Encoded:
    """tokenizer(text) with the bos it adds (`bos_ids`), + eos when the template does not end the turn itself; labels
    aligned to the ids: targets where the tokens overlap a target span (everything with
    `train_on_prompt`), -100 elsewhere and always on the first id. Untruncated, except that a
    capped text stops at max_seq_len + 1 ids."""
    bos = bos_ids(tokenizer)
    ids, offsets, capped = _tokenize(rendered, tokenizer, max_seq_len - len(bos))
    labels = [IGNORE_INDEX] * len(bos) + _labels(ids, offsets, rendered.targets, train_on_prompt)
    ids = bos + ids
    prompt_len = None
    if rendered.reference is not None and rendered.targets:
        first = _first_overlap(offsets, rendered.targets[-1][0])
        prompt_len = None if first is None else len(bos) + first
    if capped:
        ids, labels = ids[: max_seq_len + 1], labels[: max_seq_len + 1]
        if prompt_len is not None and prompt_len >= len(ids):
            prompt_len = None
    elif rendered.add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if labels:
        labels[0] = IGNORE_INDEX  # never a target: packed, it would be predicted from the previous sample
    return Encoded(ids, labels, prompt_len, capped)


def _end(a: int, b: int) -> int:
    return max(b, a + 1)  # a token with an empty span (a prepended "▁") counts as the character at a


def _labels(ids: list[int], offsets: list, targets: list, train_on_prompt: bool) -> list[int]:
    if train_on_prompt:
        return list(ids)
    labels, j = [], 0
    for token, (a, b) in zip(ids, offsets):
        while j < len(targets) and targets[j][1] <= a:
            j += 1
        inside = j < len(targets) and a < targets[j][1] and _end(a, b) > targets[j][0]
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def _first_overlap(offsets: list, start: int) -> Optional[int]:
    return next((i for i, (a, b) in enumerate(offsets) if _end(a, b) > start), None)


def _call(tokenizer, text: str, split_special: bool) -> tuple[list[int], list]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=split_special)
    return encoded["input_ids"], encoded["offset_mapping"]


def _tokenize(rendered: Rendered, tokenizer, budget: int) -> tuple[list[int], list, bool]:
    if rendered.literal:
        return _encode_text(tokenizer, rendered.text, budget, split_special=True)
    pattern = special_pattern(tokenizer)
    if pattern is None or not any(pattern.search(m["content"]) for m in rendered.messages or ()):
        return _encode_text(tokenizer, rendered.text, budget, split_special=False)
    return _encode_keeping_data_text(rendered, tokenizer)


def _encode_text(tokenizer, text: str, budget: int, split_special: bool) -> tuple[list[int], list, bool]:
    """(ids, offsets, False) of the whole text; or, for a text with far more than `budget`
    tokens, its first budget + 1 and True: a 100 MB row would take minutes to encode, only to be
    dropped or cut. A prefix of 8 characters per token is encoded, grown 4x until it holds
    MARGIN_TOKENS more than the budget or is the whole text, so a text that fits is always
    encoded whole."""
    size = (max(budget, 0) + MARGIN_TOKENS) * 8
    while size < len(text):
        ids, offsets = _call(tokenizer, text[:size], split_special)
        if len(ids) > budget + MARGIN_TOKENS:
            keep = max(budget, 0) + 1
            return ids[:keep], offsets[:keep], True
        size *= 4
    ids, offsets = _call(tokenizer, text, split_special)
    return ids, offsets, False


def _encode_keeping_data_text(rendered: Rendered, tokenizer) -> tuple[list[int], list, bool]:
    """The rendered conversation with only the template's special tokens as control ids: the text
    between them is encoded with special-token matching off, as the tokenizer splits at them."""
    spans = content_spans(rendered, tokenizer)
    if spans is None:
        pattern = special_pattern(tokenizer)
        found = sorted({hit.group() for m in rendered.messages or () for hit in pattern.finditer(m["content"])})
        raise RejectedConversation(
            f"a message holds the special-token text {', '.join(found)}, and the chat template's output cannot be "
            "lined up with the messages to keep that text as text; remove it from the data")
    text = rendered.text
    ids, offsets = _call(tokenizer, text, split_special=False)
    special_ids = set(tokenizer.convert_tokens_to_ids(list(special_strings(tokenizer))))
    cuts = [(token, a, b) for token, (a, b) in zip(ids, offsets)
            if token in special_ids and not any(s <= a and b <= e for s, e in spans)]
    out_ids: list[int] = []
    out_offsets: list = []
    pos = 0
    for token, a, b in cuts + [(None, len(text), len(text))]:
        if a > pos:
            chunk_ids, chunk_offsets = _call(tokenizer, text[pos:a], split_special=True)
            out_ids += chunk_ids
            out_offsets += [(s + pos, e + pos) for s, e in chunk_offsets]
        if token is not None:
            out_ids.append(token)
            out_offsets.append((a, b))
        pos = max(pos, b)
    return out_ids, out_offsets, False


# ------------------------------------------------------------------------------ many rows at once


def encode_rows(rendered: list[Rendered], tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> list:
    """`encode_row(r, ...)` of every row as (ids int32, targets uint8, prompt_len) (targets: label
    is the token; prompt_len: Encoded.prompt_len), in one tokenizer call per kind of row, labels
    computed with numpy over the whole batch: the same ids, labels and prompt_len, without ~40 µs
    of Python per row and ~0.5 µs per token. Rows
    that need more than one call (a text far over max_seq_len, a message holding special-token
    text) go through encode_row itself. An exception encode_row raises for a row is returned in
    its place."""
    import numpy as np

    bos = bos_ids(tokenizer)
    budget = max_seq_len - len(bos)
    pattern = special_pattern(tokenizer)
    out: list = [None] * len(rendered)
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, r in enumerate(rendered):
        whole = len(r.text) <= (max(budget, 0) + MARGIN_TOKENS) * 8  # _encode_text encodes it in one call
        if whole and r.literal:
            groups[True].append(i)
        elif whole and (pattern is None or not any(pattern.search(m["content"]) for m in r.messages or ())):
            groups[False].append(i)
        else:
            try:
                encoded = encode_row(r, tokenizer, max_seq_len, train_on_prompt)
                out[i] = (np.asarray(encoded.input_ids, dtype=np.int32),
                          (np.asarray(encoded.labels) != IGNORE_INDEX).astype(np.uint8), encoded.prompt_len)
            except Exception as err:  # noqa: BLE001 - handed back: the caller words it for its row
                out[i] = err
    eos = tokenizer.eos_token_id
    for split_special, members in groups.items():
        if not members:
            continue
        texts = [rendered[i].text for i in members]
        encodings = _batch_call(tokenizer, texts, split_special)
        counts = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter((t for e in encodings for t in e.ids), dtype=np.int32, count=int(counts.sum()))
        group = [rendered[i] for i in members]
        starts = np.zeros(len(members) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        a, b, bases = _token_spans(encodings, counts, texts)
        inside = np.ones(len(ids), dtype=bool) if train_on_prompt else _inside_targets(a, b, bases, group)
        prompt_lens = _prompt_lens(a, b, bases, starts, group, len(bos))
        for k, i in enumerate(members):
            row_ids = ids[starts[k] : starts[k + 1]]
            row_targets = inside[starts[k] : starts[k + 1]]
            add_eos = rendered[i].add_eos and eos is not None
            piece_ids = np.empty(len(bos) + len(row_ids) + add_eos, dtype=np.int32)
            piece_targets = np.zeros(len(piece_ids), dtype=np.uint8)
            piece_ids[: len(bos)] = bos
            piece_ids[len(bos) : len(bos) + len(row_ids)] = row_ids
            piece_targets[len(bos) : len(bos) + len(row_ids)] = row_targets
            if add_eos:
                piece_ids[-1], piece_targets[-1] = eos, 1
            if len(piece_targets):
                piece_targets[0] = 0  # never a target: packed, it would be predicted from the previous sample
            out[i] = (piece_ids, piece_targets, prompt_lens[k])
    return out


def _batch_call(tokenizer, texts: list[str], split_special: bool) -> list:
    """The tokenizer's Rust encodings of `texts`: what `tokenizer(text, add_special_tokens=False,
    split_special_tokens=split_special)` computes per text (transformers sets the same switch on
    the same backend), in one call."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:  # transformers clears them per call too
        backend.no_truncation()
        backend.no_padding()
    before = backend.encode_special_tokens
    backend.encode_special_tokens = split_special
    try:
        return backend.encode_batch(texts, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = before


def _token_spans(encodings: list, counts, texts: list[str]):
    """(start, end) character offsets of every token of the batch, the rows laid end to end in one
    coordinate space, and each row's base in it."""
    import numpy as np

    bases = np.zeros(len(texts), dtype=np.int64)
    np.cumsum([len(t) + 2 for t in texts[:-1]], out=bases[1:])  # a gap, so no token meets the next row's span
    total = int(counts.sum())
    flat = np.fromiter((x for e in encodings for pair in e.offsets for x in pair), dtype=np.int64, count=2 * total)
    return flat[0::2] + np.repeat(bases, counts), flat[1::2] + np.repeat(bases, counts), bases


def _inside_targets(a, b, bases, rendered: list[Rendered]):
    """For every token of the batch (`_token_spans`): whether its characters overlap a target span
    of its row (`_labels`' rule)."""
    import numpy as np

    spans = [(s + base, e + base) for r, base in zip(rendered, bases.tolist()) for s, e in r.targets]
    if not spans:
        return np.zeros(len(a), dtype=bool)
    span_starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
    span_ends = np.fromiter((e for _, e in spans), dtype=np.int64, count=len(spans))
    j = np.searchsorted(span_ends, a, side="right")  # the first span that ends after the token starts
    found = j < len(spans)
    j = np.minimum(j, len(spans) - 1)
    return found & (np.maximum(b, a + 1) > span_starts[j])


def _prompt_lens(a, b, bases, starts, rendered: list[Rendered], bos: int) -> list:
    """Per row of the batch, encode_row's prompt_len: bos + the index of the first token that
    reaches the last target (`_first_overlap`), or None (no reference, or no such token)."""
    import numpy as np

    rows = np.repeat(np.arange(len(rendered)), np.diff(starts))
    last = np.array([r.targets[-1][0] if r.reference is not None and r.targets else -1 for r in rendered],
                    dtype=np.int64)
    reaches = (last[rows] >= 0) & (np.maximum(b, a + 1) > last[rows] + bases[rows])
    hits = np.flatnonzero(reaches)
    first = np.searchsorted(hits, starts[:-1])  # each row's first reaching token, if it is in the row
    out: list = []
    for k in range(len(rendered)):
        at = first[k]
        out.append(int(hits[at] - starts[k]) + bos if at < len(hits) and hits[at] < starts[k + 1] else None)
    return out
