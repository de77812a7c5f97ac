"""Build a LLaMA-family model and its tokenizer; the plain token-weighted loss (`token_loss`, for heads
that distft/model/loss.py's chunked path does not take).

Three sources, one function each way:
- a preset with `name_or_path: null` is built from its architecture with a fixed `init_seed`, so the
  "base" of a from-scratch run can be rebuilt bit for bit later (evaluation, export) without
  saving it;
- a local directory or hub id is loaded with `from_pretrained` (its config.json wins);
- `build_offline_tokenizer()` is a character-level tokenizer made in code, so the tiny preset and
  every test run with no network and no downloaded files. Characters, not BPE merges, because
  the embedded tasks (upper-casing, reversing, adding digits) are per-character transformations a
  tiny model learns in minutes when each character is one token.

The model code never imports torch.distributed: parallelism lives in engines/.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from distft.config import BNB_MIN_8BIT_SIZE, BNB_MIN_PAGED_SIZE, ModelConfig
from distft.data.samples import IGNORE_INDEX  # noqa: F401  (re-exported: the loss's ignore_index)
from distft.errors import ModelLoadError  # noqa: F401  (re-exported: callers catch distft.model.build.ModelLoadError)
from distft.tracking import quiet_libraries

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# Printable ASCII plus newline and tab: everything the embedded data and templates use.
OFFLINE_CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")
OFFLINE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


def load_error(key: str, source: str, err: Exception) -> ModelLoadError:
    import os

    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "trust_remote_code" in str(err):  # transformers refusing a model/tokenizer that ships Python code
        return ModelLoadError(
            f"cannot load {key}={source!r}: it runs its own Python code, and trust_remote_code is off. Turn it on "
            "only for code you have read and trust: model.trust_remote_code=true for python -m distft, "
            "--trust-remote-code for python -m distft.evaluate / distft.export"
        )
    if os.path.isdir(source):
        found = sorted(os.listdir(source))
        first = f"the directory holds no loadable model or tokenizer (found: {', '.join(found[:8]) or 'nothing'})."
    return ModelLoadError(
        f"cannot load {key}={source!r}: {first} Point {key} at a local directory holding config.json, the "
        "weights and the tokenizer files, or make the hub reachable (set HF_TOKEN for gated LLaMA repos)."
    )


def build_offline_tokenizer():
    """A character-level LLaMA-style tokenizer (<unk>=0, <s>=1, </s>=2, <pad>=3), built in code;
    like LLaMA's, it puts <s> in front of a text it encodes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + OFFLINE_CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    # bos in front of every text, as LLaMA's tokenizers add it (distft trains with what the
    # tokenizer's own call adds: templates.bos_ids).
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = OFFLINE_CHAT_TEMPLATE
    tokenizer.model_max_length = 1_000_000
    return tokenizer


def load_tokenizer(cfg: ModelConfig, local_files_only: bool = False):
    """The tokenizer for a model config: explicit path, the model's own, or the offline one.

    LLaMA tokenizers ship without a pad token; we use eos for padding (pads are masked out of the
    loss and the attention, so the choice does not change training).
    """
    source = cfg.tokenizer or cfg.name_or_path
    if source is None:
        return build_offline_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code,
                                                  local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise load_error("model.tokenizer" if cfg.tokenizer else "model.name_or_path", source, err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def llama_config(cfg: ModelConfig, **overrides: Any):
    """The transformers LlamaConfig of a preset (architecture fields only)."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        # Training never wants a KV cache, and with one transformers ignores packed position_ids
        # (samples would attend to each other). generate() turns it on for itself.
        use_cache=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`model.dtype` -> torch dtype. auto: bf16 where the device has fast bf16, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@contextlib.contextmanager
def _seeded(seed: int):
    """Run the block under a fixed CPU RNG seed, then restore the caller's RNG state."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    meta: bool = False,
    quantization_config: Optional[Any] = None,
    device_map: Optional[Any] = None,
):
    """The base model: from scratch (seeded, so rebuildable) or from `name_or_path`.

    `meta=True` builds on the meta device (no memory) for planning and for engines that
    materialise shards themselves. Every command builds its models here: the library noise a
    user cannot act on is silenced first (tracking.quiet_libraries).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    quiet_libraries()

    if cfg.name_or_path is None:
        config = llama_config(cfg)
        config._attn_implementation = cfg.attn_implementation
        if meta:
            with torch.device("meta"):
                return LlamaForCausalLM(config).to(dtype)
        if quantization_config is not None:
            # bitsandbytes quantises while loading weights; from-scratch bases go through a
            # temporary save so the quantised model holds exactly the seeded weights.
            return _quantized_from_scratch(cfg, dtype, quantization_config)
        if cfg.init_device == "cuda":
            if not torch.cuda.is_available():
                raise ModelLoadError("model.init_device=cuda, but this process sees no GPU; use model.init_device=cpu")
            with _seeded_cuda(cfg.init_seed), torch.device("cuda"):
                return LlamaForCausalLM._from_config(config, dtype=dtype)
        with _seeded(cfg.init_seed):
            model = LlamaForCausalLM(config)
        return model.to(dtype)

    kwargs: dict[str, Any] = dict(
        dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code
    )
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if meta:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise load_error("model.name_or_path", cfg.name_or_path, err) from err


def _quantized_from_scratch(cfg: ModelConfig, dtype: torch.dtype, quantization_config: Any):
    import os
    import tempfile

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="distft-base-") as tmp:
        model = build_model(cfg, dtype=dtype)
        # Not save_pretrained: with a process group it writes on rank 0 only, and every rank needs it.
        model.config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del model  # a GPU-drawn base must not sit beside its quantised copy
        if cfg.init_device == "cuda":
            torch.cuda.empty_cache()
        return AutoModelForCausalLM.from_pretrained(
            tmp, dtype=dtype, quantization_config=quantization_config, attn_implementation=cfg.attn_implementation
        )


@contextlib.contextmanager
def _seeded_cuda(seed: int):
    """As _seeded, for the current CUDA device's generator."""
    state = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(seed)
    try:
        yield
    finally:
        torch.cuda.set_rng_state(state)


# Perplexity is exp(loss) with the loss capped here, so a diverged model reports a huge finite
# number (JSON has no inf): exp(100) ~ 2.7e43, far above any real model's.
MAX_LOSS_FOR_PERPLEXITY = 100.0


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens.

    Returning the sum (not the mean) lets the trainer weight every target token equally across
    micro-batches, accumulation steps and ranks: divide by the global token count once.
    `labels` are aligned with `logits` (position t holds the token at t); the shift happens here.
    Prompt tuning prepends virtual tokens to the logits: the last T positions align with labels.
    """
    logits = logits[:, -labels.size(1) :, :]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows, T - 1] fp32: at each target position the log-probability of its label (the shift
    happens here, as in `token_loss`; virtual tokens in front dropped), 0 elsewhere."""
    logits = logits[:, -labels.size(1) :, :]
    shift_labels = labels[:, 1:]
    picked = torch.gather(F.log_softmax(logits[:, :-1, :].float(), dim=-1), 2,
                          shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (shift_labels != IGNORE_INDEX)


def model_inputs(batch: dict) -> dict:
    """The keys of a batch the model takes (packed: position_ids; padded: attention_mask)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}


@dataclass
class ParameterCounts:
    total: int  # every parameter of the trained model (base + adapter or virtual tokens)
    trainable: int
    frozen: int
    quantized: int  # frozen base weights stored in 4 bits (QLoRA), part of `frozen`
    largest_layer: int  # FSDP's largest gather unit: a decoder layer, or the root (embeddings, norm, head)
    largest_module: int  # the most parameters one module holds itself (ZeRO-3 gathers module by module)
    # Trainable elements in tensors too small for bitsandbytes' 8-bit state (fp32 moments) and for
    # its paging (allocated as ordinary GPU memory): plan.optimizer_bytes().
    trainable_below_8bit: int = 0
    trainable_below_paging: int = 0


def count_parameters(model: torch.nn.Module, quantized_base: bool = False) -> ParameterCounts:
    """The parameters of a built model (real or on the meta device), tied weights once, 4-bit
    weights at their logical size (bitsandbytes packs two or more into one stored element).
    `quantized_base`: a QLoRA layout, whose frozen linear weights in the decoder layers are (or,
    on the meta device, where bitsandbytes cannot quantise, will be) stored in 4 bits."""
    params = list(model.parameters())  # each tied weight once
    sizes = {id(p): _logical_numel(p) for p in params}
    total = sum(sizes.values())
    trainable = sum(sizes[id(p)] for p in params if p.requires_grad)
    quantized = 0
    if quantized_base:
        quantized = sum(sizes[id(module.weight)] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and ".layers." in name
                        and not module.weight.requires_grad and not any(a in name for a in ADAPTER_PARTS))
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(sizes[id(p)] for p in params if id(p) not in in_layers)
    largest = max([root, *(sum(sizes[id(p)] for p in layer.parameters()) for layer in layers)])
    # DeepSpeed's own definition (deepspeed.runtime.zero.stage3.model_to_params).
    largest_module = max(sum(sizes.get(id(p), 0) for p in m.parameters(recurse=False)) for m in model.modules())
    trained = [sizes[id(p)] for p in params if p.requires_grad]
    return ParameterCounts(total, trainable, total - trainable, quantized, largest, largest_module,
                           sum(n for n in trained if n < BNB_MIN_8BIT_SIZE), sum(n for n in trained if n < BNB_MIN_PAGED_SIZE))


# Parameter names of PEFT's adapters (LoRA's A and B, DoRA's magnitudes): never quantised.
ADAPTER_PARTS = ("lora_", "magnitude_vector")


def _logical_numel(param: torch.Tensor) -> int:
    state = getattr(param, "quant_state", None)
    if getattr(state, "shape", None) is not None:
        return int(state.shape.numel())
    if param.__class__.__name__ == "Params4bit":  # not quantised yet: two 4-bit values per stored byte
        return param.numel() * param.element_size() * 2
    return param.numel()
