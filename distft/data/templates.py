"""Prompt templates: how a cleaned row becomes one text, and which characters of it are trained on.

A row renders to a `Rendered`: the whole text of the sample (without the bos the tokenizer adds
itself: `bos_ids`, which encoding.py puts in front)
and the character spans that are targets. `distft/data/encoding.py` tokenizes that text in one call, as
the tokenizer itself would, and masks by character offsets, so the training ids are exactly the
tokenization of the full text, whatever the tokenizer merges across the prompt/response boundary.

- `alpaca`: the Stanford Alpaca prompt (preamble, with/without-input variants).
- `alpaca_short`: the same headers without the preamble (short sequences for char-level models).
- `plain`: instruction and input on their own lines, nothing else.
- `chat`: a chat template (the tokenizer's own, or `data.chat_template`); only assistant turns are
  targets. They are found by rendering growing prefixes of the conversation, which needs a
  template whose rendering of a conversation starts with its rendering of every shorter prefix
  ("prefix-stable"). An assistant turn's target is its content and the template's end-of-turn
  token (e.g. `<|eot_id|>`, `</s>`); what a template writes after that token (a newline before the
  next turn) belongs to the next turn's prompt.

The Alpaca templates write no special tokens; bos and eos are ids, never text. Chat templates do
write special tokens as text (`<|start_header_id|>`, `</s>`): those, and only those, become control
ids; the same text written by the data stays text (`encoding.py`).

`data.chat_template` picks the chat template: null, the tokenizer's own; `headers`, distft's own
(`### user:` / `### assistant:` headers, each assistant turn ended by the tokenizer's eos, so it
works with any tokenizer, base models included); or a Jinja template string.

Header variants are the `data.augment.template_variation` augmentation: the same row under other
header wordings, so a model does not latch onto one exact string.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from distft.errors import TemplateError  # noqa: F401  (re-exported: callers catch distft.data.templates.TemplateError)
from distft.files import open_regular

ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)

# (instruction header, input header, response header); index 0 is the canonical wording.
HEADERS = (
    ("### Instruction:", "### Input:", "### Response:"),
    ("### Task:", "### Input:", "### Answer:"),
    ("### Question:", "### Context:", "### Answer:"),
    ("### Request:", "### Given:", "### Reply:"),
    ("### Command:", "### Data:", "### Output:"),
)
HEADER_TEMPLATES = ("alpaca", "alpaca_short")  # the templates header variants apply to

# data.chat_template=headers: works with any tokenizer that has an eos token (base models too).
HEADERS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)
NAMED_CHAT_TEMPLATES = {"headers": HEADERS_CHAT_TEMPLATE}

Span = tuple[int, int]


class RejectedConversation(Exception):
    """The chat template refused one conversation (e.g. roles not alternating): a malformed row."""


@dataclass
class Rendered:
    """A row as one text. `targets`: character spans trained on, in order (the last one is what a
    generation eval asks for). `literal`: the template wrote no special tokens, so no text in it
    may become a control id. `messages`: a conversation's turns (to locate the data in `text`)."""

    text: str
    targets: list[Span]
    literal: bool
    add_eos: bool
    reference: Optional[str] = None  # the answer of the last target (None for text rows)
    messages: Optional[list[dict]] = None

    @property
    def prompt(self) -> Optional[str]:
        """The text before the last target: what a generation eval feeds the model (no added bos)."""
        return self.text[: self.targets[-1][0]] if self.reference is not None and self.targets else None


def alpaca_prompt(row: dict, template: str, variant: int = 0) -> str:
    """The prompt text of an Alpaca row (everything before the response), without the added bos."""
    instruction, context = row["instruction"], row.get("input") or ""
    if template == "plain":
        return f"{instruction}\n{context}\n" if context else f"{instruction}\n"
    if template not in HEADER_TEMPLATES:
        raise ValueError(f"alpaca_prompt does not render template {template!r}")
    ins, inp, resp = HEADERS[variant]
    body = f"{ins}\n{instruction}\n\n" + (f"{inp}\n{context}\n\n" if context else "") + f"{resp}\n"
    if template == "alpaca":
        return (ALPACA_PREAMBLE_INPUT if context else ALPACA_PREAMBLE) + body
    return body


def alpaca_messages(row: dict) -> list[dict]:
    """An Alpaca row as a two-turn conversation (for template=chat)."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def use_chat_template(tokenizer, choice: Optional[str]) -> None:
    """Install `data.chat_template` on the tokenizer (it is saved with every checkpoint and export,
    so the exported model formats conversations as it was trained). null keeps the tokenizer's."""
    if choice:
        tokenizer.chat_template = NAMED_CHAT_TEMPLATES.get(choice, choice)


def missing_chat_template(source: str) -> str:
    """The message for chat rows with a tokenizer that has no chat template: advice that works."""
    return (
        f"chat rows (messages, or data.template=chat) need a chat template, and the tokenizer of {source} has none; "
        "set data.chat_template=headers (distft's '### user:' / '### assistant:' template, each answer ended by "
        "the tokenizer's eos; works with any tokenizer), or data.chat_template='<a Jinja template>', or "
        "model.tokenizer=<a chat model's tokenizer>"
    )


def _specials(tokenizer) -> tuple[tuple[str, ...], Optional[re.Pattern]]:
    """(special-token texts longest first, a regex matching any of them), cached on the tokenizer
    until its length changes (tokens added)."""
    cached = getattr(tokenizer, "_distft_specials", None)
    if cached is None or cached[0] != len(tokenizer):
        found = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}
        ordered = tuple(sorted(found, key=lambda s: (-len(s), s)))
        cached = (len(tokenizer), ordered, re.compile("|".join(map(re.escape, ordered))) if ordered else None)
        tokenizer._distft_specials = cached
    return cached[1], cached[2]


def special_strings(tokenizer) -> tuple[str, ...]:
    """The text of the tokenizer's special tokens (bos, eos, `<|eot_id|>`, ...), longest first."""
    return _specials(tokenizer)[0]


def special_pattern(tokenizer) -> Optional[re.Pattern]:
    """A regex matching any of the tokenizer's special-token texts (None: it has none)."""
    return _specials(tokenizer)[1]


def bos_ids(tokenizer) -> list[int]:
    """The ids the tokenizer's own `__call__` puts before a text: [bos] for Llama-2 ([1]) and
    Llama-3 ([128000]), [] for tokenizers that add none (SmolLM2, Qwen and most ChatML models, whose
    bos_token_id exists but is never added). Every sample, evaluation prompt, chat turn and general
    text gets exactly this in front, so a model trained here sees what `tokenizer(prompt)` +
    `generate` gives it later. Found by encoding a probe with and without special tokens; cached
    on the tokenizer until its vocabulary or post-processor changes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = (len(tokenizer), str(getattr(backend, "post_processor", None)), getattr(tokenizer, "add_bos_token", None))
    cached = getattr(tokenizer, "_distft_bos", None)
    if cached is None or cached[0] != key:
        probe = "a b"
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(probe)["input_ids"])
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        cached = (key, tuple(int(t) for t in full[:at]))
        tokenizer._distft_bos = cached
    return list(cached[1])


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises for conversations a template rejects (e.g. roles not alternating)
        raise RejectedConversation(f"the tokenizer's chat template rejected the conversation: {err}") from err
    # Templates that write bos as text (Llama-3's) would get a second bos where the tokenizer adds
    # one itself (encoding.py puts `bos_ids` in front). Where it adds none (ChatML's bos is
    # `<|im_start|>`, which every turn starts with), the text stays as the template wrote it.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and bos_ids(tokenizer):
        return text[len(bos) :]
    return text


def _turn_end(tokenizer, text: str, start: int, end: int, content: str) -> int:
    """Where an assistant turn's target ends: just after the first special token the template
    writes after the content (its end-of-turn token), or at the end of the turn without one."""
    pattern = special_pattern(tokenizer)
    stripped = content.strip()
    found = text.find(stripped, start, end) if stripped else -1
    after = found + len(stripped) if found >= 0 else start
    match = pattern.search(text, after, end) if pattern is not None else None
    return match.end() if match else end


NOT_PREFIX_STABLE = (
    "the tokenizer's chat template is not prefix-stable (rendering a conversation does not start with the "
    "rendering of its earlier turns), so assistant turns cannot be located for masking; use a template without "
    "history rewriting (data.chat_template=headers, or your own), or data.template=alpaca_short with alpaca rows"
)


def render_chat(messages: list[dict], tokenizer) -> Rendered:
    """A conversation as one text; every assistant turn (content + end-of-turn token) is a target.

    For assistant turn i, the rendering of messages[:i] with a generation prompt is everything
    before it; the rendering of messages[:i+1] ends with it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(missing_chat_template("this model"))
    targets: list[Span] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateError(NOT_PREFIX_STABLE)
        targets.append((len(prompt), _turn_end(tokenizer, full, len(prompt), len(full), message["content"])))
        done = full
    text = _render(tokenizer, messages, generation_prompt=False)
    if not text.startswith(done):
        raise TemplateError(NOT_PREFIX_STABLE)
    last = [m["content"] for m in messages if m["role"] == "assistant"]
    return Rendered(text, [t for t in targets if t[1] > t[0]], literal=False, add_eos=False,
                    reference=last[-1] if last else None, messages=messages)


def content_spans(rendered: Rendered, tokenizer) -> Optional[list[Span]]:
    """Where each message's content sits in a rendered conversation, or None when the template's
    output cannot be lined up with the messages. Found by rendering the conversation with each
    content replaced by a marker (the template's own text, specials included, stays as it is),
    then matching the real text against it; a template may trim the content (Llama-3 does)."""
    messages = rendered.messages or []
    probe = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    try:
        shape = _render(tokenizer, probe, generation_prompt=False)
    except RejectedConversation:
        return None
    parts = re.split("\ue000(\\d+)\ue001", shape)
    text, pos, spans = rendered.text, 0, []
    for j in range(0, len(parts), 2):
        if not text.startswith(parts[j], pos):
            return None
        pos += len(parts[j])
        if j + 1 == len(parts):
            break
        content, following = messages[int(parts[j + 1])]["content"], parts[j + 2]
        for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
            if text.startswith(candidate + following, pos):
                spans.append((pos, pos + len(candidate)))
                pos += len(candidate)
                break
        else:
            return None
    return spans if pos == len(text) else None


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The special tokens a chat template writes right after an assistant's content (e.g.
    `<|eot_id|>`, `<|im_end|>`, `</s>`): a generation must stop there. [] without a chat template,
    or when the template rejects a plain user/assistant exchange."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    answer = "distft end-of-turn probe"
    try:
        text = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}], False)
    except RejectedConversation:
        return []
    pattern = special_pattern(tokenizer)
    at = text.rfind(answer)
    if at < 0 or pattern is None:
        return []
    tail = text[at + len(answer) :]
    first = pattern.search(tail)
    return [first.group()] if first and not tail[: first.start()].strip() else []


def render_row(row: dict, kind: str, template: str, tokenizer, variant: int = 0) -> Rendered:
    """A cleaned row as one text with its target spans. Chat templates write their own end-of-turn
    tokens; the other templates get the eos id appended (`add_eos`)."""
    if kind == "text":
        return Rendered(row["text"], [(0, len(row["text"]))], literal=True, add_eos=True)
    if kind == "chat":
        return render_chat(row["messages"], tokenizer)
    if template == "chat":
        return render_chat(alpaca_messages(row), tokenizer)
    prompt = alpaca_prompt(row, template, variant)
    text = prompt + row["output"]
    return Rendered(text, [(len(prompt), len(text))], literal=True, add_eos=True, reference=row["output"])


def prompt_format(formats: list[dict], fallback: str) -> str:
    """The format to prompt a trained model in (chat, alpaca, alpaca_short, plain): the one most of
    its training rows were rendered in (`DataReport.formats`; text rows have no prompt), chat on a
    tie; `fallback` (the run's data.template) when nothing is recorded. Rows with `messages`
    train in the chat template whatever data.template says: this, not data.template, is what they
    taught the model."""
    totals: dict[str, int] = {}
    for entry in formats or ():
        if entry.get("format") not in (None, "text"):
            totals[entry["format"]] = totals.get(entry["format"], 0) + int(entry.get("rows", 0))
    return max(totals, key=lambda name: (totals[name], name == "chat")) if totals else fallback


def trained_format(checkpoint: str, cfg) -> str:
    """`prompt_format` of a checkpoint: from the formats its trainer state recorded, or, for a
    checkpoint saved before distft recorded them, its config's data.template."""
    from distft.checkpoint.store import read_trainer_state  # lazy: torch (preflight imports this module)

    try:
        formats = read_trainer_state(checkpoint).get("formats")
    except (OSError, ValueError, AttributeError):
        formats = None
    return prompt_format(formats if isinstance(formats, list) else [], cfg.data.template)


def stop_tokens(tokenizer, extra: Sequence[str] = ()) -> list[str]:
    """The tokens that end an answer: eos, the chat template's end-of-turn token, and `extra`
    (`data.stop_tokens`), in that order, each once. Raises TemplateError for an `extra` entry
    that is not one token of the tokenizer."""
    vocab = tokenizer.get_vocab()
    for token in extra:
        if token not in vocab:
            raise TemplateError(
                f"data.stop_tokens: {token!r} is not a token of the tokenizer; a stop token is one token "
                "(e.g. <|im_end|>, <|eot_id|>), as the tokenizer writes it; check its spelling in tokenizer.json")
    found: list[str] = []
    for token in [tokenizer.eos_token, *end_of_turn_tokens(tokenizer), *extra]:
        if token and token not in found:
            found.append(token)
    return found


def stop_token_ids(tokenizer, extra: Sequence[str] = ()) -> list[int]:
    """`stop_tokens` as ids, for generation and the exported generation_config."""
    return [int(tokenizer.convert_tokens_to_ids(token)) for token in stop_tokens(tokenizer, extra)]


def _first_jsonl_record(path: str) -> Optional[dict]:
    try:
        with open_regular(path, "rb", follow_links=True) as f:  # a FIFO is refused, not waited for
            for line in f:
                if line.strip():
                    value = json.loads(line)
                    return value if isinstance(value, dict) else None
    except (OSError, ValueError, RecursionError):
        return None  # unreadable files are path_problems' to report
    return None


def _needs_chat_template(data) -> bool:
    """True when the run renders conversations: template=chat, format=chat, or (format=auto) a
    JSON Lines data file whose first row has the messages field (other sources: not known here)."""
    if data.template == "chat" or data.format == "chat":
        return True
    if data.format != "auto" or data.source != "jsonl":
        return False
    paths = [p for p in (data.path, data.eval_path) if p]
    return any(data.messages_field in (_first_jsonl_record(os.path.expanduser(p)) or {}) for p in paths)


def _local_tokenizer_has_chat_template(directory: str) -> Optional[bool]:
    """Whether a tokenizer directory ships a chat template (tokenizer_config.json's chat_template,
    or chat_template.jinja / .json beside it); None when it is not a readable local directory."""
    if not os.path.isdir(directory):
        return None
    if any(os.path.isfile(os.path.join(directory, name)) for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        with open(os.path.join(directory, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return None


def chat_template_problems(cfg) -> list[str]:
    """Preflight (no tokenizer is loaded): `data.chat_template` names a template, and chat data
    with a local tokenizer that has no chat template is refused before any run directory exists.
    A hub tokenizer is checked by the trainer, when it is loaded."""
    data, model = cfg.data, cfg.model
    choice = data.chat_template
    if choice is not None and choice not in NAMED_CHAT_TEMPLATES and not ("{{" in choice or "{%" in choice):
        return [f"data.chat_template={choice!r} is neither a named template ({', '.join(NAMED_CHAT_TEMPLATES)}) nor a "
                "Jinja template (a string with {{ ... }} or {% ... %}); null uses the tokenizer's own"]
    if choice or not _needs_chat_template(data):
        return []
    source = model.tokenizer or model.name_or_path
    if source is None:
        return []  # the built-in tokenizer has a chat template
    if _local_tokenizer_has_chat_template(os.path.expanduser(source)) is False:
        key = "model.tokenizer" if model.tokenizer else "model.name_or_path"
        return [missing_chat_template(f"{key}={source!r}")]
    return []
