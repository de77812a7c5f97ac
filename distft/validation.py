"""`validate()`: every semantic problem of a composed config, collected before anything starts.

Each check names the key, says what is allowed and how to fix it, and appends to one list, so a
user sees all problems of a command line at once (the preflight adds Hydra-level ones: unknown
options, wrong types). Known-bad combinations are rejected here with the reason. Torch-free,
like config.py: it runs on login nodes before submission.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import math
import os
import re
import shutil
import signal
from typing import Any, Optional

from distft.config import (
    ATTN_IMPLEMENTATIONS,
    AUGMENT_CALL,
    BACKENDS,
    CUDA_ATTN_IMPLEMENTATIONS,
    DATA_FORMATS,
    DATA_SOURCES,
    LAUNCHERS,
    LLAMA_LINEAR_MODULES,
    MODEL_DTYPES,
    NONFINITE_POLICIES,
    OBJECTIVE_LOSSES,
    OBJECTIVE_REFERENCES,
    OFFLINE_TOKENIZER_VOCAB,
    ON_BAD_ROWS,
    OPTIMIZERS,
    PACK_STRATEGIES,
    PRECISIONS,
    QUANT_DTYPES,
    QUANT_STORAGES,
    QUANT_TYPES,
    SCHEDULES,
    TEMPLATES,
    TRACKING_BACKENDS,
    WANDB_MODES,
    Config,
    model_label,
    world_size,
)
from distft.data.sources import SOURCE_KEYS, reader_for, source_problems
from distft.engines.kinds import ENGINES, EngineKind
from distft.evaluation.forgetting import corpus_file
from distft.preemption import segment_problem
from distft.techniques.kinds import TECHNIQUES, TechniqueKind

# An unknown parallel.strategy (refused by name) is checked as an engine with no particular traits.
_UNKNOWN_ENGINE = EngineKind("unknown", "", "", None, multi_rank=True, shards_weights=False, meta_build=False,
                             state_format="dcp", bnb_refusal=None, options="")
# An unknown technique.name (refused by name) likewise: of no family, reading no option.
_UNKNOWN_TECHNIQUE = TechniqueKind("unknown", "")


def _kind(cfg: Config) -> EngineKind:
    return ENGINES.get(cfg.parallel.strategy, _UNKNOWN_ENGINE)


def _technique(cfg: Config) -> TechniqueKind:
    return TECHNIQUES.get(cfg.technique.name, _UNKNOWN_TECHNIQUE)


def _strategies(having, sep: str = "|", last: Optional[str] = None) -> str:
    """The strategies whose EngineKind satisfies `having`, for a message: "a|b|c", or "a, b or c"."""
    names = [s for s, kind in ENGINES.items() if having(kind)]
    if last is None or len(names) < 2:
        return sep.join(names)
    return sep.join(names[:-1]) + last + names[-1]


def _has_key(mapping: Any, dotted: str) -> bool:
    """Whether `mapping` (a config section) holds the key `dotted` ("a.b": key b of its mapping a)."""
    for key in dotted.split("."):
        if not isinstance(mapping, dict) or key not in mapping:
            return False
        mapping = mapping[key]
    return True


def _choice(errors: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")


def _positive(errors: list[str], key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        errors.append(f"{key}={value} must be {bound}")


PRETRAINED_PRESETS = ("pretrained_lora", "pretrained_full")  # conf/experiment: settings for a model users bring


def validate(cfg: Config, model_max_positions: Optional[int] = None, launch: bool = True) -> list[str]:
    """Every semantic problem in `cfg`, each naming the key, what is allowed and how to fix it.

    Returns an empty list when the config is good. Never raises for user errors: the caller prints
    the whole list at once. `model_max_positions` overrides the preset's when the real model config
    is known (a local checkpoint directory); 0 when it is not known here (not checked). `launch`:
    the command starts this config's job; False for a command that only plans it or prepares its
    data (`python -m distft.plan`, `distft.data`), which then needs nothing that only starting the
    job uses (the rendezvous address of a multi-node local launch). One function per section,
    each appending one-line messages, so a new rule lands next to its neighbours.
    """
    errors: list[str] = []
    if cfg.run.experiment in PRETRAINED_PRESETS and not cfg.model.name_or_path:
        # Only this: the rest would judge the tiny preset's architecture against settings for a real one.
        return [f"+experiment={cfg.run.experiment} fine-tunes your own pretrained model: name it with "
                "model.name_or_path=<a local folder, a hub id or a .gguf file> (or model=smollm2, the one `make setup` "
                "prepared)"]
    cfg = _check_numbers(cfg, errors)
    _check_choices(cfg, errors)
    _check_optimisation(cfg, errors)
    _check_batch(cfg, errors)
    positions = cfg.model.max_position_embeddings if model_max_positions is None else model_max_positions
    _check_sequence_length(cfg, errors, positions)  # 0: the real model's positions are not known here
    _check_data(cfg, errors)
    _check_model(cfg, errors)
    _check_technique(cfg, errors)
    _check_objective(cfg, errors)
    _check_parallel(cfg, errors, launch)
    _check_eval_and_run(cfg, errors)
    _check_tracking(cfg, errors, launch)
    return errors


# Integers reach torch, numpy and the C library (seeds, sizes, step counts): none takes more than 64 bits.
_INT64_MAX = 2**63 - 1
# numpy's seed range; train.seed also seeds numpy, and one rule for every seed is easier to remember.
_SEED_MAX = 2**32 - 1


def _check_numbers(cfg: Config, errors: list[str]) -> Config:
    """Every float of the schema must be finite and every integer fit in 64 bits, whatever its key;
    every seed (`*seed` keys) is in numpy's range.

    Generic on purpose: NaN passes every `> 0` and `< 1` check below (all comparisons with NaN are
    false), and infinity passes `> 0`, so a rule per key would miss the next new float. A bad
    value is reported once and replaced by the schema's default (in a copy) for the checks that
    follow, so they do not add a second, confusing message about the same key.
    """
    bad: list[tuple[str, Any]] = []
    for node, name, key, value in _leaves(cfg):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            default = getattr(type(node)(), name)
            example = f"a number such as {default}" if isinstance(default, float) else "a number or null"
            errors.append(f"{key}={value} is not a finite number (NaN and infinity are refused); give {example}")
        elif isinstance(value, int) and abs(value) > _INT64_MAX:
            errors.append(f"{key}={_short_number(value)} does not fit in 64 bits; give an integer of at most "
                          f"{_INT64_MAX} (2**63 - 1) in magnitude")
        elif isinstance(value, int) and (name == "seed" or name.endswith("_seed")) and not 0 <= value <= _SEED_MAX:
            errors.append(f"{key}={value} is not a valid seed; give an integer in [0, {_SEED_MAX}] (2**32 - 1)")
        else:
            continue
        bad.append((key, getattr(type(node)(), name)))
    if not bad:
        return cfg
    fixed = copy.deepcopy(cfg)  # the caller's config stays as the user wrote it
    for key, default in bad:
        *parents, leaf = key.split(".")
        node = fixed
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, default)
    return fixed


def _leaves(cfg: Any, prefix: str = ""):
    """(dataclass node, field name, dotted key, value) of every field that is not a section."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield cfg, f.name, f"{prefix}{f.name}", value


def _short_number(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:8]}...{text[-4:]} ({len(text.lstrip('-'))} digits)"


def machine_problems(cfg: Config, ranks_here: Optional[bool] = None) -> list[str]:
    """What a run started from this command needs from this machine: the packages its attention
    kernel imports, and, when its ranks run here (`ranks_here`; None: launcher=local), the GPUs
    that train.device=cuda, cuda:N and parallel.backend=nccl need.

    Separate from validate() because the answer depends on where the command runs, not on the
    config: `python -m distft.plan` and a SLURM submission from a login node without GPUs plan or
    submit a GPU config; the job's own nodes are checked when it starts there (a SLURM job runs
    this same Python, so its packages are checked at submission). torch is imported only when the
    config asks for a GPU, so CPU runs and login nodes do not pay for it.
    """
    import importlib.util

    errors = []
    m, tr, p, launcher = cfg.model, cfg.train, cfg.parallel, cfg.launcher
    attn = m.attn_implementation
    needed = CUDA_ATTN_IMPLEMENTATIONS.get(attn) or ("kernels" if "/" in attn else None)
    if needed and importlib.util.find_spec(needed) is None:
        install = {"flash_attn": "pip install flash-attn --no-build-isolation",
                   "flash_attn_interface": "build flash-attention's hopper/ package",
                   "kernels": "pip install kernels"}[needed]
        errors.append(f"model.attn_implementation={attn} needs the Python module {needed!r}, which is not installed "
                      f"here ({install}); or use model.attn_implementation=sdpa")
    here = launcher.kind == "local" if ranks_here is None else ranks_here
    if tr.compile and here:
        errors.extend(filter(None, [compile_problem("cpu" if tr.device == "cpu" else tr.device)]))
    if not here or tr.device == "cpu":
        return errors
    wants_gpu = tr.device.startswith("cuda") or p.backend == "nccl" or attn in CUDA_ATTN_IMPLEMENTATIONS
    if not wants_gpu or not re.fullmatch(r"auto|cuda(:\d+)?", tr.device):
        return errors
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(tr.device.partition(":")[2] or 0)
    if tr.device.startswith("cuda") and count == 0:
        errors.append(f"train.device={tr.device}, but this machine has no GPU that torch can use "
                      f"(torch.cuda.is_available() is false); use train.device=cpu or auto, or run on a GPU node")
    elif tr.device.startswith("cuda:") and index >= count:
        errors.append(f"train.device={tr.device}, but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}; "
                      "use one of them, or train.device=cuda (rank r on GPU r)")
    elif count == 0:  # train.device=auto: the CPU, here
        where = "but this machine has none (train.device=auto runs on the CPU here)"
        if p.backend == "nccl":
            errors.append(f"parallel.backend=nccl needs CUDA GPUs, {where}; use parallel.backend=gloo or auto, "
                          "or run on a GPU node")
        if attn in CUDA_ATTN_IMPLEMENTATIONS:
            errors.append(f"model.attn_implementation={attn} needs CUDA GPUs, {where}; use "
                          "model.attn_implementation=sdpa, or run on a GPU node")
        if attn == "flex_attention":
            errors.append(f"model.attn_implementation=flex_attention trains on CUDA GPUs only (torch's "
                          f"FlexAttention has no backward on the CPU), {where}; use model.attn_implementation=sdpa")
    return errors


def compile_problem(device: str) -> Optional[str]:
    """Why train.compile=true cannot build kernels for `device` ("cpu", "cuda", or "auto": a GPU
    where torch sees one) on this machine; None where it can. Inductor writes Triton kernels for a
    GPU and C++ for the CPU, and without them fails only at the first step, deep in a traceback."""
    import importlib.util

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if importlib.util.find_spec("triton") is None:
            return ("train.compile=true needs Triton for the GPU kernels, and it is not installed here (pip install "
                    "triton, the version your torch was built with); or set train.compile=false")
        return None
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
    if not any(shutil.which(c) for c in compilers):
        return (f"train.compile=true on the CPU needs a C++ compiler, and none of {', '.join(compilers)} is on "
                "PATH (Debian: apt-get install g++); or set train.compile=false")
    return None


def _check_choices(cfg: Config, errors: list[str]) -> None:
    m, t, d, tr, p = cfg.model, cfg.technique, cfg.data, cfg.train, cfg.parallel
    _choice(errors, "technique.name", t.name, tuple(TECHNIQUES))
    _choice(errors, "parallel.strategy", p.strategy, tuple(ENGINES))
    _choice(errors, "parallel.backend", p.backend, BACKENDS)
    _choice(errors, "data.source", d.source, DATA_SOURCES)
    _choice(errors, "data.format", d.format, DATA_FORMATS)
    _choice(errors, "data.template", d.template, TEMPLATES)
    _choice(errors, "data.on_bad_rows", d.on_bad_rows, ON_BAD_ROWS)
    _choice(errors, "train.precision", tr.precision, PRECISIONS)
    _choice(errors, "train.schedule", tr.schedule, SCHEDULES)
    _choice(errors, "train.nonfinite", tr.nonfinite, NONFINITE_POLICIES)
    _positive(errors, "train.max_nonfinite_steps", tr.max_nonfinite_steps, allow_zero=True)
    _choice(errors, "tracking.wandb.mode", cfg.tracking.wandb.mode, WANDB_MODES)
    _choice(errors, "launcher.kind", cfg.launcher.kind, LAUNCHERS)
    _choice(errors, "plan.format", cfg.plan.format, ("text", "json"))
    if not 0.0 <= cfg.plan.margin < 1.0:
        errors.append(f"plan.margin={cfg.plan.margin} must be in [0, 1), e.g. 0.1 for 10% headroom")
    if not 0.0 < cfg.plan.mfu <= 1.0:
        errors.append(f"plan.mfu={cfg.plan.mfu} must be in (0, 1], e.g. 0.4")
    for key, value in (("plan.overhead_gb", cfg.plan.overhead_gb), ("plan.host_overhead_gb", cfg.plan.host_overhead_gb),
                       ("cluster.gpu_memory_gb", cfg.cluster.gpu_memory_gb),
                       ("cluster.cpu_memory_gb", cfg.cluster.cpu_memory_gb), ("cluster.peak_tflops", cfg.cluster.peak_tflops),
                       ("cluster.intra_node_gbps", cfg.cluster.intra_node_gbps),
                       ("cluster.inter_node_gbps", cfg.cluster.inter_node_gbps)):
        if value < 0:
            unit = {"cluster.peak_tflops": "TFLOP/s", "cluster.intra_node_gbps": "GB/s",
                    "cluster.inter_node_gbps": "GB/s"}.get(key, "GiB")
            errors.append(f"{key}={value} is negative; give {unit} (0: unknown)" if key.startswith("cluster")
                          else f"{key}={value} is negative; give GiB, e.g. 1.0")
    _choice(errors, "model.dtype", m.dtype, MODEL_DTYPES)
    _choice(errors, "model.init_device", m.init_device, ("cpu", "cuda"))
    if m.init_device == "cuda" and tr.device == "cpu":
        errors.append("model.init_device=cuda draws the weights on a GPU, but train.device=cpu; use model.init_device=cpu")
    if m.attn_implementation not in ATTN_IMPLEMENTATIONS and "/" not in m.attn_implementation:
        errors.append(
            f"model.attn_implementation={m.attn_implementation!r} is not one of: {', '.join(ATTN_IMPLEMENTATIONS)} "
            "(or a hub kernel such as kernels-community/flash-attn)"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", tr.device):
        errors.append(f"train.device={tr.device!r} is not one of: auto, cpu, cuda, cuda:N")
    elif tr.device == "cpu":
        # Whatever the machine: these need CUDA tensors (machine_problems() checks auto and cuda here).
        if p.backend == "nccl":
            errors.append("parallel.backend=nccl needs CUDA GPUs, but train.device=cpu; use parallel.backend=gloo "
                          "(or auto: nccl on GPUs, gloo on the CPU)")
        if m.attn_implementation in CUDA_ATTN_IMPLEMENTATIONS:
            errors.append(f"model.attn_implementation={m.attn_implementation} runs on CUDA GPUs only, but "
                          "train.device=cpu; use model.attn_implementation=sdpa (or eager)")
        if m.attn_implementation == "flex_attention":
            errors.append("model.attn_implementation=flex_attention trains on CUDA GPUs only (torch's FlexAttention "
                          "has no backward on the CPU), but train.device=cpu; use model.attn_implementation=sdpa")
    _positive(errors, "launcher.monitor_interval_s", cfg.launcher.monitor_interval_s)
    _positive(errors, "tracking.cpu_memory_steps", cfg.tracking.cpu_memory_steps, allow_zero=True)
    _positive(errors, "plan.epoch_sample_rows", cfg.plan.epoch_sample_rows, allow_zero=True)
    _check_signal(cfg, errors)


def _check_optimisation(cfg: Config, errors: list[str]) -> None:
    tr = cfg.train
    if tr.lr <= 0:
        errors.append(f"train.lr={tr.lr} must be > 0 (typical: 1e-5 full fine-tuning, 2e-4 LoRA)")
    if not 0 <= tr.min_lr_ratio <= 1:
        errors.append(f"train.min_lr_ratio={tr.min_lr_ratio} must be between 0 and 1")
    _positive(errors, "train.max_steps", tr.max_steps)
    _positive(errors, "train.warmup_steps", tr.warmup_steps, allow_zero=True)
    _positive(errors, "train.weight_decay", tr.weight_decay, allow_zero=True)
    _positive(errors, "train.grad_clip", tr.grad_clip, allow_zero=True)
    _positive(errors, "train.adam_eps", tr.adam_eps)
    _positive(errors, "train.eval_every", tr.eval_every, allow_zero=True)
    _positive(errors, "train.eval_max_batches", tr.eval_max_batches, allow_zero=True)
    _positive(errors, "train.log_every", tr.log_every)
    _positive(errors, "train.early_stopping_patience", tr.early_stopping_patience, allow_zero=True)
    _positive(errors, "train.early_stopping_min_delta", tr.early_stopping_min_delta, allow_zero=True)
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(tr, key) < 1:
            errors.append(f"train.{key}={getattr(tr, key)} must be in [0, 1)")
    _choice(errors, "train.optimizer", tr.optimizer, OPTIMIZERS)
    if tr.optimizer != "adamw" and _kind(cfg).bnb_refusal:
        # Both measured (EngineKind.bnb_refusal): FSDP2 hands the optimizer DTensor shards, which
        # bitsandbytes' kernels do not take ("got mixed torch.Tensor and DTensor"; no sharding
        # strategy registered); ZeRO hands it flat fp32 partitions and accepts it only as an
        # "untested" optimizer, its 8-bit blocks then span parameters, and DeepSpeed's universal
        # checkpoints reshard Adam's moments only.
        errors.append(
            f"train.optimizer={tr.optimizer} runs on parallel={_strategies(lambda k: not k.bnb_refusal)} only "
            f"({_kind(cfg).bnb_refusal}); use train.optimizer=adamw "
            f"with parallel={cfg.parallel.strategy} (its optimizer state is sharded already), or parallel=ddp"
        )
    # warmup_steps > max_steps is allowed: smoke runs (train.max_steps=5) ramp up and stop.
    if tr.early_stopping_patience > 0:
        if tr.eval_every == 0:
            errors.append(
                f"train.early_stopping_patience={tr.early_stopping_patience} needs evaluations during training; "
                "set train.eval_every > 0 or train.early_stopping_patience=0"
            )


def _check_batch(cfg: Config, errors: list[str]) -> None:
    """global = micro x ranks x accumulation, exactly: the same global batch on any world size."""
    tr = cfg.train
    _positive(errors, "train.micro_batch_size", tr.micro_batch_size)
    _positive(errors, "train.global_batch_size", tr.global_batch_size)
    _positive(errors, "launcher.nproc_per_node", cfg.launcher.nproc_per_node)
    _positive(errors, "launcher.nnodes", cfg.launcher.nnodes)
    if tr.micro_batch_size <= 0 or tr.global_batch_size <= 0:
        return
    ws = world_size(cfg)
    per_step = tr.micro_batch_size * ws
    if tr.global_batch_size % per_step == 0:
        return
    lower = max(per_step, tr.global_batch_size // per_step * per_step)
    fix = f"use a multiple of {per_step} (e.g. {lower} or {lower + per_step})"
    if tr.global_batch_size % ws == 0:
        per_rank = tr.global_batch_size // ws
        micro = [str(n) for n in range(1, per_rank + 1) if per_rank % n == 0][-4:]
        fix += f", or train.micro_batch_size={' or '.join(micro)}"
    errors.append(
        f"train.global_batch_size={tr.global_batch_size} is not divisible by "
        f"train.micro_batch_size x world size = {tr.micro_batch_size} x {ws} = {per_step}; {fix}"
    )


def _check_sequence_length(cfg: Config, errors: list[str], max_positions: int) -> None:
    d, t = cfg.data, cfg.technique
    _positive(errors, "data.max_seq_len", d.max_seq_len)
    if d.pack_strategy not in PACK_STRATEGIES:
        errors.append(f"data.pack_strategy={d.pack_strategy!r} is not one of {', '.join(PACK_STRATEGIES)}")
    # Prefix and prompt tuning put their virtual tokens at the first positions of every sequence.
    extra = t.num_virtual_tokens if _technique(cfg).virtual_tokens else 0
    if d.max_seq_len and max_positions > 0 and d.max_seq_len + extra > max_positions:
        what = f"data.max_seq_len={d.max_seq_len}" + (f" + technique.num_virtual_tokens={extra}" if extra else "")
        errors.append(
            f"{what} exceeds model.max_position_embeddings={max_positions} of model '{model_label(cfg.model)}'; "
            f"set data.max_seq_len <= {max_positions - extra}"
        )


def _check_data(cfg: Config, errors: list[str]) -> None:
    d = cfg.data
    errors += source_problems(d)
    if d.name == "mix" and not d.sources:  # else data=mix would train on the synthetic set without a word
        errors.append("data=mix needs data.sources, a list of one entry or more, such as 'data.sources=[{path: a.jsonl, "
                      f"weight: 3}}, {{path: b.csv}}]' (an entry's keys: {', '.join(SOURCE_KEYS)}); for one file "
                      "use data=jsonl|json|csv|parquet|hf_disk data.path=FILE")
    if d.source != "synthetic" and not d.path and not d.sources:
        errors.append(f"data.path is required for data.source={d.source!r} (a file, a directory for hf_disk, a dataset name for hub)")
    # (data.eval_path is read with synthetic training data too, as JSON Lines: data.py load_rows.)
    if d.source == "synthetic" and d.path:
        errors.append(f"data.path={d.path!r} is ignored by data.source=synthetic (the built-in data set); "
                      f"choose the file's reader, e.g. data={reader_for(d.path)} data.path={d.path}")
    # Every run scores the model on held-out rows before and after training: it needs an eval split.
    # An hf_disk dataset may bring its own (a validation or test split), which only loading can tell.
    # (Sources are read as their entries say; hf_disk ones may bring their own split.)
    readers = [reader_for(str(s.get("path", ""))) if isinstance(s, dict) else "" for s in d.sources]
    splits_itself = all(r == "hf_disk" for r in readers) if d.sources else d.source == "hf_disk"
    if not d.eval_path and (d.sources or d.source in DATA_SOURCES) and not splits_itself:
        if d.eval_size == 0:
            errors.append("data.eval_size=0 leaves no eval split, but every run scores the model on held-out rows "
                          "before and after training; use data.eval_size >= 1, or give data.eval_path")
        elif d.eval_size is None and d.eval_fraction == 0:
            errors.append("data.eval_fraction=0 leaves no eval split, but every run scores the model on held-out "
                          "rows before and after training; use a fraction in (0, 1) such as 0.05, data.eval_size=N, "
                          "or give data.eval_path")
    if d.source == "csv" and d.format == "chat":
        errors.append("data.format=chat needs a list of messages per row, which csv cannot hold; use jsonl or json")
    if d.eval_size is None and not 0 <= d.eval_fraction < 1:
        errors.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if d.eval_size is not None and d.eval_size < 0:
        errors.append(f"data.eval_size={d.eval_size} must be >= 1 (rows held out for evaluation)")
    _check_augment_functions(d.augment.functions, errors)
    if not 0 <= d.augment.template_variation <= 1:
        errors.append(f"data.augment.template_variation={d.augment.template_variation} must be in [0, 1]")
    if d.source == "synthetic" and d.synthetic.num_examples < 10:
        errors.append(f"data.synthetic.num_examples={d.synthetic.num_examples} must be >= 10")
    if d.cache_wait_s <= 0:
        errors.append(f"data.cache_wait_s={d.cache_wait_s} must be > 0 (seconds a rank waits for rank 0's data cache)")
    if d.num_proc < 0:
        errors.append(f"data.num_proc={d.num_proc} must be >= 0 (0: one tokenizing process per core for large data)")


def _check_augment_functions(specs: Any, errors: list[str]) -> None:
    """Each `data.augment.functions` entry must name an importable callable that can be called as
    AUGMENT_CALL with its keyword arguments: naming any callable is the feature, but one that
    cannot take a row (`os.system`, a module, a typo) is refused here, before the model loads.
    What the function then does with a row is checked when it runs (data.py augment())."""
    for i, spec in enumerate(specs or []):
        key = f"data.augment.functions[{i}]"
        if isinstance(spec, str):
            target, kwargs = spec, {}
        elif isinstance(spec, dict) and isinstance(spec.get("_target_"), str):
            kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
            target = spec["_target_"]
        else:
            errors.append(f"{key} has no _target_; write {{_target_: pkg.mod.fn, ...kwargs}} for a function {AUGMENT_CALL}")
            continue
        module_name, _, name = target.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            # `pkg.mod` names a module that its package has not imported: it is found, and refused below.
            fn = getattr(module, name) if hasattr(module, name) else importlib.import_module(target)
        except Exception as err:  # noqa: BLE001 - the user's module may fail to import in any way
            errors.append(f"{key}: _target_={target!r} cannot be imported ({type(err).__name__}: {_one_line(err)}); give the "
                          f"dotted path of a function {AUGMENT_CALL} in a module on the Python path")
            continue
        if not callable(fn):
            errors.append(f"{key}: _target_={target!r} is a {type(fn).__name__}, not a function {AUGMENT_CALL}")
            continue
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            errors.append(f"{key}: _target_={target!r} has no signature to check (a built-in); wrap it in a Python "
                          f"function {AUGMENT_CALL}")
            continue
        try:
            signature.bind(None, None, **kwargs)
        except TypeError as err:
            extra = f" and {', '.join(kwargs)}=" if kwargs else ""
            bare = signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                                     return_annotation=signature.empty)
            errors.append(f"{key}: {target}{bare} cannot be called with a row, an rng{extra} ({_one_line(err)}); "
                          f"give a function {AUGMENT_CALL}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] + "..." if len(text) > 200 else text


def _check_model(cfg: Config, errors: list[str]) -> None:
    m = cfg.model
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "rope_theta"):
        _positive(errors, f"model.{key}", getattr(m, key))
    _positive(errors, "model.initializer_range", m.initializer_range, allow_zero=True)
    _positive(errors, "model.num_key_value_heads", m.num_key_value_heads)
    if m.num_attention_heads <= 0 or (m.num_key_value_heads or 1) <= 0:
        return
    if m.num_key_value_heads and m.num_attention_heads % m.num_key_value_heads != 0:
        errors.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_key_value_heads={m.num_key_value_heads}"
        )
    if m.hidden_size % m.num_attention_heads != 0:
        errors.append(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    elif (m.hidden_size // m.num_attention_heads) % 2:
        errors.append(
            f"model.hidden_size / model.num_attention_heads = {m.hidden_size // m.num_attention_heads} is odd; "
            "rotary embeddings need an even head dimension"
        )
    if m.name_or_path is None and m.tokenizer is None and m.vocab_size < OFFLINE_TOKENIZER_VOCAB:
        errors.append(
            f"model.vocab_size={m.vocab_size} is smaller than the built-in offline tokenizer "
            f"({OFFLINE_TOKENIZER_VOCAB} tokens); set model.vocab_size >= {OFFLINE_TOKENIZER_VOCAB}"
        )
    if cfg.train.pure_bf16:
        where = []
        if not _technique(cfg).trains_all_weights:
            where.append(f"technique={cfg.technique.name} (its trained parameters are fp32 adapters; use technique=full)")
        if not _kind(cfg).fp32_master_weights:
            where.append(f"parallel={cfg.parallel.strategy} (DeepSpeed keeps fp32 master weights itself; use "
                         f"{_strategies(lambda k: k.fp32_master_weights, ', ', ' or ')})")
        if m.dtype not in ("auto", "bfloat16"):
            where.append(f"model.dtype={m.dtype} (pure bf16 builds the model in bfloat16; set model.dtype=bfloat16)")
        if where:
            errors.append("train.pure_bf16=true (bf16 weights and AdamW state, no fp32 masters) does not apply to "
                          + "; ".join(where))
    _check_fp16_weights(cfg, errors)


def _check_fp16_weights(cfg: Config, errors: list[str]) -> None:
    """`model.dtype=float16`: which (technique, train.precision) pairs train, and why the others
    are refused (one message each, naming the keys and the fix). Measured on the tiny model, single
    engine, CPU (tests/unit/test_fp16_matrix.py trains every supported pair and checks every refusal).

    - technique=full, every precision: refused. AdamW's eps (1e-8) is 0 in fp16, so the first
      update divides by zero (inf/NaN weights) where a ZeRO module or optimizer holds fp16 state;
      elsewhere the policy trains fp32 masters anyway (engines.weights_dtype), so fp16 is a mistake.
    - lora, dora, prefix, prompt: the frozen base stays fp16, the adapters or virtual tokens fp32.
      * train.precision=fp16: supported, the intended pairing (fp16 autocast with the loss scaler).
      * fp32: refused. No autocast and no loss scaler, so the base runs and back-propagates in
        fp16 unscaled. Measured on LoRA with the loss divided by 1000 (a 7B step holds ~1000x the
        target tokens of a tiny one, so its per-token gradients are that much smaller): 34% relative
        error in the adapter gradients, 3% of them flushed to zero; fp16 autocast with the scaler:
        9e-4. And the name would lie: nothing of the base computes in fp32.
      * bf16: refused. bf16 autocast rounds the fp16 weights to bf16 in every matmul (model.dtype=
        bfloat16 gives the same compute in the same memory, rounded once at load) and mixes fp16,
        bf16 and fp32 tensors; prefix and prompt tuning crash on it (torch.cat of the fp16 prefix
        with bf16 keys: "Unexpected floating ScalarType in at::autocast::prioritize").
      * auto: refused. It picks bf16 (bf16 GPUs) or fp32 (the CPU, older GPUs), never fp16, so it is
        one of the two cases above depending on the machine; fp16 weights must say fp16.
    - qlora, every precision: allowed here. PEFT's prepare_model_for_kbit_training casts every
      parameter that is not 4-bit to fp32, so no fp16 tensor is left to train or compute in; the
      4-bit matmuls compute in technique.compute_dtype whatever train.precision says. fp32, bf16
      and auto train finite on the CPU; train.precision=fp16 on the tiny CPU model is refused by
      the QLoRA rule in _check_technique (its one message), and on a GPU it trains in fp16 autocast.
    """
    m, t, precision = cfg.model, cfg.technique.name, cfg.train.precision
    if m.dtype != "float16":
        return
    if _technique(cfg).trains_all_weights:
        errors.append(
            "model.dtype=float16 with technique=full: fp16 cannot hold AdamW's state (its eps 1e-8 is 0 in fp16, so "
            "an update turns weights into inf/NaN); leave model.dtype=auto (full fine-tuning keeps fp32 master "
            "weights) with train.precision=fp16 for fp16 compute, or use model.dtype=bfloat16"
        )
        return
    if _technique(cfg).quantized_base or precision == "fp16":
        return
    why = {
        "fp32": "no autocast and no loss scaler, so the fp16 base computes and back-propagates in unscaled fp16 and "
                "small gradients flush to zero",
        "bf16": "bf16 autocast rounds the fp16 weights to bf16 in every matmul and mixes fp16 with bf16 tensors "
                "(prefix and prompt tuning fail on it)",
        "auto": "auto computes in bf16 or fp32 (by device), never in fp16; fp32 leaves the fp16 base without a loss "
                "scaler and bf16 rounds its weights to bf16 in every matmul",
    }.get(precision)
    if why is None:  # not a precision at all: _check_choices reports it
        return
    other = {"fp32": "model.dtype=float32 for fp32 compute", "bf16": "model.dtype=bfloat16 for bf16 compute (same "
             "memory)", "auto": "model.dtype=auto to let the device choose both"}[precision]
    errors.append(
        f"model.dtype=float16 with technique={t} and train.precision={precision}: {why}; set train.precision=fp16 "
        f"(fp16 autocast with a loss scaler, adapters in fp32), or {other}"
    )


def _check_objective(cfg: Config, errors: list[str]) -> None:
    o, d = cfg.objective, cfg.data
    _choice(errors, "objective.name", o.name, ("sft", "dpo"))
    if o.name != "dpo":
        return
    _choice(errors, "objective.loss", o.loss, OBJECTIVE_LOSSES)
    _choice(errors, "objective.reference", o.reference, OBJECTIVE_REFERENCES)
    if o.reference == "live" and not (_technique(cfg).adapter or _technique(cfg).virtual_tokens):
        errors.append(f"objective.reference=live with technique={cfg.technique.name}: the live reference is the "
                      "base with the adapter off, and full fine-tuning has no adapter to turn off (its reference "
                      "would be a second, frozen copy of the model); use objective.reference=precomputed")
    if not o.beta > 0:
        errors.append(f"objective.beta={o.beta} must be > 0 (0.1 is the DPO paper's; larger keeps the model nearer "
                      "its reference)")
    if d.augment.functions or d.augment.template_variation > 0:
        errors.append("objective=dpo with data.augment: augmentation functions and template variation rewrite "
                      "supervised rows, not preference pairs; drop data.augment.functions and set "
                      "data.augment.template_variation=0")


def _check_technique(cfg: Config, errors: list[str]) -> None:
    t, d, tr, p = cfg.technique, cfg.data, cfg.train, cfg.parallel
    trained = _technique(cfg)
    if trained.adapter:
        _positive(errors, "technique.r", t.r)
        _positive(errors, "technique.alpha", t.alpha)
        if not 0 <= t.dropout < 1:
            errors.append(f"technique.dropout={t.dropout} must be in [0, 1)")
        unknown = [name for name in t.target_modules if name not in LLAMA_LINEAR_MODULES]
        if not t.target_modules:
            errors.append(f"technique.target_modules is empty: {t.name} needs at least one linear layer name")
        elif unknown:
            errors.append(
                f"technique.target_modules: {', '.join(map(repr, unknown))} is not a linear layer of a LLaMA model; "
                f"choose from {', '.join(LLAMA_LINEAR_MODULES)}"
            )
    if tr.compile and _kind(cfg).compile_refusal:
        errors.append(f"train.compile=true does not work with parallel={p.strategy} ({_kind(cfg).compile_refusal}); "
                      f"use parallel={_strategies(lambda k: not k.compile_refusal and k.multi_rank, ', ', ' or ')}, "
                      "or set train.compile=false")
    if tr.compile and trained.compile_refusal:
        compiling = [k.name for k in TECHNIQUES.values() if k.family == trained.family and not k.compile_refusal]
        errors.append(f"train.compile=true does not work with technique={t.name}: {trained.compile_refusal}; set "
                      "train.compile=false" + (f" ({' or '.join(compiling)} tuning compiles)" if compiling else ""))
    if trained.virtual_tokens:
        _positive(errors, "technique.num_virtual_tokens", t.num_virtual_tokens)
        if d.packing:
            errors.append(
                f"data.packing=true does not work with technique={t.name}: its virtual tokens sit in front of "
                "every sequence, so packed samples would share them and see each other; set data.packing=false"
            )
        if tr.gradient_checkpointing:
            errors.append(
                f"train.gradient_checkpointing=true is not supported with technique={t.name}; set it to false"
            )
    # Settings that only one technique reads: set elsewhere they would be silently ignored.
    if t.prompt_init_text is not None and "prompt_init_text" not in trained.options:
        errors.append(f"technique.prompt_init_text is only used by technique=prompt or prefix (got {t.name}); remove it")
    if t.prefix_projection and "prefix_projection" not in trained.options:
        errors.append(f"technique.prefix_projection=true is only used by technique=prefix (got {t.name}); remove it")
    if trained.quantized_base:
        _choice(errors, "technique.quant_type", t.quant_type, QUANT_TYPES)
        _choice(errors, "technique.quant_storage", t.quant_storage, QUANT_STORAGES)
        _choice(errors, "technique.compute_dtype", t.compute_dtype, QUANT_DTYPES)
        if cfg.model.name_or_path is None and cfg.model.name == "tiny" and tr.precision == "fp16":
            errors.append("train.precision=fp16 with technique=qlora on the CPU is unsupported; use bf16 or fp32")
        if _kind(cfg).shards_weights:
            # Sharding flattens the 4-bit blocks together with the norms and embeddings, which
            # only works when both are stored in one floating dtype.
            if t.quant_storage == "uint8":
                errors.append(
                    f"technique.quant_storage=uint8 cannot be sharded by parallel={p.strategy}; "
                    "set technique.quant_storage=bfloat16 (the dtype of the other weights)"
                )
            elif cfg.model.dtype not in ("auto", t.quant_storage):
                errors.append(
                    f"technique.quant_storage={t.quant_storage} differs from model.dtype={cfg.model.dtype}, so "
                    f"parallel={p.strategy} cannot shard them together; make them the same"
                )


def _check_parallel(cfg: Config, errors: list[str], launch: bool = True) -> None:
    p, launcher, cluster = cfg.parallel, cfg.launcher, cfg.cluster
    ws = world_size(cfg)
    _positive(errors, "parallel.timeout_s", p.timeout_s)
    # The nodes meet at this address when the job starts; a plan of the job never starts it.
    if launch and launcher.kind == "local" and launcher.nnodes > 1 and not launcher.rdzv_endpoint:
        errors.append(
            f"launcher.nnodes={launcher.nnodes} needs launcher.rdzv_endpoint=HOST:PORT (an address of the first "
            "node that every node can reach); run the same command on every node"
        )
    kind = _kind(cfg)
    if not kind.multi_rank and ws > 1:
        errors.append(
            f"parallel={p.strategy} runs one process but the launcher asks for {ws}; "
            f"choose parallel={_strategies(lambda k: k.multi_rank)} or launcher.nproc_per_node=1"
        )
    # Engine options set for another engine would be silently ignored.
    deepspeed = _strategies(lambda k: k.deepspeed)
    for switch in ("deepspeed.offload_optimizer", "deepspeed.offload_param"):
        if getattr(p.deepspeed, switch.split(".")[1]) and switch not in kind.offload_switches:
            errors.append(f"parallel.{switch}=true needs parallel="
                          f"{_strategies(lambda k, switch=switch: switch in k.offload_switches)} (got {p.strategy})")
    if p.deepspeed.overrides and not kind.deepspeed:
        errors.append(f"parallel.deepspeed.overrides is only read by parallel={deepspeed} (got {p.strategy})")
    if kind.deepspeed:
        # DeepSpeed: its config is derived from ours (engines/deepspeed.py); overrides add to it.
        if cfg.train.precision == "fp16" and cfg.train.device == "cpu":
            errors.append(
                f"train.precision=fp16 with parallel={p.strategy} on train.device=cpu: DeepSpeed's CPU accelerator "
                "has no fp16; use train.precision=bf16 or fp32"
            )
        # Keys engines/deepspeed.py derives from ours, and the keys that set them (EngineKind.derived_keys).
        overrides = p.deepspeed.overrides or {}
        zero = overrides.get("zero_optimization") if isinstance(overrides.get("zero_optimization"), dict) else {}
        derived = {key: where for key, where in kind.derived_keys if _has_key(overrides, key)}
        for key, where in derived.items():
            errors.append(
                f"parallel.deepspeed.overrides.{key} is derived from the config; set {where} instead "
                "(one setting in one place)"
            )
        for key in ("offload_optimizer", "offload_param"):
            if key in zero and not getattr(p.deepspeed, key):
                errors.append(
                    f"parallel.deepspeed.overrides.zero_optimization.{key} needs parallel.deepspeed.{key}=true "
                    "(the override then refines it, e.g. pin_memory or an nvme device)"
                )
    if p.fsdp.cpu_offload and "fsdp.cpu_offload" not in kind.offload_switches:
        errors.append(f"parallel.fsdp.cpu_offload=true needs parallel="
                      f"{_strategies(lambda k: 'fsdp.cpu_offload' in k.offload_switches)} (got {p.strategy})")
    if p.fsdp.hybrid_shard and not kind.hybrid_shard:
        errors.append(f"parallel.fsdp.hybrid_shard=true needs parallel={_strategies(lambda k: k.hybrid_shard)} "
                      f"(got {p.strategy})")
    _positive(errors, "parallel.fsdp.shard_size", p.fsdp.shard_size, allow_zero=True)
    if p.fsdp.shard_size and not p.fsdp.hybrid_shard:
        errors.append(
            f"parallel.fsdp.shard_size={p.fsdp.shard_size} is only read with parallel.fsdp.hybrid_shard=true "
            "(full sharding spreads over all ranks); remove it or use parallel=fsdp_hybrid"
        )
    if kind.hybrid_shard and p.fsdp.hybrid_shard and p.fsdp.shard_size >= 0:
        # Hybrid sharding is a (replicate x shard) grid over all ranks: the shard groups must tile it.
        shard = p.fsdp.shard_size or launcher.nproc_per_node
        if shard > 0 and ws % shard:
            errors.append(
                f"parallel.fsdp.shard_size={shard}{' (launcher.nproc_per_node)' if not p.fsdp.shard_size else ''} "
                f"does not divide the world size {ws}; hybrid sharding needs shard groups that tile all ranks, "
                f"e.g. parallel.fsdp.shard_size={launcher.nproc_per_node}"
            )
    if cluster.gpus_per_node > 0 and launcher.nproc_per_node > cluster.gpus_per_node:
        errors.append(
            f"launcher.nproc_per_node={launcher.nproc_per_node} exceeds cluster.gpus_per_node={cluster.gpus_per_node} "
            f"of cluster '{cluster.name}'; use at most {cluster.gpus_per_node} (one process per GPU)"
        )
    if launcher.kind == "slurm":
        _check_slurm(cfg, errors)


def _check_slurm(cfg: Config, errors: list[str]) -> None:
    """What can be checked without the cluster; launchers/slurm.py asks the cluster the rest
    (partition, node count, time limit) before submitting."""
    launcher = cfg.launcher
    # Inside a job step (slurm/train.sbatch runs `srun python -m distft launcher=slurm ...`) the
    # time limit is the job's own, already granted: nothing is submitted from there.
    in_job_step = bool(os.environ.get("SLURM_STEP_ID"))
    if launcher.time_min is None and not in_job_step:
        errors.append("launcher=slurm needs a time limit: set launcher.time_min=MINUTES (e.g. launcher.time_min=240); "
                      "the job checkpoints and requeues itself before it runs out")
    elif launcher.time_min is not None:
        _positive(errors, "launcher.time_min", launcher.time_min)
        too_short = segment_problem(launcher.time_min, launcher.signal_delay_s)
        if too_short:
            errors.append(too_short)
    _positive(errors, "launcher.nodes", launcher.nodes)
    _positive(errors, "launcher.tasks_per_node", launcher.tasks_per_node)
    _positive(errors, "launcher.gpus_per_node", launcher.gpus_per_node, allow_zero=True)
    _positive(errors, "launcher.cpus_per_task", launcher.cpus_per_task)
    _positive(errors, "launcher.mem_gb", launcher.mem_gb, allow_zero=True)  # 0: the partition's default
    _positive(errors, "launcher.signal_delay_s", launcher.signal_delay_s)
    _positive(errors, "launcher.max_requeues", launcher.max_requeues, allow_zero=True)
    if launcher.gpus_per_node and launcher.tasks_per_node and launcher.tasks_per_node != launcher.gpus_per_node:
        errors.append(
            f"launcher.tasks_per_node={launcher.tasks_per_node} differs from launcher.gpus_per_node="
            f"{launcher.gpus_per_node}: distft runs one rank per GPU; drop tasks_per_node"
        )
    if cfg.cluster.gpus_per_node > 0 and launcher.gpus_per_node > cfg.cluster.gpus_per_node:
        errors.append(
            f"launcher.gpus_per_node={launcher.gpus_per_node} exceeds cluster.gpus_per_node="
            f"{cfg.cluster.gpus_per_node} of cluster '{cfg.cluster.name}'"
        )


# Signals a stop handler cannot use: uncatchable (KILL, STOP), Ctrl-C's (INT must still interrupt),
# and the ones a crash raises (a handler that only sets a flag returns into the faulting instruction).
_UNUSABLE_SIGNALS = {"KILL": "cannot be caught", "STOP": "cannot be caught", "INT": "is Ctrl-C, which must still interrupt",
                     **dict.fromkeys(("SEGV", "BUS", "FPE", "ILL"), "is raised by crashes")}


def _check_signal(cfg: Config, errors: list[str]) -> None:
    """launcher.signal asks every run (local or SLURM) to checkpoint and stop (distft/preemption.py)."""
    name = cfg.launcher.signal.upper().removeprefix("SIG")
    if "SIG" + name not in signal.Signals.__members__:
        errors.append(f"launcher.signal={cfg.launcher.signal!r} is not a signal name; use USR1, USR2 or TERM")
    elif name in _UNUSABLE_SIGNALS:
        errors.append(f"launcher.signal={cfg.launcher.signal} cannot ask the run to checkpoint: it "
                      f"{_UNUSABLE_SIGNALS[name]}; use USR1 or USR2")


def _check_tracking(cfg: Config, errors: list[str], launch: bool = True) -> None:
    """tracking.backends: known names, and (`launch`: this command starts the run) each one's
    package installed, so that a missing one is this message, not an ImportError once the model is
    built. W&B counts unless tracking.wandb.mode=disabled. A password in tracking.mlflow.tracking_uri
    would reach every config dump: it belongs in MLFLOW_TRACKING_PASSWORD."""
    import importlib.util
    from urllib.parse import urlsplit

    t = cfg.tracking
    for name in t.backends:
        if name not in TRACKING_BACKENDS:
            errors.append(f"tracking.backends: {name!r} is not one of: {', '.join(TRACKING_BACKENDS)}")
        elif launch and not (name == "wandb" and t.wandb.mode == "disabled"):
            module, extra = TRACKING_BACKENDS[name]
            if importlib.util.find_spec(module) is None:
                instead = " or set tracking.wandb.mode=disabled" if name == "wandb" else ""
                errors.append(f"tracking.backends includes {name}, but its Python package {module!r} is not installed "
                              f"here: pip install 'distft[{extra}]' (or drop {name} from tracking.backends{instead})")
    uri = t.mlflow.tracking_uri or ""
    try:
        password = urlsplit(uri).password
    except ValueError:  # a malformed netloc: MLflow says what is wrong with it
        password = None
    if password:
        errors.append("tracking.mlflow.tracking_uri holds a password, which would be written into every config dump: "
                      "give the URI without it and the password as MLFLOW_TRACKING_PASSWORD (the user as "
                      "MLFLOW_TRACKING_USERNAME) in the environment")


def _check_eval_and_run(cfg: Config, errors: list[str]) -> None:
    if cfg.eval.num_samples < 0:
        errors.append(f"eval.num_samples={cfg.eval.num_samples} must be >= 0")
    _positive(errors, "eval.max_new_tokens", cfg.eval.max_new_tokens)
    _positive(errors, "eval.batch_size", cfg.eval.batch_size)
    _positive(errors, "eval.report_samples", cfg.eval.report_samples, allow_zero=True)
    _positive(errors, "checkpoint.keep_last", cfg.checkpoint.keep_last, allow_zero=True)  # 0: keep all
    _positive(errors, "eval.overfit_evals", cfg.eval.overfit_evals, allow_zero=True)  # 0: never
    _positive(errors, "eval.general_max_tokens", cfg.eval.general_max_tokens)
    _positive(errors, "eval.general_warn", cfg.eval.general_warn, allow_zero=True)
    if cfg.eval.general_path and not os.path.isfile(corpus_file(cfg.eval.general_path)):
        errors.append(f"eval.general_path={cfg.eval.general_path} is not a file; point it at a text or JSON Lines "
                      "file of general text (the forgetting check), or builtin:general (the sample distft ships), or set "
                      "eval.general_path=null")
    if cfg.eval.lm_eval_tasks and _technique(cfg).virtual_tokens:
        errors.append(f"eval.lm_eval_tasks does not run on technique={cfg.technique.name}: lm-evaluation-harness "
                      "scores logits position by position, which the virtual tokens shift; leave eval.lm_eval_tasks "
                      "empty for it")
    if cfg.eval.lm_eval_tasks and _kind(cfg).shards_weights:
        errors.append(f"eval.lm_eval_tasks needs the whole model in one process, which parallel.strategy="
                      f"{cfg.parallel.strategy} shards: run the tasks after training with `python -m distft.evaluate "
                      "<run_dir>` (which loads it whole), and leave eval.lm_eval_tasks empty here")
    if cfg.eval.lm_eval_include_path and not os.path.isdir(os.path.expanduser(cfg.eval.lm_eval_include_path)):
        errors.append(f"eval.lm_eval_include_path={cfg.eval.lm_eval_include_path} is not a directory of "
                      "lm-evaluation-harness task YAMLs")
    if cfg.checkpoint.keep_best and not cfg.train.eval_every:
        errors.append("checkpoint.keep_best=true needs periodic evaluation to know the best step: set "
                      "train.eval_every (e.g. 100), or checkpoint.keep_best=false")
    _positive(errors, "checkpoint.save_every", cfg.checkpoint.save_every, allow_zero=True)
    if cfg.checkpoint.async_save and _kind(cfg).state_format != "dcp":
        errors.append(f"checkpoint.async_save=true needs parallel="
                      f"{_strategies(lambda k: k.state_format == 'dcp', ', ', ' or ')} (torch.distributed.checkpoint); "
                      f"DeepSpeed writes parallel={cfg.parallel.strategy} checkpoints synchronously: drop "
                      "checkpoint.async_save")
    # run.experiment names a directory under run.root: one plain path component.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", cfg.run.experiment) or ".." in cfg.run.experiment:
        errors.append(
            f"run.experiment={cfg.run.experiment!r} must be a plain name (letters, digits, _ . + -), "
            "it becomes a directory under run.root"
        )
