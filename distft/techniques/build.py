"""What gets trained: full weights, a PEFT adapter (LoRA, DoRA, QLoRA) or virtual tokens.

One function builds the trainable model for a config: the base from `model.build_model` (4-bit
quantised through bitsandbytes for QLoRA), then the PEFT wrapping. Every technique goes through
PEFT's own classes so adapters save and load in PEFT's format and merge with its code; we only
add what PEFT leaves to the caller (virtual tokens initialised from a real text, dequantising a
QLoRA base before merging).

Virtual tokens start as a real text (`init_text`: `technique.prompt_init_text`, by default
`DEFAULT_INIT_TEXT` for a pretrained model): prompt tuning from its token embeddings (PEFT's
TEXT init), prefix tuning from its keys and values through the frozen base (Li & Liang 2021).
Either way the untrained model is the base reading that text first, so step 0 starts near the
base's loss (PEFT's random prefix started SmolLM2-135M at several times its base's loss).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from distft.config import Config, TechniqueConfig
from distft.errors import ModelLoadError
from distft.model.build import build_model, load_tokenizer
from distft.model.vocab import fit_embeddings
from distft.techniques.kinds import technique_kind

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def quantization_config(technique: TechniqueConfig) -> Optional[Any]:
    """bitsandbytes 4-bit config for QLoRA; None for every other technique.

    `bnb_4bit_quant_storage` is a float dtype (not uint8) so that FSDP and ZeRO-3 can flatten and
    shard the packed weights together with the unquantised ones.
    """
    if not technique_kind(technique.name).quantized_base:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError("technique=qlora needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from err
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=technique.quant_type,
        bnb_4bit_use_double_quant=technique.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[technique.compute_dtype],
        bnb_4bit_quant_storage=_DTYPES[technique.quant_storage],
    )


def peft_config(technique: TechniqueConfig) -> Optional[Any]:
    """The PEFT config of a technique; None for full fine-tuning."""
    if not technique_kind(technique.name).peft:
        return None  # before importing peft (and, through it, bitsandbytes): ~3 s a process
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    kind = technique_kind(technique.name)
    if kind.adapter:
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=technique.r,
            lora_alpha=technique.alpha,
            lora_dropout=technique.dropout,
            target_modules=list(technique.target_modules),
            use_dora=kind.decomposes_weights,
            bias="none",
        )
    if technique.name == "prefix":
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=technique.num_virtual_tokens,
            prefix_projection=technique.prefix_projection,
        )
    if technique.name == "prompt":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=technique.num_virtual_tokens)
    return None


def build_base(cfg: Config, dtype: torch.dtype, tokenizer=None, meta: bool = False):
    """The base model as the technique needs it (4-bit for QLoRA), its embeddings fitted to the
    tokenizer (`vocab.fit_embeddings`: resized for full fine-tuning of a path model, refused where
    the new rows could not be trained). `tokenizer` None: the run's own, loaded only where a
    resize can happen, so every rebuild of a resized base has the same shape and weights.
    `meta`: on the meta device (FSDP's sharded build; never QLoRA)."""
    quantization = None if meta else quantization_config(cfg.technique)
    model = build_model(cfg.model, dtype=dtype, meta=meta, quantization_config=quantization)
    if cfg.model.name_or_path is None and tokenizer is not None:
        # A from-scratch architecture knows no tokenizer (its config says bos 1, eos 2, LLaMA's
        # ids); generation reads these, so they must be the tokenizer's (id 2 is a byte elsewhere).
        for target in (model.config, model.generation_config):
            target.bos_token_id, target.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
            target.pad_token_id = tokenizer.pad_token_id
    return fit_embeddings(model, cfg, tokenizer)


def apply_technique(model, cfg: Config, tokenizer=None):
    """Wrap `model` for the configured technique; returns the model to train.

    Full fine-tuning returns the model itself with every parameter trainable. The others freeze
    the base (PEFT does) and add the adapter or virtual tokens, these started from `init_text`
    (`tokenizer` None: the model's own, loaded only for that).
    """
    technique = cfg.technique
    gradient_checkpointing = cfg.train.gradient_checkpointing
    kind = technique_kind(technique.name)
    if not kind.peft:
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    from peft import get_peft_model, prepare_model_for_kbit_training

    if kind.quantized_base:
        keep_4bit_training_layout(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Frozen embeddings give activations with no grad; checkpointed blocks then see no input
        # requiring grad and would skip the adapter's backward.
        model.enable_input_require_grads()
    model = get_peft_model(model, peft_config(technique))
    text = init_text(cfg)
    # On the meta device there are no weights to read: FSDP fills the shards from rank 0's real build.
    if text is not None and not model.get_input_embeddings().weight.is_meta:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        ids = _init_token_ids(text, technique.num_virtual_tokens, tokenizer)
        if technique.name == "prefix":
            _init_prefix_from_ids(model, ids)
        else:
            _init_prompt_from_ids(model, ids)
    return model


def keep_4bit_training_layout(model, refuse_repacked: bool = False) -> None:
    """Stop bitsandbytes from repacking QLoRA's 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first no-grad eval forward of a `Linear4bit` rewrites its weight
    in place into another layout (absmax rounded to bf16) and marks its quant state as repacked,
    for good. Then (1) training on the repacked layout passes no gradient back through the 4-bit
    layers (bitsandbytes 0.50; measured: every LoRA gradient below lm_head is exactly 0), and (2)
    under ZeRO-3 and FSDP, which rebuild gathered weights from their partitions in the original
    layout, the quant state no longer matches the weights. Without the repack, eval uses the same
    kernel as training. Every QLoRA model is built with this (build_trainable_model) and the
    sharding engines apply it again to what they wrap. `refuse_repacked` (FSDP, which shards the
    weight it finds): a layer already repacked is an error, since bitsandbytes' inverse is lossy."""
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        if refuse_repacked and getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise ValueError(
                "a 4-bit layer was repacked by bitsandbytes for its CPU kernels (an eval-mode forward before "
                "sharding); build the FSDP engine before evaluating the model"
            )
        module.support_avx512bf16_for_cpu = False


# An instruction-tuning preamble (Alpaca's): ordinary text in front of an instruction changes little what
# a model predicts next (tests/unit/test_prefix_init.py); it is cut or repeated to num_virtual_tokens.
DEFAULT_INIT_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def init_text(cfg: Config) -> Optional[str]:
    """The text the virtual tokens of prefix / prompt tuning start from; None: PEFT's random init.

    `technique.prompt_init_text` when set; unset (None), `DEFAULT_INIT_TEXT` for a pretrained model
    (`model.name_or_path`), whose loss a random prefix ruins, and PEFT's random init for a model
    built from scratch, which has no behaviour to keep; "" asks for the random init everywhere.
    """
    if not technique_kind(cfg.technique.name).virtual_tokens:
        return None
    text = cfg.technique.prompt_init_text
    if text is None:
        return DEFAULT_INIT_TEXT if cfg.model.name_or_path is not None else None
    return text or None


def _init_token_ids(text: str, num_virtual_tokens: int, tokenizer) -> list[int]:
    """The token ids of `text` repeated and cut to `num_virtual_tokens` (as PEFT's TEXT init)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ModelLoadError(
            f"technique.prompt_init_text={text!r} has no tokens; set a text, or '' for random virtual tokens"
        )
    return (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]


def _init_prompt_from_ids(model, ids: list[int]) -> None:
    """Prompt tuning: the virtual tokens are the embeddings of `ids` (PEFT's own TEXT init needs a
    tokenizer path on disk; the offline tokenizer has none)."""
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        init = embeddings(torch.tensor(ids, device=embeddings.weight.device))
        encoder = model.prompt_encoder[model.active_adapter]
        encoder.embedding.weight.copy_(init.to(encoder.embedding.weight.dtype))


def _init_prefix_from_ids(model, ids: list[int]) -> None:
    """Prefix tuning: the prefix is the keys and values the frozen base computes for `ids`.

    PEFT reads the prefix encoder's output (`get_prompt`) as one row per virtual token holding
    [layer, key|value, kv head, head_dim] flattened (GQA: the KV heads, e.g. SmolLM2-135M's row is
    30 x 2 x 3 x 64), keys after rotary embedding at positions 0..P-1, the positions the real
    tokens then follow. With `prefix_projection` the embedding and the MLP's first layer keep
    PEFT's random init and the last linear layer is solved (least squares, minimum norm) so the
    MLP outputs exactly these rows; with more virtual tokens than its hidden size + 1 the fit is
    the closest one. Deterministic given the weights, so every rank that builds the model gets
    the same prefix (DDP and DeepSpeed broadcast rank 0's anyway; FSDP builds it on rank 0 only).
    """
    config = model.active_peft_config
    base = model.get_base_model()
    embedding = model.get_input_embeddings()
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            output = base(input_ids=torch.tensor([ids], device=embedding.weight.device), use_cache=True)
    finally:
        base.train(was_training)
    cache = getattr(output, "cache", None)  # transformers >= 5.x renamed past_key_values
    cache = output.past_key_values if cache is None else cache
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    heads = config.num_attention_heads
    expected = (config.num_layers, 2, heads, len(ids), config.token_dim // heads)
    if tuple(kv.shape) != expected:
        raise RuntimeError(f"the base's key/values have shape {tuple(kv.shape)}, PEFT's prefix expects {expected} "
                           "(layers, key|value, kv heads, virtual tokens, head dim)")
    target = kv.permute(3, 0, 1, 2, 4).reshape(len(ids), -1)  # [virtual token, layer x k|v x head x dim]
    encoder = model.prompt_encoder[model.active_adapter]
    with torch.no_grad():
        if not encoder.prefix_projection:
            encoder.embedding.weight.copy_(target.to(encoder.embedding.weight.dtype))
            return
        first, activation, last = encoder.transform
        hidden = activation(first(encoder.embedding.weight)).double()
        design = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)  # [P, hidden + 1]: weight and bias
        solution = torch.linalg.pinv(design).to(last.weight.dtype) @ target.to(last.weight.dtype)
        last.weight.copy_(solution[:-1].T)
        last.bias.copy_(solution[-1])


def build_trainable_model(cfg: Config, dtype: torch.dtype, tokenizer=None):
    """Base + technique: the model the engine trains."""
    return apply_technique(build_base(cfg, dtype, tokenizer), cfg, tokenizer)


def build_meta_model(cfg: Config, dtype: torch.dtype = torch.float32, tokenizer=None):
    """Base + technique on the meta device: the shapes and the trainable set of the model the
    engine trains, no memory. FSDP shards it before filling its shards from rank 0; the planner
    counts it. QLoRA gets its layout with float linears where the 4-bit ones will be
    (bitsandbytes quantises only while weights load): countable, not trainable, so FSDP builds
    a QLoRA model for real (engines.build_model_for_engine)."""
    # PEFT's initialisers advance the RNG even on meta tensors: restore it, so that rank 0's real
    # build in materialize_from_rank0 draws exactly what an eager build would have drawn.
    with torch.random.fork_rng(devices=[]):
        return apply_technique(build_base(cfg, dtype, tokenizer, meta=True), cfg, tokenizer)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def base_model_context(model):
    """A context in which `model` behaves as its base (adapters and virtual tokens off).

    Used to score the base on the same held-out prompts as the tuned model without loading a
    second copy. Full fine-tuning has no such switch: the caller evaluates before training.
    """
    import contextlib

    if is_peft(model):
        return model.disable_adapter()
    return contextlib.nullcontext()


def uses_prompt_learning(cfg: Config) -> bool:
    return technique_kind(cfg.technique.name).virtual_tokens


def dequantize_base(model):
    """A QLoRA base with its 4-bit linears turned back into float ones (for merging adapters)."""
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return model.dequantize()
    return model
