"""What the tokenizer-family tests share: each family's tokenizer, ready for chat rows."""

from __future__ import annotations

from distft.data.templates import use_chat_template
from distft.data.tokenizers import build_tokenizer


def family_tokenizer(family: str):
    tok = build_tokenizer(family)
    if not tok.chat_template:  # llama2: a base tokenizer; conversations use distft's fallback
        use_chat_template(tok, "headers")
    return tok
