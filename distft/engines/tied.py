"""Tied weights stored once: one parameter under two names (an output head that is the input
embedding matrix, `tie_word_embeddings`: `model.embed_tokens.weight` and `lm_head.weight`).

A model's own `state_dict()` lists such a parameter under each name as one tensor, which
safetensors (transformers' `save_pretrained` drops the tied name) and `torch.save` store once.
Copies made for a checkpoint do not share: DCP writes every key of its flat state dict as a tensor
of its own, and a gathered full state dict (ZeRO-3, FSDP) holds one copy per name, which
`save_pretrained` then stores twice (+113 MB for SmolLM2-135M in fp32, +0.5 to 1 GB at Llama-3's
vocabulary). So DCP states leave out the second names (`without_aliases`; loading the first name
fills the shared parameter, and a state written before, holding both, still loads: DCP reads only
the keys asked for), and gathered state dicts give them back as one tensor (`share_aliases`), as
`state_dict()` does. DeepSpeed's own state files hold each parameter once already.
"""

from __future__ import annotations

import torch


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{second name: first name} of every parameter of `model` registered under more than one
    name, in `named_parameters` order (the first name is the one `state_dict()` consumers keep)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name:
            aliases[name] = kept
    return aliases


def without_aliases(state: dict, aliases: dict[str, str]) -> dict:
    """`state` less the second names of tied parameters whose first name it holds."""
    return {key: value for key, value in state.items() if not (key in aliases and aliases[key] in state)}


def share_aliases(state: dict, aliases: dict[str, str]) -> dict:
    """`state` (changed in place) with each tied parameter's second name holding the very tensor of
    its first, as `state_dict()` gives it, so savers that store shared tensors once do."""
    for alias, kept in aliases.items():
        if alias in state and kept in state:
            state[alias] = state[kept]
    return state
