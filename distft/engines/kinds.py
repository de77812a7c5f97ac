"""What each `parallel.strategy` is, for the code outside its engine module: one row per strategy.

Validation, the planner, the precision policy, checkpoints and the model build read a strategy's
`EngineKind`, never its name. Imports nothing of distft (and no torch): every module can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def fp32_master_weights(self) -> bool:
        """Full fine-tuning's weights are built in fp32 (the masters: weights_dtype); DeepSpeed
        keeps its own fp32 masters beside 16-bit weights."""
        return not self.deepspeed


_ZERO_BNB = "DeepSpeed ZeRO steps the optimizer on its own flat partitions and reshards only AdamW's state"
_ZERO3_COMPILE = ("DeepSpeed ZeRO-3 gathers each linear layer's weights in module hooks that torch.compile cannot "
                  "trace (the tiny model: 53 graph breaks and the recompile limit hit in one step)")
ENGINES: dict[str, EngineKind] = {kind.strategy: kind for kind in (
    EngineKind("single", "ddp", "DDPEngine", None, multi_rank=False, shards_weights=False, meta_build=False,
               state_format="dcp", bnb_refusal=None, options=""),
    EngineKind("ddp", "ddp", "DDPEngine", None, multi_rank=True, shards_weights=False, meta_build=False,
               state_format="dcp", bnb_refusal=None, options=""),
    *(EngineKind(f"zero{stage}", "deepspeed", "DeepSpeedEngine", stage, multi_rank=True, shards_weights=stage == 3,
                 meta_build=False, state_format=f"deepspeed-zero{stage}", bnb_refusal=_ZERO_BNB, options="deepspeed",
                 compile_refusal=_ZERO3_COMPILE if stage == 3 else None)
      for stage in (1, 2, 3)),
    EngineKind("fsdp", "fsdp", "FSDPEngine", None, multi_rank=True, shards_weights=True, meta_build=True,
               state_format="dcp", options="fsdp",
               bnb_refusal="FSDP2's parameters are DTensor shards, which bitsandbytes' optimizer kernels do not take"),
)}


def engine_kind(strategy: str) -> EngineKind:
    """The EngineKind of `parallel.strategy` (validation refuses an unknown one first)."""
    return ENGINES[strategy]
