"""A standalone Hugging Face model from a run (`distft export` / `python -m distft.export CHECKPOINT
--out DIR`, distft/commands/export.py).

CHECKPOINT is a checkpoint directory or a run directory (its latest checkpoint). The result
loads with `AutoModelForCausalLM.from_pretrained(DIR)` (merged weights and the tokenizer); for
prefix/prompt tuning, which have no merged form, DIR holds `base/` and `adapter/` instead. Weights
are in the dtype the base model was distributed in unless `--dtype` says otherwise.

Also what reads a checkpoint back as a model (`load_model`, `load_base`), for evaluation and
export. Full weights are already a Hugging Face model; LoRA/DoRA adapters are merged into their
base (a QLoRA base is dequantised first, so the merge adds the adapter to exactly the weights it
was trained against). Prefix and prompt tuning have no merged form: export writes the base and
the adapter for `PeftModel.from_pretrained`. Every checkpoint is verified against its manifest
before it is read (`resolve_checkpoint`).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from distft.checkpoint.store import read_meta
from distft.checkpoint.verify import resolve_checkpoint
from distft.config import Config, to_config
from distft.data.templates import stop_token_ids, trained_format
from distft.errors import CheckpointError, ModelLoadError, OutputError, TemplateError
from distft.files import describe, is_disk_full, remove_tree, write_json, write_text
from distft.model.build import load_error
from distft.techniques.build import build_base, dequantize_base
from distft.techniques.kinds import technique_kind


def checkpoint_config(checkpoint: str, trust_remote_code: bool = False) -> Config:
    """The (secret-redacted) config a checkpoint was trained with, as a typed Config, with every
    setting that runs code taken from the caller instead of the checkpoint.

    A checkpoint is data: whoever can write one can rewrite its meta.json and manifest (the
    README's threat model). So `model.trust_remote_code` and hub kernels in
    `model.attn_implementation` come only from `trust_remote_code` (the user's own
    `--trust-remote-code`), and augmentation callables (`data.augment.functions`), which reading a
    checkpoint never needs (the held-out split is never augmented), are dropped. What a
    checkpoint asked for and did not get is printed on stderr."""
    try:
        cfg = to_config(read_meta(checkpoint)["config"])
    except Exception as err:  # noqa: BLE001 - a damaged or foreign meta.json is the user's problem, one line
        raise CheckpointError(f"{checkpoint}/meta.json does not hold a distft config this version reads "
                              f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                              "pass a checkpoint written by distft") from None
    ignored = []
    if cfg.model.trust_remote_code and not trust_remote_code:
        ignored.append("model.trust_remote_code=true")
    cfg.model.trust_remote_code = trust_remote_code
    if "/" in cfg.model.attn_implementation and not trust_remote_code:  # a kernel downloaded from the hub
        ignored.append(f"model.attn_implementation={cfg.model.attn_implementation}")
        cfg.model.attn_implementation = "sdpa"
    cfg.data.augment.functions = []
    if ignored:
        print(f"distft: {checkpoint}/meta.json asks for {', '.join(ignored)}; not honoured, because settings that "
              "run code never come from a checkpoint. Pass --trust-remote-code if you trust this model's code",
              file=sys.stderr)
    return cfg


def load_tokenizer_from(checkpoint: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = os.path.join(checkpoint, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise CheckpointError(str(load_error("tokenizer", path, err))) from None


def load_model(checkpoint: str, dtype: torch.dtype = torch.float32, quantized: bool = True,
               trust_remote_code: bool = False):
    """(config, tuned model, tokenizer) of a checkpoint, as the trainer had it.

    Adapters are loaded onto a rebuilt base: from-scratch bases are rebuilt bit for bit from
    their seed, path bases are loaded from their path. `quantized=False` loads a QLoRA base in
    full precision (dequantised), which is what merging needs. Code-running settings come from
    `trust_remote_code`, never from the checkpoint (`checkpoint_config`).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint, trust_remote_code)
    return cfg, *_load_tuned(checkpoint, cfg, dtype, quantized, trust_remote_code)


def _load_tuned(checkpoint: str, cfg: Config, dtype: torch.dtype, quantized: bool, trust_remote_code: bool):
    """(tuned model, tokenizer) of a verified checkpoint whose config is `cfg` (`load_model`)."""
    tokenizer = load_tokenizer_from(checkpoint, trust_remote_code)
    model_dir = os.path.join(checkpoint, "model")
    try:
        if not technique_kind(cfg.technique.name).peft:  # the whole model, saved as a transformers one
            from transformers import AutoModelForCausalLM

            try:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as err:
                raise load_error("model", model_dir, err) from None
            return model, tokenizer
        from peft import PeftModel

        base = build_base(cfg, dtype, tokenizer)
        if not quantized:
            base = dequantize_base(base).to(dtype)
        return PeftModel.from_pretrained(base, model_dir), tokenizer
    except ModelLoadError as err:
        raise CheckpointError(f"{checkpoint}: {err}") from None


def load_base(cfg: Config, dtype: torch.dtype = torch.float32, tokenizer=None):
    """The untuned base of a run (for base-vs-tuned reports), quantised as in training, with its
    embeddings resized as training resized them (`vocab.fit_embeddings`; `tokenizer` None: the
    run's own, from `cfg.model`), so the held-out batches' added tokens index real rows."""
    return build_base(cfg, dtype, tokenizer)


def export(checkpoint: str, out_dir: str, dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False,
           fmt: str = "hf", gguf_type: str = "f16") -> str:
    """Write a standalone Hugging Face model (merged weights + tokenizer) into `out_dir`; with
    `fmt="gguf"`, one GGUF file in `gguf_type` (f16, bf16, q8_0) for llama.cpp and an Ollama
    Modelfile beside it instead (distft/checkpoint/gguf.py; merged in float32 first).

    Weights in `dtype`; None: the dtype the base model was distributed in (`export_dtype`), said
    on stdout with the reason once exported, with a warning on stderr when a full fine-tune's
    updates round away in it (`warn_if_rounded_away`). Refuses to write into a non-empty
    directory: export never overwrites earlier results. Written into `<out_dir>.tmp`, renamed
    once complete; a failure there (a full disk, anything) removes the partial copy and ends in
    one message (`export_error`); the checkpoint is only read.
    """
    checkpoint = resolve_checkpoint(checkpoint, announce=True)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    real = os.path.realpath(checkpoint)
    if os.path.commonpath([os.path.realpath(out_dir), real]) == real:
        raise CheckpointError(f"--out {out_dir} is inside the checkpoint {checkpoint}, which is never written to after "
                              "its commit (it would no longer match its manifest); choose a directory outside it")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"export directory {out_dir} is not empty; choose a new --out directory")
    cfg = checkpoint_config(checkpoint, trust_remote_code)
    kind = technique_kind(cfg.technique.name)
    if fmt == "gguf":
        if kind.peft and not kind.mergeable:
            raise CheckpointError(f"--format gguf holds one model, and technique={cfg.technique.name} has no merged "
                                  "form (its virtual tokens are not weights of the base); export it without --format "
                                  "gguf (base/ and adapter/ for PEFT)")
        dtype, why = torch.float32, f"{gguf_type} GGUF for llama.cpp, with an Ollama Modelfile"
    else:
        dtype, why = export_dtype(cfg, dtype)
    model, tokenizer = _load_tuned(checkpoint, cfg, dtype, quantized=False, trust_remote_code=trust_remote_code)
    if fmt == "gguf":
        from distft.checkpoint.gguf import gguf_problem

        problem = gguf_problem(model.config, tokenizer)
        if problem:
            raise CheckpointError(problem)
    elif kind.trains_all_weights:
        warn_if_rounded_away(model, cfg, checkpoint, tokenizer)
    stop_ids = set_generation_stops(model, tokenizer, cfg)
    tmp = out_dir + ".tmp"
    remove_tree(tmp)  # a crashed export's copy; a link there is removed, never written through
    try:
        os.mkdir(tmp)
        if fmt == "gguf":
            _write_gguf_export(cfg, model, tokenizer, checkpoint, tmp, gguf_type, stop_ids)
        else:
            _write_export(cfg, model, tokenizer, checkpoint, tmp, out_dir)
        # How to prompt it (distft.evaluation.chat reads it): the run's template and where its answers stop.
        write_json(os.path.join(tmp, "prompt_format.json"), {
            "template": trained_format(checkpoint, cfg), "chat_template": cfg.data.chat_template,
            "stop_token_ids": stop_ids,
            "note": "the format the run's training rows were rendered in: chat = the tokenizer's chat template; "
                    "alpaca/alpaca_short/plain = distft.data.templates.alpaca_prompt (instruction, input, then the "
                    "answer)"}, what="the export")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException as err:
        # Nothing half-written stays behind: the partial copy can be as large as the model.
        remove_tree(tmp)
        if isinstance(err, CheckpointError) or not isinstance(err, Exception):
            raise  # already one message (non-finite weights), or Ctrl-C: an interrupt stays one
        raise export_error(out_dir, tmp, err) from err
    print(why)  # with the result, not before it: a failed export stays one message
    return out_dir


def _write_export(cfg: Config, model, tokenizer, checkpoint: str, tmp: str, out_dir: str) -> None:
    """The export's files, into `tmp` (renamed to `out_dir` once complete)."""
    kind = technique_kind(cfg.technique.name)
    if kind.peft and not kind.mergeable:
        # No merged form: the virtual tokens are not weights of the base.
        base = model.get_base_model()
        base.save_pretrained(os.path.join(tmp, "base"), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(tmp, "base"))
        model.peft_config[model.active_adapter].base_model_name_or_path = os.path.join(out_dir, "base")
        model.save_pretrained(os.path.join(tmp, "adapter"), save_embedding_layers=False)  # base/ holds them
        note = (
            f"technique={cfg.technique.name} has no merged form. Load with:\n"
            "  base = AutoModelForCausalLM.from_pretrained('<out>/base')\n"
            "  model = PeftModel.from_pretrained(base, '<out>/adapter')\n"
        )
        write_text(os.path.join(tmp, "README.txt"), note, "the export", root=tmp)
    else:
        merged_model(cfg, model, checkpoint).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def merged_model(cfg: Config, model, checkpoint: str):
    """The tuned model as one transformers model: LoRA/DoRA merged into the base; refused when a
    weight is not finite (nothing exported)."""
    if technique_kind(cfg.technique.name).mergeable:
        model = model.merge_and_unload()
    bad = [name for name, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(f"{checkpoint} holds non-finite weights ({', '.join(bad[:3])}); nothing exported. "
                              "Export an earlier checkpoint (checkpoints/step_N)")
    return model


def _write_gguf_export(cfg: Config, model, tokenizer, checkpoint: str, tmp: str, gguf_type: str,
                       stop_ids: list[int]) -> None:
    """The GGUF export's files, into `tmp`: model-<type>.gguf and its Modelfile."""
    from distft.checkpoint.gguf import gguf_file_name, write_gguf, write_modelfile

    model = merged_model(cfg, model, checkpoint)
    name = gguf_file_name(gguf_type)
    title = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))) or "distft"
    write_gguf(model, tokenizer, os.path.join(tmp, name), gguf_type, title, stop_ids)
    write_modelfile(os.path.join(tmp, "Modelfile"), name, tokenizer, trained_format(checkpoint, cfg), stop_ids,
                    model.config.max_position_embeddings)


def export_error(out_dir: str, tmp: str, err: BaseException) -> CheckpointError:
    """The one message of an export that failed while writing (a full disk or anything else):
    its cause, that nothing was exported and the partial copy is gone, and for a full disk what to
    do. An OutputError for a write that failed (safetensors reports a full disk as text)."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    message = (f"exporting into {out_dir} failed ({describe(cause)}); nothing was exported and the partial copy "
               f"{tmp} was removed")
    if is_disk_full(err):
        message += ("; the disk (or quota) holding it is full: free space there, or choose an --out on another disk, "
                    "then run the export again")
    if isinstance(cause, OSError) or is_disk_full(err):
        return OutputError(message)
    return CheckpointError(message)


def set_generation_stops(model, tokenizer, cfg: Config) -> list[int]:
    """Write the run's stop tokens (eos, the chat template's end-of-turn token, data.stop_tokens:
    `templates.stop_token_ids`) into the model's generation_config, with the tokenizer's bos and
    pad, so `model.generate()` of the export stops where the tuned model ends its answers. And turn
    the KV cache back on: training builds models with use_cache=False (packed rows need it off),
    which an exported model would otherwise keep, generating without a cache (quadratic). Not for
    prefix/prompt tuning, whose PEFT generation is only right without one (evaluate.py's docstring)."""
    try:
        ids = stop_token_ids(tokenizer, cfg.data.stop_tokens)
    except TemplateError as err:
        raise CheckpointError(str(err)) from None
    for target in {id(m): m for m in (model, getattr(model, "get_base_model", lambda: model)())}.values():
        generation = target.generation_config
        generation.eos_token_id = ids[0] if len(ids) == 1 else ids
        generation.bos_token_id = tokenizer.bos_token_id
        generation.pad_token_id = tokenizer.pad_token_id
        target.config.bos_token_id, target.config.eos_token_id = tokenizer.bos_token_id, ids[0] if ids else None
        target.config.pad_token_id = tokenizer.pad_token_id
        if not technique_kind(cfg.technique.name).virtual_tokens:  # PEFT's virtual tokens break with a cache (evaluate.py)
            generation.use_cache = target.config.use_cache = True
    return ids


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Warn when more than this fraction of a full fine-tune's exported weights are bit-identical to
# the base's: most of its updates rounded away (measured: one step at lr 5e-5 leaves 93% of
# SmolLM2-135M's weights in bf16 as they were).
ROUNDED_AWAY_WARN = 0.5


def config_dtype(name_or_path: str) -> Optional[str]:
    """The dtype a Hugging Face model folder (or hub id) says its weights are in: its config.json's
    `dtype` (`torch_dtype` as older transformers wrote it); None when it names none or cannot be read."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(name_or_path)
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return name if isinstance(name, str) else None


def export_dtype(cfg: Config, requested: Optional[torch.dtype] = None) -> tuple[torch.dtype, str]:
    """The dtype of an export's weights and the line saying why: `requested` when given, else the
    dtype the base was distributed in (a bf16 model exports at its own size, not twice it), else
    float32 (a from-scratch preset has no distributed dtype)."""
    if requested is not None:
        return requested, f"weights in {DTYPE_NAMES.get(requested, requested)}, as asked (--dtype)"
    if cfg.model.name_or_path is None:
        return torch.float32, ("weights in float32, as trained (a from-scratch model has no distributed dtype); "
                               "--dtype bfloat16 for half the size")
    name = config_dtype(cfg.model.name_or_path)
    if name == "float32":
        return torch.float32, "weights in float32, the base model's dtype"
    if name in DTYPES:
        return DTYPES[name], f"weights in {name}, the base model's dtype; --dtype float32 to keep full precision"
    return torch.float32, (f"weights in float32: the base model's config names "
                           f"{'no dtype' if name is None else f'dtype {name}, which export does not write'}; "
                           "--dtype bfloat16 for half the size")


def warn_if_rounded_away(model, cfg: Config, checkpoint: str, tokenizer) -> Optional[float]:
    """Warn on stderr when most of a full fine-tune's weights, cast to the export's dtype, are
    bit-identical to the base's in that dtype: its updates were smaller than that dtype's rounding
    step and the export would be (nearly) the base. Returns the identical fraction; None where
    nothing is cast (the export's dtype is the checkpoint's own). Holds the base beside the model
    for the comparison: twice the export's dtype in memory, what a float32 export alone took."""
    dtype = model.dtype
    if config_dtype(os.path.join(checkpoint, "model")) in (None, DTYPE_NAMES.get(dtype)):
        return None
    base = load_base(cfg, dtype, tokenizer)
    fraction = identical_fraction(model, base)
    del base
    name = DTYPE_NAMES.get(dtype, str(dtype))
    if fraction > ROUNDED_AWAY_WARN:
        print(f"distft: warning: {fraction:.1%} of the exported weights are bit-identical to the base model's in "
              f"{name}: the fine-tune's updates are below {name}'s rounding step and mostly round away (too few or "
              "too small steps); export with --dtype float32 to keep them", file=sys.stderr)
    return fraction


def identical_fraction(model, base) -> float:
    """The fraction of `model`'s floating-point parameter elements equal to `base`'s (parameters
    of the same name and shape; a tied one counted once)."""
    base_params = dict(base.named_parameters())
    same = total = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            reference = base_params.get(name)
            if reference is None or reference.shape != param.shape or not param.is_floating_point():
                continue
            same += int((param == reference).sum())
            total += param.numel()
    return same / total if total else 0.0
