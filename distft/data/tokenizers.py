"""Tokenizers of the real LLaMA families, trained in code on the repo's own data, for tests.

The built-in character-level tokenizer (`distft.model.build.build_offline_tokenizer`) hides the bugs that
real tokenizers show: merges across the prompt/response boundary, a `▁` prepended to every encode
call, bytes that fall back to `<0xNN>` tokens, special-token text parsed as control ids, chat
templates that write bos as text. So this module builds, with no download, one tokenizer per family
whose *pipeline* is shaped like the published one (normalizer, pre-tokenizer, model options,
post-processor, decoder, special tokens, chat template); only the vocabulary is small and ours.

- `llama2`: LLaMA / LLaMA-2 SentencePiece BPE, as in meta-llama/Llama-2-7b-hf's tokenizer.json
  (legacy mode): normalizer Prepend("▁") + Replace(" ", "▁") applied to every piece of text between
  added tokens (so *every* encode call, and the text after a literal `<s>`, starts a new word);
  no pre-tokenizer; BPE with byte_fallback (bytes not in the vocab become `<0x0A>`-style tokens, so a
  newline is always `<0x0A>` and the text after it has no `▁`) and fuse_unk; decoder Replace("▁", " ")
  + ByteFallback + Fuse + Strip(one leading space). `<unk>`=0, `<s>`=1, `</s>`=2, `<0x00>`..`<0xFF>`
  = 3..258, then learned pieces; no pad token; `<s>` added in front, `</s>` not (LlamaTokenizerFast's
  add_bos_token=True, add_eos_token=False). Like SentencePiece it trains on single lines (so no
  piece holds a newline), splits on whitespace (no piece holds an inner `▁`), splits digits (numbers
  are single digits, so " 42" is a lone `▁` then `4`, `2`) and caps pieces at 16 characters.
- `llama3`: Llama-3 (Instruct) byte-level BPE, as in meta-llama/Meta-Llama-3-8B-Instruct: the Llama-3
  split regex then ByteLevel (no prefix space), BPE with ignore_merges, 256 byte symbols in the
  vocab (nothing is unknown), special tokens `<|begin_of_text|>`, `<|end_of_text|>`,
  `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>` after the learned ones, bos added by a
  TemplateProcessing post-processor, eos `<|eot_id|>` (the Instruct config), no pad token, and the
  published chat template, which writes `bos_token` as text (so rendering then encoding with special
  tokens gives two bos: that is real, and what `templates._render` guards against).
- `char`: the existing character-level tokenizer, exposed here so tests can loop over all families.

The training corpus is fixed: rows of `distft.data.synthetic` rendered with the Alpaca templates, plus
a paragraph of English prose (punctuation, digits, a few non-ASCII letters). Characters absent from
it (e.g. "€", "✓") are byte-fallback tokens in `llama2`; tests rely on that. Training is
deterministic: the same vocabulary and merges in every process.

`vocab_size` is the tokenizer's total length (`len(tok)`), specials and bytes included; a corpus
that runs out of merges gives fewer. Defaults (1000) train in about 0.1 s each on this repo's
2-core CI machine; at 32000 (LLaMA-2's real size, for benchmarks; the corpus grows with the size)
`llama2` takes about 1.2-2.5 s and `llama3` about 1-1.3 s.
The trained pipeline is cached per process (`functools.cache`), but every `build_tokenizer`
call returns a fresh `PreTrainedTokenizerFast`, so a caller that mutates one (sets a pad token,
changes padding side) cannot leak into the next. `save_tokenizer` writes one with
`save_pretrained`, for `model.tokenizer=<dir>` or a model directory.

`import distft` stays fast: `tokenizers` and `transformers` are imported inside the functions.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

from distft.data import synthetic, templates

FAMILIES = ("llama2", "llama3", "char")
DEFAULT_VOCAB_SIZE = {"llama2": 1000, "llama3": 1000}

LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")
LLAMA2_BYTES = tuple(f"<0x{b:02X}>" for b in range(256))
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# The pre-tokenizer regex of the published Llama-3 tokenizer.json.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The chat template of meta-llama/Meta-Llama-3-8B-Instruct, verbatim.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Prose with what the synthetic rows lack: capitals, punctuation, quotes, digits, newlines, and a
# few non-ASCII letters (é, ï, ü, ß, —, ’), so the vocabularies hold multi-byte characters too.
PROSE = """\
The quick brown fox jumps over the lazy dog. It was 7:45 in the morning, and the café on 3rd Street
had already sold 128 croissants. "The answer," she said, "is not always 42." Nobody laughed.
A naïve résumé lists every job since 1999; a good one lists the 3 or 4 that matter — and why.
Über-efficient teams ship small changes often: 10 a day is normal, 100 a week is common.
Don’t confuse the map with the territory. The map is 1:50,000; the territory is not.
Prices rose by 2.5% in March, fell by 0.75% in April, and by June were back where they started.
Straße, façade, coöperate: words borrowed from other languages keep their marks, mostly.
(Parentheses, [brackets], {braces} and <angle brackets> all appear in code; so do #, $, & and @.)
Question: what is 17 + 25? Answer: 42. Question: what is 9 * 9? Answer: 81.
The end.
"""


def corpus(num_rows: int = 2000) -> list[str]:
    """The training texts: synthetic rows under the Alpaca templates and header variants, then PROSE."""
    texts = []
    for i, row in enumerate(synthetic.generate(num_rows, seed=0)):
        template = templates.HEADER_TEMPLATES[i % len(templates.HEADER_TEMPLATES)]
        variant = i % len(templates.HEADERS)
        texts.append(templates.alpaca_prompt(row, template, variant) + row["output"])
    return texts + [PROSE] * 20  # weight the prose: a few hundred rows' worth of text


def _rows_for(vocab_size: int) -> int:
    # Enough distinct words that the merges do not run out before vocab_size.
    return max(2000, vocab_size // 2)


def _llama2_backend(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    floor = len(LLAMA2_SPECIALS) + len(LLAMA2_BYTES)
    if vocab_size <= floor + 100:
        raise ValueError(f"llama2 vocab_size must be above {floor + 100} (3 specials + 256 bytes + pieces), got {vocab_size}")
    # Training: SentencePiece trains on lines, splits at whitespace and between digits.
    training = Tokenizer(models.BPE(unk_token="<unk>"))
    training.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    training.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("▁[^▁]*|[^▁]+"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(LLAMA2_BYTES),
        special_tokens=list(LLAMA2_SPECIALS),
        max_token_length=16,
        show_progress=False,
    )
    lines = [line for text in corpus(_rows_for(vocab_size)) for line in text.split("\n") if line.strip()]
    training.train_from_iterator(lines, trainer=trainer)
    model = json.loads(training.to_str())["model"]
    learned = sorted((i, t) for t, i in model["vocab"].items() if t not in LLAMA2_SPECIALS)
    vocab = {t: i for i, t in enumerate(LLAMA2_SPECIALS + LLAMA2_BYTES + tuple(t for _, t in learned))}
    merges = [tuple(m) for m in model["merges"]]

    # Inference: the published legacy pipeline.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(list(LLAMA2_SPECIALS))
    return tokenizer.to_str()


def _llama3_backend(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    floor = 256 + len(LLAMA3_SPECIALS)
    if vocab_size <= floor + 100:
        raise ValueError(f"llama3 vocab_size must be above {floor + 100} (256 bytes + 5 specials + merges), got {vocab_size}")
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    training = Tokenizer(models.BPE())
    training.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(LLAMA3_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    training.train_from_iterator(corpus(_rows_for(vocab_size)), trainer=trainer)
    model = json.loads(training.to_str())["model"]
    merges = [tuple(m) for m in model["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=model["vocab"], merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(LLAMA3_SPECIALS))  # ids after the learned vocabulary, as in Llama-3
    bos = LLAMA3_SPECIALS[0]
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tokenizer.token_to_id(bos))],
            ),
        ]
    )
    return tokenizer.to_str()


@functools.cache
def trained_backend(family: str, vocab_size: int) -> str:
    """The trained `tokenizers` pipeline of a family as tokenizer.json text (cached per process).

    Needs only `tokenizers`, not transformers: cheap to compare across processes for determinism.
    """
    if family == "llama2":
        return _llama2_backend(vocab_size)
    if family == "llama3":
        return _llama3_backend(vocab_size)
    raise ValueError(f"no trained backend for tokenizer family {family!r}; trained families: llama2, llama3")


def clear_cache() -> None:
    """Forget the trained pipelines, so the next build trains again (for determinism checks)."""
    trained_backend.cache_clear()


def build_tokenizer(family: str, vocab_size: Optional[int] = None):
    """A fresh `transformers.PreTrainedTokenizerFast` of `family` (see the module docstring).

    `vocab_size` defaults to DEFAULT_VOCAB_SIZE[family]; the `char` family has a fixed vocabulary
    and rejects one.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; allowed: {', '.join(FAMILIES)}")
    if family == "char":
        if vocab_size is not None:
            raise ValueError("the char tokenizer family has a fixed vocabulary; pass no vocab_size")
        from distft.model.build import build_offline_tokenizer  # lazy: torch, as transformers (docstring)

        return build_offline_tokenizer()
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(trained_backend(family, vocab_size or DEFAULT_VOCAB_SIZE[family]))
    if family == "llama2":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            add_bos_token=True,  # transformers writes the "<s> $A" / "<s> $A <s> $B" template, as Llama's
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            padding_side="left",
        )
    else:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            # The published config says True; transformers 5 ignores that for BPE (with a warning), so
            # False is the behaviour a real Llama-3 tokenizer has here, without the warning.
            clean_up_tokenization_spaces=False,
        )
        tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    tokenizer.model_max_length = 1_000_000
    return tokenizer


def save_tokenizer(family: str, directory, vocab_size: Optional[int] = None) -> Path:
    """Write a family's tokenizer with `save_pretrained` into `directory` (for model.tokenizer=<dir>)."""
    directory = Path(directory)
    build_tokenizer(family, vocab_size).save_pretrained(str(directory))
    return directory
