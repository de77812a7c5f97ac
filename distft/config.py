"""The configuration schema: one dataclass per Hydra group, every default, run identity.

Dataclasses are the schema and hold every default; the YAML files under `conf/` only choose and
override. Hydra composes a `DictConfig` against these classes (so a wrong type fails at compose
time), the entry point turns it into a typed `Config` with `to_config()`, and `validation.validate()` checks
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

from distft.model.pretrained import local_model

# technique.name's choices and what each is: distft/techniques/kinds.py (TECHNIQUES); parallel.strategy's:
# distft/engines/kinds.py (ENGINES).
DATA_SOURCES = ("synthetic", "jsonl", "json", "csv", "parquet", "hf_disk", "hub")
DATA_FORMATS = ("auto", "alpaca", "chat", "text")
TEMPLATES = ("alpaca", "alpaca_short", "chat", "plain")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")  # engines.build_optimizer
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 moments for tensors under this many elements (its default)
BNB_MIN_PAGED_SIZE = 100_000  # its paged optimizers page only tensors of at least this many elements
NONFINITE_POLICIES = ("skip", "halt")
WANDB_MODES = ("online", "offline", "disabled")
# tracking.backends' choices, each with the Python module it needs and the pip extra that installs it.
TRACKING_BACKENDS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard"),
                     "mlflow": ("mlflow", "mlflow")}
ON_BAD_ROWS = ("drop", "fail")
LAUNCHERS = ("local", "slurm")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")
QUANT_DTYPES = ("bfloat16", "float16", "float32")  # bitsandbytes 4-bit compute dtypes
QUANT_STORAGES = QUANT_DTYPES + ("uint8",)
BACKENDS = ("auto", "nccl", "gloo")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# Attention kernels that exist for CUDA GPUs only, and the module each needs (what transformers imports).
CUDA_ATTN_IMPLEMENTATIONS = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
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
    `config.json` wins over the architecture fields here, for training and for the planner
    when it is on local disk (the planner falls back to these fields, and says so).
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
    # Where a from-scratch base draws its random weights. cpu: in fp32, then cast, the same bits on
    # every machine (evaluation and export rebuild it). cuda: on the GPU, directly in model.dtype:
    # seconds instead of minutes for 7B+ shapes (the CPU's generator is serial), for benchmarks;
    # the same bits only on the same kind of GPU.
    init_device: str = "cpu"
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
    prompt_init_text: Optional[str] = None
    """The text the virtual tokens start as (repeated or cut to num_virtual_tokens): prompt tuning
    takes its token embeddings, prefix tuning its keys and values through the frozen base, so the
    untrained model is the base reading this text first. None: techniques.DEFAULT_INIT_TEXT for a
    pretrained model (model.name_or_path), PEFT's random init for one built from scratch; "":
    PEFT's random init always."""
    prefix_projection: bool = False
    """Prefix tuning through PEFT's MLP (embedding -> linear -> tanh -> linear); its last layer is
    solved so that it starts out giving the text's keys and values too."""


@dataclass
class DeepSpeedConfig:
    offload_optimizer: bool = False
    offload_param: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # any other DeepSpeed key, merged last


@dataclass
class FSDPConfig:
    """PyTorch FSDP2 (engines/fsdp.py): every decoder layer one unit, then the root."""

    reshard_after_forward: bool = True  # free gathered layers after forward (re-gather in backward)
    hybrid_shard: bool = False  # shard within groups of shard_size ranks, replicate across them (HSDP)
    shard_size: int = 0  # hybrid_shard: ranks per shard group; 0: the ranks of one node (nproc_per_node)
    cpu_offload: bool = False  # sharded params, grads and optimizer state in host memory


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
    """How ranks are started.

    `local`: this process when there is one rank, else launchers/local.py starts
    `nproc_per_node` rank processes here (in its process group, forwarding signals); with `nnodes` > 1 the same command runs on every node and
    meets at `rdzv_endpoint` (torchrun style, no SLURM needed).

    `slurm` (launchers/slurm.py): the command submits one job of `nodes` x `tasks_per_node` ranks
    through submitit and returns (`wait=true` follows it). `tasks_per_node` defaults to
    `gpus_per_node` (one rank per GPU), or 1 on CPU nodes; to_config() copies both into `nnodes` and
    `nproc_per_node`, which the rest of distft reads. The fields below `monitor_interval_s` are
    read by the SLURM launcher only.
    """

    name: str = "local"
    kind: str = "local"
    nnodes: int = 1
    nproc_per_node: int = 1
    rdzv_endpoint: Optional[str] = None  # host:port on the first node; needed when nnodes > 1
    monitor_interval_s: float = 0.5  # how often the agent checks its ranks (a dead rank ends the job)
    # --- SLURM ---
    nodes: Optional[int] = None  # null: nnodes
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None  # null: gpus_per_node, or 1 without GPUs
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None  # null: the cluster's default partition
    time_min: Optional[int] = None  # the job's time limit in minutes: required
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    mem_gb: Optional[float] = None  # per node; null: the partition's default
    exclusive: bool = False
    job_name: Optional[str] = None  # null: distft-<experiment>
    log_dir: Optional[str] = None  # null: <run dir>/slurm
    # SLURM sends `signal` `signal_delay_s` before the time limit; every rank then stops at the
    # next step boundary, a checkpoint is written and the job requeues itself, at most
    # `max_requeues` times (SLURM_RESTART_COUNT counts them); the requeued job resumes.
    signal: str = "USR2"
    signal_delay_s: int = 120
    max_requeues: int = 3
    wait: bool = False  # follow the job: stream rank 0's log, return its final state as exit code
    env: dict[str, str] = field(default_factory=dict)  # exported in every rank, e.g. GLOO_SOCKET_IFNAME
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load ...)
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # escape hatch: any other #SBATCH flag
    srun_args: list[str] = field(default_factory=list)  # escape hatch: extra srun flags


@dataclass
class ClusterConfig:
    """The hardware a job targets; the planner reads it, launchers size jobs from it."""

    name: str = "local"
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0
    # Host memory of one node (the planner's per-node check); 0: unknown, which for cluster=local
    # means this machine's own.
    cpu_memory_gb: float = 0.0
    partition: Optional[str] = None
    # Dense bf16 peak of one accelerator in TFLOP/s (A100 312, H100 SXM 989): the MFU denominator.
    # 0: unknown (the CPU), and MFU is not reported.
    peak_tflops: float = 0.0
    # Interconnect, for the planner's communication time: GB/s one GPU can send to its peers in
    # the node (NVLink/PCIe) and that one node can send to the others (InfiniBand/Ethernet; the
    # node's NICs together). 0: unknown, no communication estimate.
    interconnect: str = ""
    intra_node_gbps: float = 0.0
    inter_node_gbps: float = 0.0


@dataclass
class SyntheticDataConfig:
    """The embedded default: instruction tasks with exactly scorable answers (see synthetic.py)."""

    num_examples: int = 3000
    seed: int = 1234
    tasks: list[str] = field(default_factory=lambda: ["uppercase", "reverse", "add", "repeat", "sort_letters", "count"])


# How data.augment.functions are called on each training row (distft/data/pipeline.py augment()); the
# validation checks that each target can be called so before anything starts.
AUGMENT_CALL = "fn(row, rng, **kwargs) -> row | list[row] | None"


@dataclass
class AugmentConfig:
    """Augmentation of the training split only (never the eval split)."""

    template_variation: float = 0.0  # probability of rephrasing an Alpaca header/instruction wrapper
    functions: list[Any] = field(default_factory=list)  # Hydra `_target_` callables: row -> row | list[row] | None


PACK_STRATEGIES = ("best_fit", "in_order")  # distft/data/batching.py pack()


@dataclass
class DataConfig:
    name: str = "synthetic"
    source: str = "synthetic"
    # a file; for hf_disk a save_to_disk directory; for hub a Hugging Face Hub dataset name (or a
    # local dataset directory), read with datasets.load_dataset(path, hub_config, revision=hub_revision)
    path: Optional[str] = None
    hub_config: Optional[str] = None
    hub_revision: Optional[str] = None
    eval_path: Optional[str] = None
    format: str = "auto"
    template: str = "alpaca"
    # Conversations: null, the tokenizer's own chat template; headers, distft's ("### user:" /
    # "### assistant:", answers ended by eos; any tokenizer); or a Jinja template string.
    chat_template: Optional[str] = None
    # Tokens that end an answer, besides eos and the chat template's end-of-turn token: generation
    # stops at them, and the exported generation_config lists them (distft/data/templates.py stop_token_ids).
    stop_tokens: list[str] = field(default_factory=list)
    train_on_prompt: bool = False
    max_seq_len: int = 256
    packing: bool = True
    pack_strategy: str = "best_fit"  # best_fit (fewest pad tokens) | in_order (greedy, in the shuffled order)
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
    # The tokenized-data cache (distft/data/cache.py): rank 0 builds the samples once per content,
    # tokenizer and settings; every rank memory-maps them. cache_dir null: <run.root>/data-cache;
    # it must be on a filesystem every rank sees. cache_wait_s: how long the other ranks wait for it.
    # Several data sets mixed: [{path, weight, source, template, format, *_field, name}, ...]
    # (distft/data/sources.py SOURCE_KEYS); data.path unset then. Each epoch draws weight / sum(weights)
    # of its samples from each source (distft/data/batching.py mixed_order).
    sources: list = field(default_factory=list)
    cache: bool = True
    cache_dir: Optional[str] = None
    cache_wait_s: int = 7200
    num_proc: int = 0  # processes that tokenize a build; 0: one per core for large data, else 1


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks and accumulations
    micro_batch_size: int = 4  # sequences per forward pass on one rank
    # The schedule (engines.lr_lambda), as a multiplier of `lr` for optimizer step s (0-based):
    # warm-up (s + 1) / warmup_steps for s < warmup_steps, so the first step already trains at
    # lr / warmup_steps and step warmup_steps - 1 at the peak. Hugging Face's
    # get_*_schedule_with_warmup(num_warmup_steps=W) uses s / W: its first step runs at lr 0 and it
    # reaches the peak one step later; after warm-up the two agree. Then cosine or linear decay to
    # min_lr_ratio * lr at max_steps (Hugging Face decays to 0: train.min_lr_ratio=0), or constant.
    # The lr logged for a step (metrics.jsonl, progress, W&B) is the one that step applied.
    lr: float = 2e-3
    # AdamW, whichever implementation (engines.build_optimizer; README, "Optimizers"): adamw (torch;
    # fused kernel when the trained parameters are on a GPU), adamw_8bit (bitsandbytes: both
    # moments in 8 bits, block-wise quantised; tensors under 4096 elements keep fp32 moments),
    # paged_adamw_8bit / paged_adamw_32bit (bitsandbytes, moments in CUDA unified memory that pages
    # to host memory under pressure; on the CPU they run unpaged). bitsandbytes' choices run on
    # parallel=single/ddp only.
    optimizer: str = "adamw"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # the compute dtype; auto: bf16 on bf16 GPUs, fp32 on the CPU
    # Full fine-tuning keeps fp32 master weights and fp32 AdamW state on every engine and computes
    # in `precision` (engines.weights_dtype). pure_bf16=true (single/ddp/fsdp, technique=full):
    # weights, gradients and AdamW state in bf16 instead, half the model-state memory (8 bytes per
    # parameter, not 16), but updates below bf16's resolution (~1/256 of a weight) are lost, so small
    # learning rates train little. Warned about at start; the planner counts it.
    pure_bf16: bool = False
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (engines.compile.compile_layers): one graph, shared by all the
    # layers, built on the first step (seconds to a minute); the loss equals the eager one to float
    # rounding, the checkpoint and export are the same. Generation stays eager. Needs Triton on a
    # GPU, a C++ compiler on the CPU.
    compile: bool = False
    eval_every: int = 100  # 0: only before and after training
    eval_max_batches: int = 0  # 0: the whole eval split
    early_stopping_patience: int = 0  # evals without improvement before stopping; 0: off
    early_stopping_min_delta: float = 0.0
    log_every: int = 10
    device: str = "auto"  # auto: cuda when present, else cpu
    # A step whose loss or global grad norm is not finite (on any rank) is never applied. skip: go
    # on with the next batch (counted); halt: save a checkpoint and exit non-zero naming step and rank.
    nonfinite: str = "skip"
    max_nonfinite_steps: int = 20  # skip: halt anyway once more steps than this were skipped


@dataclass
class EvalConfig:
    num_samples: int = 64  # held-out prompts scored by generation (exact match, F1, ROUGE-L)
    max_new_tokens: int = 32
    batch_size: int = 16
    compare_base: bool = True
    report_samples: int = 8
    # The report calls out overfitting when the eval loss rose this many periodic evals in a row
    # while the train loss fell; 0: never.
    overfit_evals: int = 2
    # The forgetting check (distft/evaluation/forgetting.py): general text scored as perplexity before and
    # after, a warning when the tuned model's is more than general_warn (relative) above the base's.
    general_path: Optional[str] = None
    general_max_tokens: int = 100_000
    general_warn: float = 0.1
    # lm-evaluation-harness tasks run on the tuned model and its base (pip install 'distft[lm-eval]');
    # include_path: a directory of one's own task YAMLs; limit: examples per task (None: all).
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include_path: Optional[str] = None
    lm_eval_limit: Optional[int] = None


@dataclass
class CheckpointConfig:
    save_every: int = 0  # steps; 0: only the final checkpoint
    keep_last: int = 2  # committed checkpoints kept (the newest and the best are never deleted); 0: all
    # Save the checkpoint of each new best periodic eval loss, and make it the run's result: the
    # final report scores it, evaluate and export default to it. Early stopping does this by itself.
    keep_best: bool = False
    # DDP/FSDP: stage the sharded state in host memory and write it in a background thread while
    # training goes on (committed once written); costs one extra copy of the state in host memory.
    async_save: bool = False


@dataclass
class WandbConfig:
    mode: str = "online"  # without an API key, online falls back to offline
    project: str = "distft"
    entity: Optional[str] = None
    api_key: Optional[str] = None  # secret: prefer the WANDB_API_KEY environment variable
    tags: list[str] = field(default_factory=list)


@dataclass
class MlflowConfig:
    """Where the MLflow run goes (distft/tracking.py, tracking.backends=[mlflow])."""

    tracking_uri: Optional[str] = None
    """null: MLFLOW_TRACKING_URI from the environment when set, else a file store in the run
    directory (`<run dir>/mlruns`). A password goes in MLFLOW_TRACKING_PASSWORD, never here."""
    experiment: Optional[str] = None
    """The MLflow experiment; null: run.experiment (W&B's group)."""


@dataclass
class TrackingConfig:
    backends: list[str] = field(default_factory=lambda: ["wandb"])
    """Where metrics go besides metrics.jsonl: any of wandb, tensorboard, mlflow (TRACKING_BACKENDS).
    The default keeps W&B alone, as before the list existed; `tracking` is outside the run's
    identity (config_hash) and a resumable change, so adding or changing it moves no run directory."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    progress_bar: bool = True
    plot: bool = True
    # CPU runs: count tensor memory with torch's profiler from the model build through this many
    # optimizer steps (the peak the planner estimates; those steps run slower). 0: the process's
    # resident set only. GPU runs always count allocated CUDA memory, at no cost.
    cpu_memory_steps: int = 0


@dataclass
class RunConfig:
    experiment: str = "default"
    root: str = "outputs"
    dir: Optional[str] = None  # explicit run directory; null: <root>/<experiment>/<config hash>


@dataclass
class PlanConfig:
    """`python -m distft.plan` and the check launchers run before submitting (distft/plan/)."""

    format: str = "text"  # text | json
    margin: float = 0.10  # a plan fits when it needs at most (1 - margin) of a GPU's memory
    mfu: float = 0.40  # assumed model FLOPs utilisation for the tokens/s and time estimates
    overhead_gb: float = 1.0  # per GPU: CUDA context, allocator fragmentation, kernels' workspaces
    host_overhead_gb: float = 3.0  # host memory of one rank's process: torch, CUDA, libraries, data
    override: bool = False  # submit even when the plan says it does not fit
    # Time per epoch: the data is loaded, cleaned, templated and tokenized like a run does (the
    # model's tokenizer, local files only) on at most this many rows, and extrapolated beyond.
    epoch_sample_rows: int = 5000


OBJECTIVE_LOSSES = ("sigmoid", "ipo")  # objective.loss for dpo (distft/model/preference.py)
OBJECTIVE_REFERENCES = ("precomputed", "live")  # objective.reference for dpo (distft/objective.py)


@dataclass
class ObjectiveConfig:
    """What training optimises (conf/objective/): `sft`, the next-token loss on the answers
    (supervised fine-tuning, instruction tuning); `dpo`, preference tuning on {prompt, chosen,
    rejected} pairs (distft/model/preference.py, distft/data/preference.py)."""
    name: str = "sft"  # sft | dpo
    beta: float = 0.1  # dpo: how far the policy may move from the reference (the KL penalty's weight)
    loss: str = "sigmoid"  # dpo: sigmoid (the DPO paper) | ipo (Azar et al., per-token normalised)
    # dpo: where the reference's log-probs come from. precomputed: every training pair's, once
    # before the first step, kept in the run directory (no reference forward in a step; cheapest
    # when training sees each pair once or more). live: each micro-batch's, in its step, from the
    # base with the adapter off (adapter and virtual-token techniques only: no second model), for
    # runs that see a small part of a large pair set.
    reference: str = "precomputed"


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
    plan: PlanConfig = field(default_factory=PlanConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # Rerunning a command resumes its run directory from the newest complete checkpoint. false:
    # start over, after moving the old run directory aside (renamed, never deleted).
    resume: bool = True


def conf_dir() -> Path:
    """distft's Hydra config tree: `distft/conf` in an installed package, the repository's top-level
    `conf/` in a source checkout (distft/__init__.py, "Layout")."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parent / "conf"


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore as `distft_schema`, the first entry of
    conf/config.yaml's defaults: every YAML merged after it is checked against the dataclasses.

    Only the root is stored: one schema types every group, and per-group schema entries would
    show up as bogus choices (`model=model_schema`) in `--help` and in error messages. Stored once
    per process (storing converts the whole dataclass tree, ~20 ms, and preflight runs for every
    composition: the planner's advice composes several).
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if _SCHEMA_STORED.get("store") is store:
        return
    store.store(name="distft_schema", node=Config)
    _SCHEMA_STORED["store"] = store


_SCHEMA_STORED: dict = {}  # register_configs: the ConfigStore instance the schema went into


def to_config(cfg: Any) -> Config:
    """DictConfig (from Hydra) -> typed Config. Everything below the entry point takes a Config."""
    from omegaconf import OmegaConf

    if isinstance(cfg, Config):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    config = OmegaConf.to_object(merged)
    _size_slurm_job(config.launcher)
    # a .gguf file: its Hugging Face copy (made once); ~ expanded
    config.model.name_or_path = local_model(config.model.name_or_path)
    return config


def _size_slurm_job(launcher: LauncherConfig) -> None:
    """launcher=slurm speaks SLURM (nodes, tasks or GPUs per node); the rest of distft reads
    nnodes x nproc_per_node. Copy one into the other, so the world size, the run identity and
    the validation are the same whichever launcher starts the ranks."""
    if launcher.kind != "slurm":
        return
    if launcher.nodes is None:
        launcher.nodes = launcher.nnodes
    if launcher.tasks_per_node is None:
        launcher.tasks_per_node = launcher.gpus_per_node or launcher.nproc_per_node
    launcher.nnodes, launcher.nproc_per_node = launcher.nodes, launcher.tasks_per_node


def model_label(model: ModelConfig) -> str:
    """What logs, reports, summary.json and messages call the model: a local directory it loads
    from (the preset named by `model=` then only supplies defaults, so its name would be wrong),
    else the preset's name (a preset's own hub id, `huggyllama/llama-7b`, is what `llama_7b` means)."""
    path = model.name_or_path
    if path and (path.startswith(("/", "./", "../", "~")) or os.path.isdir(os.path.expanduser(path))):
        return path
    return model.name


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
_RUN_IDENTITY_EXCLUDED = ("tracking", "run", "launcher", "cluster", "eval", "checkpoint", "resume", "plan")


def config_hash(cfg: Config) -> str:
    data = {k: v for k, v in to_dict(cfg, redact=True).items() if k not in _RUN_IDENTITY_EXCLUDED}
    if data.get("objective", {}).get("name") == "sft":
        del data["objective"]  # supervised fine-tuning's runs keep the directories they had before objectives
    data["world_size"] = world_size(cfg)  # the data position in a checkpoint is per rank
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


def schema_fields(schema: type) -> dict[str, Any]:
    return {f.name: f for f in fields(schema)}
