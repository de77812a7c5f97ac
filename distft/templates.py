"""Prompt templates: how a cleaned row becomes text, split into prompt and target pieces.

A row renders to a list of `(text, is_target)` pieces; `data.py` tokenizes each piece on its own
and masks the non-target ones. Keeping the prompt a separate piece means the prompt's tokens in
training are exactly the tokens the evaluator gets when it tokenizes the prompt alone to generate.

- `alpaca`: the Stanford Alpaca prompt (preamble, with/without-input variants).
- `alpaca_short`: the same headers without the preamble (short sequences for char-level models).
- `plain`: instruction and input on their own lines, nothing else.
- `chat`: the tokenizer's own chat template; only assistant turns are targets. They are found by
  rendering growing prefixes of the conversation, which needs a template whose rendering of a
  conversation starts with its rendering of every shorter prefix ("prefix-stable").

Header variants are the `data.augment.template_variation` augmentation: the same row under other
header wordings, so a model does not latch onto one exact string.
"""

from __future__ import annotations

from typing import Optional

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

Piece = tuple[str, bool]


class TemplateError(Exception):
    """The tokenizer or template cannot render rows at all; data.py turns it into a DataError."""


class RejectedConversation(Exception):
    """The chat template refused one conversation (e.g. roles not alternating): a malformed row."""


def alpaca_prompt(row: dict, template: str, variant: int = 0) -> str:
    """The prompt text of an Alpaca row (everything before the response), without bos."""
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


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises for conversations a template rejects (e.g. roles not alternating)
        raise RejectedConversation(f"the tokenizer's chat template rejected the conversation: {err}") from err
    # Templates that write bos as text would get a second bos: data.py adds the bos id itself.
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos) :] if bos and text.startswith(bos) else text


def chat_pieces(messages: list[dict], tokenizer) -> list[Piece]:
    """Pieces of a conversation: assistant turns (with the template's end tokens) are targets.

    For each assistant turn i, everything between the previous turn's end and the rendering of
    messages[:i] with a generation prompt is prompt; the rest of messages[:i+1] is target.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "chat rows (or data.template=chat) need a tokenizer with a chat_template; "
            "use a chat model's tokenizer (model.tokenizer=...) or data.template=alpaca_short"
        )
    pieces: list[Piece] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateError(
                "the tokenizer's chat template is not prefix-stable (rendering a conversation does not start "
                "with the rendering of its earlier turns), so assistant turns cannot be located for masking; "
                "use a template without history rewriting, or data.template=alpaca_short with alpaca rows"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = _render(tokenizer, messages, generation_prompt=False)
    if not rest.startswith(done):
        raise TemplateError("the tokenizer's chat template is not prefix-stable; see data.template")
    pieces.append((rest[len(done) :], False))
    return [(text, target) for text, target in pieces if text]


def row_pieces(row: dict, kind: str, template: str, tokenizer, variant: int = 0) -> tuple[list[Piece], bool]:
    """(pieces, add_eos) of a cleaned row. Chat templates write their own end-of-turn tokens."""
    if kind == "text":
        return [(row["text"], True)], True
    if kind == "chat":
        return chat_pieces(row["messages"], tokenizer), False
    if template == "chat":
        return chat_pieces(alpaca_messages(row), tokenizer), False
    return [(alpaca_prompt(row, template, variant), False), (row["output"], True)], True


def prompt_and_reference(row: dict, kind: str, template: str, tokenizer) -> Optional[tuple[str, str]]:
    """What a generation eval feeds the model (no bos) and the expected answer; None for text rows.

    For conversations: everything before the last assistant turn, and that turn's content.
    """
    if kind == "text":
        return None
    if kind == "alpaca" and template != "chat":
        return alpaca_prompt(row, template), row["output"]
    messages = row["messages"] if kind == "chat" else alpaca_messages(row)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    pieces = chat_pieces(messages[: last + 1], tokenizer)
    return "".join(text for text, _ in pieces[:-1]), messages[last]["content"]
