"""What each `parallel.strategy` is, for the code outside its engine module: one row per strategy.

A row (`EngineKind`) says where the engine lives (module, class), what it shards over the ranks
(optimizer state, gradients, weights), which offload switches it reads and what each moves to host
memory, its data-parallel collectives per step, how it builds the model, what its checkpoints
hold, what it refuses (bitsandbytes' optimizers, torch.compile), its rung on the planner's advice
ladder, and for DeepSpeed its ZeRO stage and the config keys its builder derives from ours.

Validation, the planner (memory, timing, advice), the precision policy, checkpoints and the model
build read a strategy's `EngineKind`, never its name (tests/unit/test_layout.py checks that no
module outside distft/engines/ and distft/techniques/ compares one).

Adding an engine = one row here + its module (distft/engines/<module>.py, the class the row
names; build_engine imports it) + one conf/parallel/<strategy>.yaml (tests/unit/test_config.py and
test_layout.py check that they agree).

Imports nothing of distft (and no torch): every module can read it, on a login node too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

# What an offload switch moves to host memory: the model's weights, its gradients, the optimizer
# state (DeepSpeed's: its fp32 master weights, gradient partitions and Adam moments).
STATE_PARTS = ("weights", "grads", "optimizer")


@dataclass(frozen=True)
class EngineKind:
    """What one `parallel.strategy` is."""

    strategy: str
    module: str  # distft.engines.<module> defines the engine class
    engine_class: str
    # DeepSpeed's ZeRO stage (what it partitions: 1 optimizer state, 2 and gradients, 3 and
    # weights; DeepSpeed keeps fp32 master weights and the optimizer state itself); None: a torch engine.
    zero_stage: Optional[int]
    multi_rank: bool  # runs on several ranks (single: one process)
    shards_weights: bool  # each rank holds a part of the weights between steps (ZeRO-3, FSDP)
    # Built on the meta device on several ranks and filled from rank 0 (build_model_for_engine).
    meta_build: bool
    # What a checkpoint's state/ holds, and so which strategies resume it: "dcp" (torch's
    # distributed checkpoint: tensors by parameter name, any torch engine, any rank count) or
    # DeepSpeed's partitions of one stage (any rank count through its universal checkpoint;
    # DeepSpeed 0.19.8 fails converting between stages).
    state_format: str
    # Why bitsandbytes' optimizers cannot run on it (None: they can). Both measured.
    bnb_refusal: Optional[str]
    options: str  # the parallel.<options> section it reads ("" none)
    # Why train.compile=true is refused on it (None: its layers compile whole). Measured.
    compile_refusal: Optional[str] = None
    # What else each rank holds only a part of (with shards_weights: what is sharded). None of
    # the three: every rank holds the whole model state (`replicated`).
    shards_optimizer: bool = False
    shards_grads: bool = False
    # It computes on the weights in the dtype the model stores them in (autocast aside: fp32
    # masters keep an fp32 residual stream, QLoRA's fp32-prepared embeddings an fp32 MLP). False:
    # it casts them (FSDP gathers them in the compute dtype, DeepSpeed casts the module to 16 bits).
    keeps_model_dtype: bool = False
    # Its data-parallel collectives: "none" (one process), "per_step" (the gradients reduced once
    # per optimizer step: all-reduced, or reduce-scattered and the updated weights all-gathered, 2
    # x (W-1)/W of the trainable parameters), "per_micro_batch" (the weights all-gathered for
    # forward, again for backward where reshard_after_forward, and the gradients reduce-scattered,
    # on every micro-batch).
    collectives: str = "none"
    # Whether the weights gathered for forward are freed and gathered again for backward: a
    # bool, or the `<parallel section>.<key>` switch of ParallelConfig that says (FSDP).
    reshard_after_forward: Union[bool, str] = False
    # The `<parallel section>.<key>` switches of ParallelConfig that keep model state in host
    # memory, each with the STATE_PARTS it moves there. Validation refuses a switch set for an
    # engine that does not read it; the planner moves those terms from the GPU to the host.
    offload: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # It reads parallel.fsdp.hybrid_shard/shard_size (shard within groups, replicate across them).
    hybrid_shard: bool = False
    # Its rung on the planner's advice ladder, by how much state it shards (plan/advice.py: a plan
    # that does not fit is advised the engines ranked above its own, lowest first).
    advice_rank: int = 0
    # The keys of its config that its builder derives from ours (dotted for nested ones), each
    # with the settings that set it: parallel.<options>.overrides may not set them (validation).
    # DeepSpeed's: engines/deepspeed.py deepspeed_config builds them.
    derived_keys: tuple[tuple[str, str], ...] = ()

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole model state: weights, gradients and optimizer (single, DDP)."""
        return not (self.shards_optimizer or self.shards_grads or self.shards_weights)

    @property
    def offload_switches(self) -> tuple[str, ...]:
        """The `<parallel section>.<key>` offload switches it reads."""
        return tuple(switch for switch, _ in self.offload)

    def offloaded(self, parallel: Any) -> frozenset[str]:
        """The STATE_PARTS that `parallel` (a ParallelConfig) has this engine keep in host memory."""
        return frozenset(part for switch, parts in self.offload if _switch(parallel, switch) for part in parts)

    def without_offload(self, parallel: Any) -> Any:
        """`parallel` (a ParallelConfig) with this engine's offload switches off."""
        for switch in self.offload_switches:
            section, key = switch.split(".")
            parallel = dataclasses.replace(parallel, **{section: dataclasses.replace(getattr(parallel, section),
                                                                                      **{key: False})})
        return parallel

    def gathers_per_micro_batch(self, parallel: Any) -> int:
        """The weights' all-gathers per micro-batch under `parallel` (a ParallelConfig): one for
        forward and one more for backward where they were resharded after forward; 0 where the
        weights are not sharded."""
        if self.collectives != "per_micro_batch":
            return 0
        again = self.reshard_after_forward
        return 2 if (_switch(parallel, again) if isinstance(again, str) else again) else 1

    @property
    def fp32_master_weights(self) -> bool:
        """Full fine-tuning's weights are built in fp32 (the masters: weights_dtype); DeepSpeed
        keeps its own fp32 masters beside 16-bit weights."""
        return not self.deepspeed


def _switch(parallel: Any, switch: str) -> bool:
    section, key = switch.split(".")
    return bool(getattr(getattr(parallel, section), key))


_ZERO_BNB = "DeepSpeed ZeRO steps the optimizer on its own flat partitions and reshards only AdamW's state"
_ZERO3_COMPILE = ("DeepSpeed ZeRO-3 gathers each linear layer's weights in module hooks that torch.compile cannot "
                  "trace (the tiny model: 53 graph breaks and the recompile limit hit in one step)")
_ZERO_STAGES = (1, 2, 3)
# The keys of DeepSpeed's config that engines/deepspeed.py deepspeed_config derives from ours, and
# the settings that set them (beside its builder's other torch-free facts: the ZeRO rows below).
DEEPSPEED_DERIVED_KEYS: tuple[tuple[str, str], ...] = (
    ("train_batch_size", "train.global_batch_size"),
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("gradient_accumulation_steps", "train.global_batch_size / (train.micro_batch_size x ranks)"),
    ("gradient_clipping", "train.grad_clip"),
    ("bf16", "train.precision"),
    ("fp16", "train.precision"),
    ("optimizer", "train.lr, train.adam_* and train.weight_decay (distft builds the optimizer)"),
    ("scheduler", "train.schedule, train.warmup_steps and train.min_lr_ratio (distft builds the schedule)"),
    ("managed_gradient_accumulation", "nothing: the engine marks the accumulation boundary itself"),
    ("zero_optimization.stage", "parallel=" + "|".join(f"zero{stage}" for stage in _ZERO_STAGES)),
)
_ZERO_OFFLOAD = ("deepspeed.offload_optimizer", ("optimizer",))
_ZERO3_OFFLOAD = ("deepspeed.offload_param", ("weights",))
ENGINES: dict[str, EngineKind] = {kind.strategy: kind for kind in (
    EngineKind("single", "ddp", "DDPEngine", None, multi_rank=False, shards_weights=False, meta_build=False,
               state_format="dcp", bnb_refusal=None, options="", keeps_model_dtype=True),
    EngineKind("ddp", "ddp", "DDPEngine", None, multi_rank=True, shards_weights=False, meta_build=False,
               state_format="dcp", bnb_refusal=None, options="", keeps_model_dtype=True, collectives="per_step"),
    *(EngineKind(f"zero{stage}", "deepspeed", "DeepSpeedEngine", stage, multi_rank=True, shards_weights=stage == 3,
                 meta_build=False, state_format=f"deepspeed-zero{stage}", bnb_refusal=_ZERO_BNB, options="deepspeed",
                 compile_refusal=_ZERO3_COMPILE if stage == 3 else None,
                 shards_optimizer=True, shards_grads=stage >= 2,
                 collectives="per_micro_batch" if stage == 3 else "per_step", reshard_after_forward=stage == 3,
                 offload=(_ZERO_OFFLOAD, _ZERO3_OFFLOAD) if stage == 3 else (_ZERO_OFFLOAD,),
                 advice_rank={1: 1, 2: 2, 3: 4}[stage], derived_keys=DEEPSPEED_DERIVED_KEYS)
      for stage in _ZERO_STAGES),
    EngineKind("fsdp", "fsdp", "FSDPEngine", None, multi_rank=True, shards_weights=True, meta_build=True,
               state_format="dcp", options="fsdp",
               bnb_refusal="FSDP2's parameters are DTensor shards, which bitsandbytes' optimizer kernels do not take",
               shards_optimizer=True, shards_grads=True, collectives="per_micro_batch",
               reshard_after_forward="fsdp.reshard_after_forward",
               offload=(("fsdp.cpu_offload", STATE_PARTS),), hybrid_shard=True, advice_rank=3),
)}


def engine_kind(strategy: str) -> EngineKind:
    """The EngineKind of `parallel.strategy` (validation refuses an unknown one first)."""
    return ENGINES[strategy]
