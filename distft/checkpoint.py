"""Checkpoints: atomic save, keep-last-K, loading a checkpoint back as a model, export.

Layout of one checkpoint (`<run_dir>/checkpoints/step_000300/`):
    model/            Hugging Face format: full weights as safetensors, or the PEFT adapter
                      (adapter_model.safetensors + adapter_config.json)
    tokenizer/        the tokenizer the run trained with (the offline one included)
    trainer_state.pt  optimizer, schedule, data position, RNG: what an exact resume needs
    meta.json         step, technique, the run's config with secrets redacted
    COMMITTED         written last: a directory without it is an interrupted save and is ignored

A checkpoint is written under a temporary name and renamed into place (fairseq2's way): a crash
mid-save never leaves a half checkpoint under a real name and never touches the previous one.
`latest` in the checkpoints directory names the newest committed step.

Export turns a checkpoint into a standalone Hugging Face model: full weights are already one;
LoRA/DoRA adapters are merged into their base (a QLoRA base is dequantised first, so the merge
adds the adapter to exactly the weights it was trained against). Prefix and prompt tuning have
no merged form: export writes the base and the adapter for `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional

import torch

from distft.config import Config, to_config, to_dict

log = logging.getLogger("distft")

COMMITTED = "COMMITTED"


class CheckpointError(Exception):
    """A checkpoint path that cannot be used; the message says why and what to pass instead."""


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def committed_checkpoints(run_dir: str) -> list[str]:
    """Committed checkpoint directories of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and "." not in n)
    return [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n, COMMITTED))]


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Config,
    trainer_state: Optional[dict] = None,
    keep_last: int = 2,
    state_dict: Optional[dict] = None,
) -> str:
    """Write a committed checkpoint for `step` and prune older ones beyond `keep_last`.

    `state_dict`: the full weights gathered from a sharded engine (PEFT keeps only the adapter's
    keys of it); None saves what `model` holds."""
    root = checkpoints_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, step_dir_name(step))
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True, **extra)
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    meta = {"step": step, "technique": cfg.technique.name, "experiment": cfg.run.experiment, "config": to_dict(cfg)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    with open(os.path.join(tmp, COMMITTED), "w") as f:
        f.write(str(step))
    if os.path.exists(final):  # the same step saved again (a rerun): move the old one aside first
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    _write_latest(root, final)
    for old in committed_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_latest(root: str, path: str) -> None:
    tmp = os.path.join(root, f".latest.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(os.path.basename(path) + "\n")
    os.replace(tmp, os.path.join(root, "latest"))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a checkpoint path or a run directory (its latest checkpoint)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a run directory or a checkpoint directory")
    if os.path.exists(os.path.join(path, "meta.json")):
        if not os.path.exists(os.path.join(path, COMMITTED)):
            raise CheckpointError(
                f"{path} is an incomplete checkpoint (no {COMMITTED} marker: the save was interrupted); "
                "pass an earlier checkpoint or the run directory"
            )
        return path
    found = committed_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"{path} holds no committed checkpoint (expected meta.json, or checkpoints/step_*/ in a run directory)"
        )
    return found[-1]


def read_meta(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "meta.json")) as f:
        return json.load(f)


def checkpoint_config(checkpoint: str) -> Config:
    """The (secret-redacted) config a checkpoint was trained with, as a typed Config."""
    return to_config(read_meta(checkpoint)["config"])


def load_tokenizer_from(checkpoint: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(checkpoint, "tokenizer"))


def load_model(checkpoint: str, dtype: torch.dtype = torch.float32, quantized: bool = True):
    """(config, tuned model, tokenizer) of a checkpoint, as the trainer had it.

    Adapters are loaded onto a rebuilt base: from-scratch bases are rebuilt bit for bit from
    their seed, path bases are loaded from their path. `quantized=False` loads a QLoRA base in
    full precision (dequantised), which is what merging needs.
    """
    from distft.techniques import build_base, dequantize_base

    checkpoint = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint)
    tokenizer = load_tokenizer_from(checkpoint)
    model_dir = os.path.join(checkpoint, "model")
    if cfg.technique.name == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        return cfg, model, tokenizer
    from peft import PeftModel

    base = build_base(cfg, dtype)
    if not quantized:
        base = dequantize_base(base).to(dtype)
    return cfg, PeftModel.from_pretrained(base, model_dir), tokenizer


def resumable_checkpoint(run_dir: str) -> Optional[str]:
    """The newest committed checkpoint of a run that carries trainer state, or None."""
    for path in reversed(committed_checkpoints(run_dir)):
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            return path
    return None


def load_training_state(checkpoint: str, model: torch.nn.Module) -> dict:
    """Load a checkpoint's weights into `model` (in place) and return its trainer state.

    Full fine-tuning loads every weight; PEFT models load only the adapter (the base is rebuilt
    identically from the config). A checkpoint that does not fit the model is a CheckpointError:
    the run's config changed under the same run directory.
    """
    from safetensors.torch import load_file

    model_dir = os.path.join(checkpoint, "model")
    try:
        if hasattr(model, "peft_config"):
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, load_file(os.path.join(model_dir, "adapter_model.safetensors")))
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
        else:
            index = os.path.join(model_dir, "model.safetensors.index.json")
            if os.path.exists(index):
                from transformers.modeling_utils import load_sharded_checkpoint

                load_sharded_checkpoint(model, model_dir, strict=False)
                unexpected = []
            else:
                result = model.load_state_dict(load_file(os.path.join(model_dir, "model.safetensors")), strict=False)
                unexpected = list(result.unexpected_keys)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: its weights do not fit this model ({str(err).splitlines()[0]}); "
            "set run.dir to a new directory to start over"
        ) from err
    if unexpected:
        raise CheckpointError(f"cannot resume from {checkpoint}: unexpected weights {unexpected[:3]}; "
                              "set run.dir to a new directory to start over")
    return torch.load(os.path.join(checkpoint, "trainer_state.pt"), map_location="cpu", weights_only=False)


def load_base(cfg: Config, dtype: torch.dtype = torch.float32):
    """The untuned base of a run (for base-vs-tuned reports), quantised as in training."""
    from distft.techniques import build_base

    return build_base(cfg, dtype)


def export(checkpoint: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Write a standalone Hugging Face model (merged weights + tokenizer) into `out_dir`.

    Refuses to write into a non-empty directory: export never overwrites earlier results.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"export directory {out_dir} is not empty; choose a new --out directory")
    cfg, model, tokenizer = load_model(checkpoint, dtype=dtype, quantized=False)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.technique.name in ("prefix", "prompt"):
        # No merged form: the virtual tokens are not weights of the base.
        base = model.get_base_model()
        base.save_pretrained(os.path.join(tmp, "base"), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(tmp, "base"))
        model.peft_config[model.active_adapter].base_model_name_or_path = os.path.join(out_dir, "base")
        model.save_pretrained(os.path.join(tmp, "adapter"))
        note = (
            f"technique={cfg.technique.name} has no merged form. Load with:\n"
            "  base = AutoModelForCausalLM.from_pretrained('<out>/base')\n"
            "  model = PeftModel.from_pretrained(base, '<out>/adapter')\n"
        )
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "README.txt"), "w") as f:
            f.write(note)
    else:
        if cfg.technique.name != "full":
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
    return out_dir
