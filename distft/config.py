"""The configuration schema: one dataclass per Hydra group, every default, and `validate()`.

Dataclasses are the schema and hold every default; the YAML files under `conf/` only choose and
override. Hydra composes a `DictConfig` against these classes (so a wrong type fails at compose
time), the entry point turns it into a typed `Config` with `to_config()`, and `validate()` checks
the semantics, collecting *every* problem before anything is allocated or submitted.
`distft/preflight.py` drives both for a command line (Hydra stops at the first bad override;
preflight reports them all), so users see one list of one-line messages and no traceback.

This module imports no torch: the planner, the validator and the SLURM launcher use it on login
nodes where importing torch is slow or impossible.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

TECHNIQUES = ("full", "lora", "qlora", "dora", "prefix", "prompt")
ADAPTER_TECHNIQUES = ("lora", "qlora", "dora")  # adapters that live inside the linear layers
PROMPT_LEARNING_TECHNIQUES = ("prefix", "prompt")  # virtual tokens in front of the sequence
PARALLEL_STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp")
DATA_SOURCES = ("synthetic", "jsonl", "json", "csv", "parquet", "hf_disk")
DATA_FORMATS = ("auto", "alpaca", "chat", "text")
TEMPLATES = ("alpaca", "alpaca_short", "chat", "plain")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("online", "offline", "disabled")
ON_BAD_ROWS = ("drop", "fail")
LAUNCHERS = ("local", "slurm")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")
QUANT_DTYPES = ("bfloat16", "float16", "float32")  # bitsandbytes 4-bit compute dtypes
QUANT_STORAGES = QUANT_DTYPES + ("uint8",)
BACKENDS = ("auto", "nccl", "gloo")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# The nn.Linear layers of a LLaMA decoder (attention, then MLP) plus the output head: the only
# names LoRA/QLoRA/DoRA can target in this model family.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# Tokens of model.build_offline_tokenizer() (4 specials + 95 printable ASCII + newline + tab): a
# from-scratch model without its own tokenizer needs at least this many embeddings.
OFFLINE_TOKENIZER_VOCAB = 101

# Config keys whose values are secrets: they are replaced by REDACTED in every dump (run-dir
# config, logs, W&B config, checkpoints). Matching is on the key, so a new secret field is covered
# as long as its name says what it is; conversely, do not name a non-secret field *_token.
SECRET_KEY_MARKERS = ("api_key", "apikey", "access_key", "private_key", "password", "passwd", "secret")
SECRET_KEY_WORDS = ("credential", "credentials")  # whole words of a key, like any word ending in "token"
REDACTED = "***REDACTED***"


@dataclass
class ModelConfig:
    """A LLaMA-family architecture and where its weights come from.

    `name_or_path` null means: build the architecture below from scratch with `init_seed` (the
    tiny preset, benchmarks of big shapes). Otherwise it is a local directory or a hub id whose
    `config.json` wins over the architecture fields here (which still drive the planner).
    """

    name: str = "tiny"
    name_or_path: Optional[str] = None
    tokenizer: Optional[str] = None  # null: the model's own, or distft's built-in offline tokenizer
    vocab_size: int = 128
    hidden_size: int = 128
    intermediate_size: int = 384  # a multiple of 64: bitsandbytes 4-bit blocks on the CPU need it
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # null: same as num_attention_heads (no GQA)
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    init_seed: int = 0
    initializer_range: float = 0.02
    dtype: str = "auto"  # dtype of the loaded weights; auto: bf16 on a bf16 GPU, else fp32
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class TechniqueConfig:
    """What is trained: all weights, a PEFT adapter, or virtual tokens."""

    name: str = "full"
    # LoRA / DoRA / QLoRA
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # QLoRA (bitsandbytes 4-bit)
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "bfloat16"  # same dtype as the unquantised params so FSDP/ZeRO-3 can shard it
    # prefix / prompt tuning
    num_virtual_tokens: int = 16
    prompt_init_text: Optional[str] = None  # prompt tuning: initialise the virtual tokens from this text
    prefix_projection: bool = False


@dataclass
class DeepSpeedConfig:
    offload_optimizer: bool = False
    offload_param: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # any other DeepSpeed key, merged last


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = True
    hybrid_shard: bool = False
    cpu_offload: bool = False


@dataclass
class ParallelConfig:
    """How the model is spread over ranks. `single` is one process; the others live in engines/."""

    name: str = "single"
    strategy: str = "single"
    backend: str = "auto"  # auto: nccl with GPUs, gloo on the CPU
    timeout_s: int = 600
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class LauncherConfig:
    name: str = "local"
    kind: str = "local"
    nnodes: int = 1
    nproc_per_node: int = 1


@dataclass
class ClusterConfig:
    """The hardware a job targets; the planner reads it, launchers size jobs from it."""

    name: str = "local"
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0
    cpu_memory_gb: float = 24.0
    partition: Optional[str] = None


@dataclass
class SyntheticDataConfig:
    """The embedded default: instruction tasks with exactly scorable answers (see synthetic.py)."""

    num_examples: int = 3000
    seed: int = 1234
    tasks: list[str] = field(default_factory=lambda: ["uppercase", "reverse", "add", "repeat", "sort_letters", "count"])


@dataclass
class AugmentConfig:
    """Augmentation of the training split only (never the eval split)."""

    template_variation: float = 0.0  # probability of rephrasing an Alpaca header/instruction wrapper
    functions: list[Any] = field(default_factory=list)  # Hydra `_target_` callables: row -> row | list[row] | None


@dataclass
class DataConfig:
    name: str = "synthetic"
    source: str = "synthetic"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    format: str = "auto"
    template: str = "alpaca"
    train_on_prompt: bool = False
    max_seq_len: int = 256
    packing: bool = True
    eval_fraction: float = 0.05
    eval_size: Optional[int] = None  # wins over eval_fraction when set
    on_bad_rows: str = "drop"
    drop_overlong: bool = True  # false: truncate over-long rows instead of dropping them
    shuffle: bool = True
    seed: int = 0
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    text_field: str = "text"
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks and accumulations
    micro_batch_size: int = 4  # sequences per forward pass on one rank
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"
    gradient_checkpointing: bool = False
    eval_every: int = 100  # 0: only before and after training
    eval_max_batches: int = 0  # 0: the whole eval split
    early_stopping_patience: int = 0  # evals without improvement before stopping; 0: off
    early_stopping_min_delta: float = 0.0
    log_every: int = 10
    device: str = "auto"  # auto: cuda when present, else cpu


@dataclass
class EvalConfig:
    num_samples: int = 64  # held-out prompts scored by generation (exact match, F1, ROUGE-L)
    max_new_tokens: int = 32
    batch_size: int = 16
    compare_base: bool = True
    report_samples: int = 8


@dataclass
class CheckpointConfig:
    save_every: int = 0  # steps; 0: only the final checkpoint
    keep_last: int = 2


@dataclass
class WandbConfig:
    mode: str = "online"  # without an API key, online falls back to offline
    project: str = "distft"
    entity: Optional[str] = None
    api_key: Optional[str] = None  # secret: prefer the WANDB_API_KEY environment variable
    tags: list[str] = field(default_factory=list)


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    plot: bool = True


@dataclass
class RunConfig:
    experiment: str = "default"
    root: str = "outputs"
    dir: Optional[str] = None  # explicit run directory; null: <root>/<experiment>/<config hash>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    technique: TechniqueConfig = field(default_factory=TechniqueConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def conf_dir() -> Path:
    """The repository's Hydra config tree (`conf/`), found relative to this package."""
    return Path(__file__).resolve().parent.parent / "conf"


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore as `distft_schema`, the first entry of
    conf/config.yaml's defaults: every YAML merged after it is checked against the dataclasses.

    Only the root is stored: one schema types every group, and per-group schema entries would
    show up as bogus choices (`model=model_schema`) in `--help` and in error messages.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="distft_schema", node=Config)


def to_config(cfg: Any) -> Config:
    """DictConfig (from Hydra) -> typed Config. Everything below the entry point takes a Config."""
    from omegaconf import OmegaConf

    if isinstance(cfg, Config):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return OmegaConf.to_object(merged)


def to_dict(cfg: Config, redact: bool = True) -> dict:
    """Plain dict of a Config, with secrets replaced by REDACTED unless redact=False."""
    data = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return redact_secrets(data) if redact else data


def is_secret_key(key: str) -> bool:
    """True for keys such as api_key, hf_token, HF_TOKEN, db_password, client_secret, apiKey.

    Words, not substrings: `tokenizer`, `max_new_tokens` and `num_virtual_tokens` are settings
    that must stay visible (and count in the run hash).
    """
    key = key.lower()
    words = re.split(r"[^a-z0-9]+", key)
    return any(marker in key for marker in SECRET_KEY_MARKERS) or any(
        word in SECRET_KEY_WORDS or word.endswith("token") for word in words
    )


def redact_secrets(value: Any) -> Any:
    """Recursively replace the value of every secret-looking key (see is_secret_key)."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact_secrets(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    return value


# Keys that do not change what is trained, so they do not change the run directory: rerunning
# with a different logger or launcher must resume the same run, not start a new one.
_RUN_IDENTITY_EXCLUDED = ("tracking", "run", "launcher", "cluster", "eval")


def config_hash(cfg: Config) -> str:
    data = {k: v for k, v in to_dict(cfg, redact=True).items() if k not in _RUN_IDENTITY_EXCLUDED}
    payload = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def run_dir(cfg: Config) -> str:
    """Deterministic run directory: the same experiment and config always map to the same path."""
    if cfg.run.dir:
        return os.path.abspath(os.path.expanduser(cfg.run.dir))
    root = os.path.abspath(os.path.expanduser(cfg.run.root))
    return os.path.join(root, cfg.run.experiment, config_hash(cfg))


def world_size(cfg: Config) -> int:
    return max(1, cfg.launcher.nnodes) * max(1, cfg.launcher.nproc_per_node)


def grad_accum_steps(cfg: Config) -> int:
    """Micro-batches per rank per optimizer step (validate() guarantees this divides exactly)."""
    per_step = cfg.train.micro_batch_size * world_size(cfg)
    return max(1, cfg.train.global_batch_size // max(1, per_step))


def _choice(errors: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")


def _positive(errors: list[str], key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        errors.append(f"{key}={value} must be {bound}")


def validate(cfg: Config, model_max_positions: Optional[int] = None) -> list[str]:
    """Every semantic problem in `cfg`, each naming the key, what is allowed and how to fix it.

    Returns an empty list when the config is good. Never raises for user errors: the caller prints
    the whole list at once. `model_max_positions` overrides the preset's when the real model config
    is known (a local checkpoint directory). One function per section, each appending one-line
    messages, so a new rule lands next to its neighbours.
    """
    errors: list[str] = []
    _check_choices(cfg, errors)
    _check_optimisation(cfg, errors)
    _check_batch(cfg, errors)
    _check_sequence_length(cfg, errors, model_max_positions or cfg.model.max_position_embeddings)
    _check_data(cfg, errors)
    _check_model(cfg, errors)
    _check_technique(cfg, errors)
    _check_parallel(cfg, errors)
    _check_eval_and_run(cfg, errors)
    return errors


def _check_choices(cfg: Config, errors: list[str]) -> None:
    m, t, d, tr, p = cfg.model, cfg.technique, cfg.data, cfg.train, cfg.parallel
    _choice(errors, "technique.name", t.name, TECHNIQUES)
    _choice(errors, "parallel.strategy", p.strategy, PARALLEL_STRATEGIES)
    _choice(errors, "parallel.backend", p.backend, BACKENDS)
    _choice(errors, "data.source", d.source, DATA_SOURCES)
    _choice(errors, "data.format", d.format, DATA_FORMATS)
    _choice(errors, "data.template", d.template, TEMPLATES)
    _choice(errors, "data.on_bad_rows", d.on_bad_rows, ON_BAD_ROWS)
    _choice(errors, "train.precision", tr.precision, PRECISIONS)
    _choice(errors, "train.schedule", tr.schedule, SCHEDULES)
    _choice(errors, "tracking.wandb.mode", cfg.tracking.wandb.mode, WANDB_MODES)
    _choice(errors, "launcher.kind", cfg.launcher.kind, LAUNCHERS)
    _choice(errors, "model.dtype", m.dtype, MODEL_DTYPES)
    if m.attn_implementation not in ATTN_IMPLEMENTATIONS and "/" not in m.attn_implementation:
        errors.append(
            f"model.attn_implementation={m.attn_implementation!r} is not one of: {', '.join(ATTN_IMPLEMENTATIONS)} "
            "(or a hub kernel such as kernels-community/flash-attn)"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", tr.device):
        errors.append(f"train.device={tr.device!r} is not one of: auto, cpu, cuda, cuda:N")


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
    # warmup_steps > max_steps is allowed: smoke runs (train.max_steps=5) ramp up and stop.
    if tr.early_stopping_patience > 0:
        if tr.eval_every == 0:
            errors.append(
                f"train.early_stopping_patience={tr.early_stopping_patience} needs evaluations during training; "
                "set train.eval_every > 0 or train.early_stopping_patience=0"
            )
        d = cfg.data
        if d.eval_size == 0 or (d.eval_size is None and d.eval_fraction == 0 and not d.eval_path):
            errors.append(
                "train.early_stopping_patience > 0 needs an eval split; set data.eval_fraction, "
                "data.eval_size or data.eval_path"
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
    # Prefix and prompt tuning put their virtual tokens at the first positions of every sequence.
    extra = t.num_virtual_tokens if t.name in PROMPT_LEARNING_TECHNIQUES else 0
    if d.max_seq_len and d.max_seq_len + extra > max_positions:
        what = f"data.max_seq_len={d.max_seq_len}" + (f" + technique.num_virtual_tokens={extra}" if extra else "")
        errors.append(
            f"{what} exceeds model.max_position_embeddings={max_positions} of model '{cfg.model.name}'; "
            f"set data.max_seq_len <= {max_positions - extra}"
        )


def _check_data(cfg: Config, errors: list[str]) -> None:
    d = cfg.data
    if d.source != "synthetic" and not d.path:
        errors.append(f"data.path is required for data.source={d.source!r} (a file, or a directory for hf_disk)")
    if d.source == "csv" and d.format == "chat":
        errors.append("data.format=chat needs a list of messages per row, which csv cannot hold; use jsonl or json")
    if d.eval_size is None and not 0 <= d.eval_fraction < 1:
        errors.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if d.eval_size is not None and d.eval_size < 0:
        errors.append(f"data.eval_size={d.eval_size} must be >= 0")
    if not 0 <= d.augment.template_variation <= 1:
        errors.append(f"data.augment.template_variation={d.augment.template_variation} must be in [0, 1]")
    if d.source == "synthetic" and d.synthetic.num_examples < 10:
        errors.append(f"data.synthetic.num_examples={d.synthetic.num_examples} must be >= 10")


def _check_model(cfg: Config, errors: list[str]) -> None:
    m = cfg.model
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _positive(errors, f"model.{key}", getattr(m, key))
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
    if cfg.technique.name == "full" and m.dtype == "float16" and cfg.train.precision != "fp32":
        errors.append("model.dtype=float16 with technique=full trains fp16 master weights; use bfloat16 or float32")


def _check_technique(cfg: Config, errors: list[str]) -> None:
    t, d, tr, p = cfg.technique, cfg.data, cfg.train, cfg.parallel
    if t.name in ADAPTER_TECHNIQUES:
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
    if t.name in PROMPT_LEARNING_TECHNIQUES:
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
    if t.prompt_init_text is not None and t.name != "prompt":
        errors.append(f"technique.prompt_init_text is only used by technique=prompt (got {t.name}); remove it")
    if t.prefix_projection and t.name != "prefix":
        errors.append(f"technique.prefix_projection=true is only used by technique=prefix (got {t.name}); remove it")
    if t.name == "qlora":
        _choice(errors, "technique.quant_type", t.quant_type, QUANT_TYPES)
        _choice(errors, "technique.quant_storage", t.quant_storage, QUANT_STORAGES)
        _choice(errors, "technique.compute_dtype", t.compute_dtype, QUANT_DTYPES)
        if cfg.model.name_or_path is None and cfg.model.name == "tiny" and tr.precision == "fp16":
            errors.append("train.precision=fp16 with technique=qlora on the CPU is unsupported; use bf16 or fp32")
        if p.strategy in ("zero3", "fsdp"):
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


def _check_parallel(cfg: Config, errors: list[str]) -> None:
    p, launcher, cluster = cfg.parallel, cfg.launcher, cfg.cluster
    ws = world_size(cfg)
    _positive(errors, "parallel.timeout_s", p.timeout_s)
    if p.strategy == "single" and ws > 1:
        errors.append(
            f"parallel=single runs one process but the launcher asks for {ws}; "
            "choose parallel=ddp|zero1|zero2|zero3|fsdp or launcher.nproc_per_node=1"
        )
    # Engine options set for another engine would be silently ignored.
    if p.deepspeed.offload_optimizer and p.strategy not in ("zero1", "zero2", "zero3"):
        errors.append(f"parallel.deepspeed.offload_optimizer=true needs parallel=zero1|zero2|zero3 (got {p.strategy})")
    if p.deepspeed.offload_param and p.strategy != "zero3":
        errors.append(f"parallel.deepspeed.offload_param=true needs parallel=zero3 (got {p.strategy})")
    if p.deepspeed.overrides and p.strategy not in ("zero1", "zero2", "zero3"):
        errors.append(f"parallel.deepspeed.overrides is only read by parallel=zero1|zero2|zero3 (got {p.strategy})")
    for key in ("cpu_offload", "hybrid_shard"):
        if getattr(p.fsdp, key) and p.strategy != "fsdp":
            errors.append(f"parallel.fsdp.{key}=true needs parallel=fsdp (got {p.strategy})")
    if cluster.gpus_per_node > 0 and launcher.nproc_per_node > cluster.gpus_per_node:
        errors.append(
            f"launcher.nproc_per_node={launcher.nproc_per_node} exceeds cluster.gpus_per_node={cluster.gpus_per_node} "
            f"of cluster '{cluster.name}'; use at most {cluster.gpus_per_node} (one process per GPU)"
        )


def _check_eval_and_run(cfg: Config, errors: list[str]) -> None:
    if cfg.eval.num_samples < 0:
        errors.append(f"eval.num_samples={cfg.eval.num_samples} must be >= 0")
    _positive(errors, "eval.max_new_tokens", cfg.eval.max_new_tokens)
    _positive(errors, "eval.batch_size", cfg.eval.batch_size)
    _positive(errors, "eval.report_samples", cfg.eval.report_samples, allow_zero=True)
    _positive(errors, "checkpoint.keep_last", cfg.checkpoint.keep_last)
    _positive(errors, "checkpoint.save_every", cfg.checkpoint.save_every, allow_zero=True)
    # run.experiment names a directory under run.root: one plain path component.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", cfg.run.experiment) or ".." in cfg.run.experiment:
        errors.append(
            f"run.experiment={cfg.run.experiment!r} must be a plain name (letters, digits, _ . + -), "
            "it becomes a directory under run.root"
        )


def schema_fields(schema: type) -> dict[str, Any]:
    return {f.name: f for f in fields(schema)}
