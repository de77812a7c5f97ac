"""The configuration schema: one dataclass per Hydra group, every default, and `validate()`.

Dataclasses are the schema and hold every default; the YAML files under `conf/` only choose and
override. Hydra composes a `DictConfig` against these classes (so a wrong type fails at compose
time), the entry point turns it into a typed `Config` with `to_config()`, and `validate()` checks
the semantics, collecting *every* problem before anything is allocated or submitted.

This module imports no torch: the planner, the validator and the SLURM launcher use it on login
nodes where importing torch is slow or impossible.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
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

# Substrings of config keys whose values are secrets: they are replaced by REDACTED in every dump
# (run-dir config, logs, W&B config, checkpoints). Matching is on the key, so a new secret field
# is covered as long as its name says what it is.
SECRET_KEY_MARKERS = ("api_key", "token", "password", "secret")
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
    intermediate_size: int = 352
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


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "technique": TechniqueConfig,
    "parallel": ParallelConfig,
    "launcher": LauncherConfig,
    "cluster": ClusterConfig,
    "data": DataConfig,
}


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore so YAML files are checked against it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="distft_schema", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


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
    key = key.lower()
    return any(marker in key for marker in SECRET_KEY_MARKERS)


def redact_secrets(value: Any) -> Any:
    """Recursively replace the value of every secret-looking key (see SECRET_KEY_MARKERS)."""
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
    is known (a local checkpoint directory).
    """
    errors: list[str] = []
    m, t, d, tr, p = cfg.model, cfg.technique, cfg.data, cfg.train, cfg.parallel

    _choice(errors, "technique.name", t.name, TECHNIQUES)
    _choice(errors, "parallel.strategy", p.strategy, PARALLEL_STRATEGIES)
    _choice(errors, "data.source", d.source, DATA_SOURCES)
    _choice(errors, "data.format", d.format, DATA_FORMATS)
    _choice(errors, "data.template", d.template, TEMPLATES)
    _choice(errors, "data.on_bad_rows", d.on_bad_rows, ON_BAD_ROWS)
    _choice(errors, "train.precision", tr.precision, PRECISIONS)
    _choice(errors, "train.schedule", tr.schedule, SCHEDULES)
    _choice(errors, "tracking.wandb.mode", cfg.tracking.wandb.mode, WANDB_MODES)
    _choice(errors, "launcher.kind", cfg.launcher.kind, LAUNCHERS)
    _choice(errors, "model.dtype", m.dtype, MODEL_DTYPES)

    # Optimisation numbers.
    if tr.lr <= 0:
        errors.append(f"train.lr={tr.lr} must be > 0 (typical: 1e-5 full fine-tuning, 2e-4 LoRA)")
    if not 0 <= tr.min_lr_ratio <= 1:
        errors.append(f"train.min_lr_ratio={tr.min_lr_ratio} must be between 0 and 1")
    _positive(errors, "train.max_steps", tr.max_steps)
    _positive(errors, "train.warmup_steps", tr.warmup_steps, allow_zero=True)
    _positive(errors, "train.weight_decay", tr.weight_decay, allow_zero=True)
    _positive(errors, "train.grad_clip", tr.grad_clip, allow_zero=True)
    _positive(errors, "train.eval_every", tr.eval_every, allow_zero=True)
    _positive(errors, "train.log_every", tr.log_every)
    _positive(errors, "train.early_stopping_patience", tr.early_stopping_patience, allow_zero=True)
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(tr, key) < 1:
            errors.append(f"train.{key}={getattr(tr, key)} must be in [0, 1)")
    if tr.warmup_steps is not None and tr.max_steps and tr.warmup_steps > tr.max_steps:
        errors.append(f"train.warmup_steps={tr.warmup_steps} exceeds train.max_steps={tr.max_steps}")

    # Batch arithmetic: global = micro x ranks x accumulation, exactly.
    _positive(errors, "train.micro_batch_size", tr.micro_batch_size)
    _positive(errors, "train.global_batch_size", tr.global_batch_size)
    _positive(errors, "launcher.nproc_per_node", cfg.launcher.nproc_per_node)
    _positive(errors, "launcher.nnodes", cfg.launcher.nnodes)
    ws = world_size(cfg)
    if tr.micro_batch_size > 0 and tr.global_batch_size > 0:
        per_step = tr.micro_batch_size * ws
        if tr.global_batch_size % per_step != 0:
            lower = max(per_step, tr.global_batch_size // per_step * per_step)
            errors.append(
                f"train.global_batch_size={tr.global_batch_size} is not divisible by "
                f"train.micro_batch_size x world size = {tr.micro_batch_size} x {ws} = {per_step}; "
                f"use a multiple of {per_step} (e.g. {lower} or {lower + per_step})"
            )

    # Sequence length against the model's positions.
    _positive(errors, "data.max_seq_len", d.max_seq_len)
    max_positions = model_max_positions or m.max_position_embeddings
    extra = t.num_virtual_tokens if t.name in PROMPT_LEARNING_TECHNIQUES else 0
    if d.max_seq_len and d.max_seq_len + extra > max_positions:
        what = f"data.max_seq_len={d.max_seq_len}" + (f" + technique.num_virtual_tokens={extra}" if extra else "")
        errors.append(
            f"{what} exceeds model.max_position_embeddings={max_positions} of model '{m.name}'; "
            f"set data.max_seq_len <= {max_positions - extra}"
        )

    # Data.
    if d.source != "synthetic" and not d.path:
        errors.append(f"data.path is required for data.source={d.source!r} (a file, or a directory for hf_disk)")
    if d.eval_size is None and not 0 <= d.eval_fraction < 1:
        errors.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if d.eval_size is not None and d.eval_size < 0:
        errors.append(f"data.eval_size={d.eval_size} must be >= 0")
    if not 0 <= d.augment.template_variation <= 1:
        errors.append(f"data.augment.template_variation={d.augment.template_variation} must be in [0, 1]")
    if d.source == "synthetic" and d.synthetic.num_examples < 10:
        errors.append(f"data.synthetic.num_examples={d.synthetic.num_examples} must be >= 10")

    # Technique/model combinations.
    if t.name in ADAPTER_TECHNIQUES + PROMPT_LEARNING_TECHNIQUES:
        _positive(errors, "technique.r", t.r)
        _positive(errors, "technique.num_virtual_tokens", t.num_virtual_tokens)
        if t.name in ADAPTER_TECHNIQUES and not t.target_modules:
            errors.append(f"technique.target_modules is empty: {t.name} needs at least one linear layer name")
        if not 0 <= t.dropout < 1:
            errors.append(f"technique.dropout={t.dropout} must be in [0, 1)")
    if t.name in PROMPT_LEARNING_TECHNIQUES and d.packing:
        errors.append(
            f"data.packing=true does not work with technique={t.name}: its virtual tokens sit in front of "
            "every sequence, so packed samples would share them and see each other; set data.packing=false"
        )
    if t.name in PROMPT_LEARNING_TECHNIQUES and tr.gradient_checkpointing:
        errors.append(f"train.gradient_checkpointing=true is not supported with technique={t.name}; set it to false")
    if t.name == "qlora":
        _choice(errors, "technique.quant_type", t.quant_type, ("nf4", "fp4"))
        _choice(errors, "technique.quant_storage", t.quant_storage, ("bfloat16", "float16", "float32", "uint8"))
        _choice(errors, "technique.compute_dtype", t.compute_dtype, ("bfloat16", "float16", "float32"))
        if m.name_or_path is None and m.name == "tiny" and tr.precision == "fp16":
            errors.append("train.precision=fp16 with technique=qlora on the CPU is unsupported; use bf16 or fp32")
    if t.name == "full" and m.dtype in ("float16",) and tr.precision != "fp32":
        errors.append("model.dtype=float16 with technique=full trains fp16 master weights; use bfloat16 or float32")
    if m.num_key_value_heads and m.num_attention_heads % m.num_key_value_heads != 0:
        errors.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_key_value_heads={m.num_key_value_heads}"
        )
    if m.hidden_size % max(1, m.num_attention_heads) != 0:
        errors.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")

    # Parallelism that this build can run (engines land strategy by strategy).
    if p.strategy == "single" and ws > 1:
        errors.append(
            f"parallel=single runs one process but the launcher asks for {ws}; "
            "choose parallel=ddp|zero1|zero2|zero3|fsdp or launcher.nproc_per_node=1"
        )
    if cfg.eval.num_samples < 0:
        errors.append(f"eval.num_samples={cfg.eval.num_samples} must be >= 0")
    _positive(errors, "eval.max_new_tokens", cfg.eval.max_new_tokens)
    _positive(errors, "eval.batch_size", cfg.eval.batch_size)
    _positive(errors, "checkpoint.keep_last", cfg.checkpoint.keep_last)
    return errors


def schema_fields(schema: type) -> dict[str, Any]:
    return {f.name: f for f in fields(schema)}
