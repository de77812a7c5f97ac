"""GGUF export: one file llama.cpp and Ollama run (`python -m distft.export RUN --out DIR --format gguf`).

`write_gguf` writes a merged LLaMA-architecture model (LLaMA 1/2/3, SmolLM2, any
`model_type: llama` with default RoPE) with the `gguf` package's `GGUFWriter`: the weights under
llama.cpp's tensor names (`gguf.get_tensor_name_map`), the query and key projections permuted into
the rotary layout llama.cpp computes in, a tied output layer written once (llama.cpp reuses
`token_embd`), the hyperparameters, and the tokenizer: its tokens, their types, merges (byte-level
BPE) or scores (SentencePiece), bos/eos/unk/pad, whether bos is added, the chat template and the
end-of-turn token. `write_modelfile` writes the Ollama `Modelfile` beside it: the template the run
trained on, in Ollama's Go template syntax, its default system prompt, its stop tokens and the
context length.

Types (`GGUF_TYPES`): f16 and bf16 (every matrix; norms stay f32, as llama.cpp's converter keeps
them), q8_0 (matrices whose rows are multiples of 32 quantised in blocks of 32 with one f16 scale:
about half f16's size, measured 144.8 vs 270.9 MB on SmolLM2-135M; the rest f16).

What this does not write, it refuses before any work, naming the way out (export safetensors and
run llama.cpp's `convert_hf_to_gguf.py`): other architectures, RoPE scaling (LLaMA-3.1's, which
llama.cpp applies from a tensor transformers would not read back), biases, and the character-level
tokenizer, which no GGUF tokenizer model describes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np
import torch

from distft.errors import CheckpointError

GGUF_TYPES = ("f16", "bf16", "q8_0")
QUANT_BLOCK = 32  # q8_0 quantises rows in blocks of this many values
# tokenizer.json pre-tokenizers and the name llama.cpp knows them by (tokenizer.ggml.pre; it refuses
# a byte-level vocabulary whose pre-tokenizer it does not know). Llama-3's regex, GPT-2's
# (ByteLevel with use_regex), SmolLM's (single digits, then GPT-2's).
LLAMA3_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def gguf_problem(config, tokenizer=None) -> Optional[str]:
    """Why this model (its transformers config) and tokenizer have no GGUF form here; None when
    they have one."""
    fix = ("export safetensors instead (--format hf) and convert that with llama.cpp's convert_hf_to_gguf.py, "
           "which knows more architectures")
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        return f"--format gguf writes LLaMA-architecture models (model_type llama); this one is {model_type}: {fix}"
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", None):
        return (f"--format gguf writes default RoPE; this model scales it (rope_type {rope.get('rope_type')}, "
                f"as LLaMA-3.1 does): {fix}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return f"--format gguf writes LLaMA layers without biases; this model has attention or MLP biases: {fix}"
    if tokenizer is not None and _tokenizer_kind(_tokenizer_json(tokenizer)) is None:
        return ("--format gguf writes byte-level BPE (GPT-2, Llama-3, SmolLM) and SentencePiece (LLaMA-2) tokenizers; "
                "this one is neither (the character-level tokenizer of the tiny presets?), and no GGUF tokenizer "
                "model describes it: train with a LLaMA-family tokenizer, or export safetensors (--format hf)")
    return None


def _tokenizer_kind(spec: Optional[dict]) -> Optional[str]:
    """GGUF's tokenizer model for a tokenizer.json: `gpt2` (byte-level BPE), `llama` (SentencePiece
    BPE with byte fallback), None (anything else)."""
    if not spec or spec.get("model", {}).get("type") != "BPE":
        return None
    if _has(spec.get("pre_tokenizer"), "ByteLevel") or _has(spec.get("decoder"), "ByteLevel"):
        return "gpt2"
    return "llama" if spec["model"].get("byte_fallback") else None


def _rope_parameters(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def _rope_theta(config) -> float:
    return float(_rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def _tokenizer_json(tokenizer) -> Optional[dict]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    return json.loads(backend.to_str())


def rotary_layout(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A query/key projection's rows in llama.cpp's rotary layout: Hugging Face's LLaMA rotates
    each head's first half against its second half, llama.cpp rotates adjacent pairs, so within
    each head the two halves are interleaved (transformers' GGUF reader undoes exactly this)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _encode(name: str, tensor: torch.Tensor, gguf_type: str):
    """(data, raw_dtype) of one tensor as written: 1-D tensors (norms) in f32, matrices in the
    asked type; q8_0 only where a row divides into its blocks (else f16)."""
    import gguf

    values = tensor.detach().to(torch.float32).cpu().numpy()
    if values.ndim == 1:
        return values, None
    if gguf_type == "f16":
        return values.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if kind == gguf.GGMLQuantizationType.Q8_0 and values.shape[-1] % QUANT_BLOCK:
        return values.astype(np.float16), None
    return gguf.quants.quantize(values, kind), kind


FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model, tokenizer, path: str, gguf_type: str, name: str, stop_ids: list[int]) -> None:
    """Write the merged `model` (a transformers LLaMA) and its `tokenizer` as one GGUF file at `path`
    in `gguf_type` (`GGUF_TYPES`). `stop_ids`: where the run's answers end (eos first, then the
    chat template's end-of-turn token), written as eos and end-of-turn."""
    import gguf

    config = model.config
    problem = gguf_problem(config, tokenizer)
    if problem:
        raise CheckpointError(problem)
    state = model.state_dict()
    blocks = config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab_rows = state["model.embed_tokens.weight"].shape[0]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab_rows)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, vocab_rows, stop_ids)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed from rope.freq_base; a tied head is token_embd, written once
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise CheckpointError(f"--format gguf: {hf_name} has no llama.cpp name; export safetensors (--format hf) "
                                  "and convert it with llama.cpp's convert_hf_to_gguf.py")
        if ".attn_q." in target:
            tensor = rotary_layout(tensor, heads)
        elif ".attn_k." in target:
            tensor = rotary_layout(tensor, kv_heads)
        data, raw_dtype = _encode(target, tensor, gguf_type)
        writer.add_tensor(target, data, raw_dtype=raw_dtype)
        del data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer, tokenizer, vocab_rows: int, stop_ids: list[int]) -> None:
    """The tokenizer's metadata: `gpt2` (byte-level BPE: tokens in their byte-level spelling and the
    merges) or `llama` (SentencePiece: pieces, byte tokens, scores in merge order); token types
    (added specials CONTROL, other added USER_DEFINED); rows of the embedding past the vocabulary
    (padding) as UNUSED `[PAD<i>]`; special ids, add-bos and the chat template."""
    import gguf

    spec = _tokenizer_json(tokenizer)
    bpe = spec["model"]
    byte_level = _tokenizer_kind(spec) == "gpt2"
    size = len(tokenizer)
    if size > vocab_rows:
        raise CheckpointError(f"--format gguf: the tokenizer has {size} tokens but the model {vocab_rows} embedding "
                              "rows; export safetensors (--format hf)")
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    types, scores = [], []
    for index, token in enumerate(tokens):
        if index in added:
            kind = gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED
        elif token == tokenizer.unk_token and not byte_level:
            kind = gguf.TokenType.UNKNOWN
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(kind)
        scores.append(-float(index))  # SentencePiece BPE scores pieces by merge order: earlier, higher
    for index in range(size, vocab_rows):
        tokens.append(f"[PAD{index}]")
        types.append(gguf.TokenType.UNUSED)
        scores.append(-float(index))
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
        merges = bpe.get("merges", [])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for add, token in ((writer.add_bos_token_id, tokenizer.bos_token), (writer.add_unk_token_id, tokenizer.unk_token),
                       (writer.add_pad_token_id, tokenizer.pad_token)):
        if token is not None:
            add(tokenizer.convert_tokens_to_ids(token))
    if stop_ids:
        writer.add_eos_token_id(stop_ids[0])
        if len(stop_ids) > 1:
            writer.add_eot_token_id(stop_ids[1])
    from distft.data.templates import bos_ids

    writer.add_add_bos_token(bool(bos_ids(tokenizer)))
    if not byte_level:
        writer.add_add_space_prefix(_has(spec.get("normalizer"), "Prepend") or _has(spec.get("pre_tokenizer"), "Metaspace"))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _has(component: Optional[dict], kind: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) holds one of type `kind`."""
    if not component:
        return False
    if component.get("type") == kind:
        return True
    parts = component.get("pretokenizers") or component.get("normalizers") or component.get("decoders") or []
    return any(_has(part, kind) for part in parts)


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for this byte-level tokenizer's pre-tokenizer ("default" where it is none
    of the known ones: llama.cpp then splits as GPT-2 does and warns)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split" and LLAMA3_REGEX in json.dumps(parts[0].get("pattern", {})).replace("\\\\", "\\"):
        return "llama-bpe"
    return "default"


# --- Ollama ---------------------------------------------------------------------------------------

SENTINELS = {"system": "\x00SYSTEM\x00", "user": "\x00PROMPT\x00", "assistant": "\x00RESPONSE\x00",
             "next": "\x00NEXT\x00"}


def ollama_template(tokenizer, template: str) -> tuple[str, Optional[str]]:
    """(Ollama TEMPLATE, default system prompt or None) that renders a turn as the run's training
    rendered it: Ollama's per-turn form (`.System`, `.Prompt`, `.Response`), read off the run's own
    format by rendering placeholder messages. For the chat template: the system turn around
    `.System`, the user's turn, the generation prompt, and the end of the answer; a system prompt
    the template puts in when a conversation has none (SmolLM2's) becomes the Modelfile's SYSTEM,
    which Ollama uses when the user gives none. For the Alpaca formats: the prompt around the
    instruction. Raises CheckpointError where the rendering does not split that way."""
    if template != "chat":
        from distft.data.templates import alpaca_prompt

        before, after = alpaca_prompt({"instruction": SENTINELS["user"], "input": ""}, template).split(SENTINELS["user"])
        return _go(before) + "{{ .Prompt }}" + _go(after) + "{{ .Response }}", None
    S, U, A, V = (SENTINELS[k] for k in ("system", "user", "assistant", "next"))
    system, user, answer, nxt = ({"role": "system", "content": S}, {"role": "user", "content": U},
                                 {"role": "assistant", "content": A}, {"role": "user", "content": V})
    try:
        with_system = _render(tokenizer, [system, user], True)  # P0 S P1 U P2
        alone = _render(tokenizer, [user], True)  # [P0 D SE] US U P2
        two_turns = _render(tokenizer, [system, user, answer, nxt], True)  # ... A E US V P2
        system_start, rest = with_system.split(S)
        between, after_prompt = rest.split(U)
        answer_end = two_turns.split(A)[1].split(V)[0]
        ended = _render(tokenizer, [system, user, answer], False).split(A)[1]  # E (+ what ends a conversation)
        if not answer_end.startswith(ended) or not between.endswith(answer_end[len(ended):]):
            raise ValueError("turns are not rendered alike")
        user_start = answer_end[len(ended):]
        system_end = between[:len(between) - len(user_start)]
        before_user, after_alone = alone.split(U)
        if after_alone != after_prompt:
            raise ValueError("the generation prompt depends on the system turn")
        default_system = None
        if before_user != user_start:
            head, tail = system_start, system_end + user_start
            if not (before_user.startswith(head) and before_user.endswith(tail) and len(before_user) >= len(head + tail)):
                raise ValueError("the conversation without a system turn is not rendered as one with a default")
            default_system = before_user[len(head):len(before_user) - len(tail)]
    except (ValueError, TypeError) as err:  # a split that is not one piece: a template this form cannot hold
        raise CheckpointError(f"--format gguf: the chat template does not render as per-turn pieces Ollama's Modelfile "
                              f"can hold ({err}); the .gguf holds the template itself (tokenizer.chat_template), "
                              "which llama.cpp applies; export safetensors (--format hf) for Ollama") from None
    text = ("{{ if .System }}" + _go(system_start) + "{{ .System }}" + _go(system_end) + "{{ end }}"
            + _go(user_start) + "{{ .Prompt }}" + _go(after_prompt) + "{{ .Response }}" + _go(ended))
    return text, default_system


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _go(text: str) -> str:
    """Literal text inside an Ollama (Go) template: `{{` would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def _quoted(text: str) -> str:
    """A Modelfile string: triple-quoted where it spans lines or holds quotes."""
    if '"""' in text:
        raise CheckpointError('--format gguf: the prompt format holds """, which a Modelfile cannot quote; '
                              "export safetensors (--format hf)")
    return f'"""{text}"""' if ("\n" in text or '"' in text) else f'"{text}"'


def write_modelfile(path: str, gguf_name: str, tokenizer, template: str, stop_ids: list[int],
                    context_length: int) -> str:
    """Ollama's Modelfile for the GGUF beside it (`ollama create NAME -f Modelfile`): FROM the file,
    the TEMPLATE and SYSTEM default `ollama_template` reads off the run's format, a `stop` per stop
    token, and num_ctx the model's context. Returns its text."""
    from distft.files import write_text

    text, default_system = ollama_template(tokenizer, template)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(text)}"]
    if default_system:
        lines.append(f"SYSTEM {_quoted(default_system)}")
    for token in tokenizer.convert_ids_to_tokens(stop_ids):
        lines.append(f"PARAMETER stop {_quoted(token)}")
    lines.append(f"PARAMETER num_ctx {context_length}")
    body = "\n".join(lines) + "\n"
    write_text(path, body, "the export", root=os.path.dirname(path))
    return body
