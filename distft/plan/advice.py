"""When a plan does not fit: the changes (one, else two together) that make it fit, cheapest first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

from distft.config import Config, to_dict
from distft.engines.kinds import ENGINES, engine_kind
from distft.model.build import ParameterCounts
from distft.plan.architecture import count_parameters
from distft.plan.memory import verdict
from distft.preflight import Composer
from distft.techniques.kinds import technique_kind


def advice(cfg: Config, counts: ParameterCounts, argv: Sequence[str],
           adjust: Optional[Callable[[Config], Config]] = None) -> list[dict]:
    """When the plan does not fit: single changes that make it fit, cheapest first (what they
    cost: recomputation, smaller steps, more communication, host memory, precision, GPUs), else
    pairs of them. `argv`: the command line `cfg` was composed from; each change is composed
    with it as a run would compose it (preflight.Composer), so a change that refines a
    preset the line chose is judged on what the preset gives with it. `adjust`: what the caller
    did to `cfg` after composing (the local launcher's GPUs), done to each changed config too."""
    candidates: list[tuple[str, list[str]]] = []
    if not cfg.train.gradient_checkpointing:
        candidates.append(("recompute activations in backward (~30% slower steps)", ["train.gradient_checkpointing=true"]))
    for mb in (cfg.train.micro_batch_size // 2, 1):
        if 0 < mb < cfg.train.micro_batch_size:
            candidates.append((f"micro-batch {mb} (more accumulation, same global batch)", [f"train.micro_batch_size={mb}"]))
    kind = engine_kind(cfg.parallel.strategy)
    if cfg.train.optimizer == "adamw" and kind.bnb_refusal is None:
        candidates.append(("8-bit AdamW state (bitsandbytes)", ["train.optimizer=adamw_8bit"]))
        candidates.append(("8-bit AdamW state, paged to host memory when the GPU runs short (QLoRA's optimizer)",
                           ["train.optimizer=paged_adamw_8bit"]))
    # The engines that shard more state (EngineKind.advice_rank), each a parallel=<strategy> preset.
    for stronger in sorted(ENGINES.values(), key=lambda k: k.advice_rank):
        if stronger.advice_rank > kind.advice_rank:
            candidates.append((f"shard more state ({stronger.strategy})", [f"parallel={stronger.strategy}"]))
    if kind.shards_weights and not kind.meta_build:  # every rank loads the whole base before partitioning it
        for loader in ENGINES.values():
            if loader.meta_build and loader.multi_rank:
                candidates.append((f"one copy of the base per node while loading ({loader.strategy})",
                                   [f"parallel={loader.strategy}"]))
    candidates.append(("optimizer state in host memory", ["parallel=zero3", "parallel.deepspeed.offload_optimizer=true"]))
    candidates.append(("weights and optimizer in host memory", ["parallel=zero3", "parallel.deepspeed.offload_optimizer=true",
                                                                "parallel.deepspeed.offload_param=true"]))
    trained = technique_kind(cfg.technique.name)
    if not trained.quantized_base and not trained.virtual_tokens:  # full fine-tuning, a 16-bit base's adapter
        candidates.append(("4-bit base with LoRA (QLoRA)", ["technique=qlora"]))
    nodes, per_node = cfg.launcher.nnodes, cfg.launcher.nproc_per_node
    worlds = [(f"all {cfg.cluster.gpus_per_node} GPUs of each node", nodes, cfg.cluster.gpus_per_node)]
    worlds += [(f"{factor}x the nodes", nodes * factor, per_node) for factor in (2, 4, 8, 16)]
    for why, new_nodes, new_per_node in worlds:
        overrides = _world_change(cfg, new_nodes, new_per_node) if new_per_node >= per_node else None
        if overrides:
            candidates.append((why, overrides))
    counted: dict[str, ParameterCounts] = {}
    endpoint = "launcher.rdzv_endpoint=first-node:29500"

    def fitting(why: str, overrides: list[str]) -> Optional[dict]:
        # A local launch on several nodes also needs the first node's address; any will do to plan.
        shown = overrides
        if cfg.launcher.kind != "slurm" and not cfg.launcher.rdzv_endpoint and any(
                o.startswith("launcher.nnodes=") and o != "launcher.nnodes=1" for o in overrides):
            why, overrides = why + "; a local launch also needs launcher.rdzv_endpoint=HOST:PORT", [*overrides, endpoint]
        changed = composer.compose(overrides)
        if changed is None:
            return None
        changed = adjust(changed) if adjust else changed
        technique = next((o for o in overrides if o.startswith("technique")), None)
        if technique and technique not in counted:
            counted[technique] = count_parameters(changed)
        result = verdict(changed, counted[technique] if technique else counts)
        if not result["fits"]:
            return None
        return {"change": " ".join(shown), "why": why, "per_gpu_total_bytes": result["per_gpu_bytes"]["total"],
                "per_node_host_bytes": result["per_node_host_bytes"]["total"]}

    with Composer(argv) as composer:
        # The changes are composed with `argv`: it must be the command line of `cfg` (else no advice).
        unchanged = composer.compose([])
        if unchanged is None or to_dict(adjust(unchanged) if adjust else unchanged, redact=False) != to_dict(
                cfg, redact=False):
            return []
        found = [item for item in (fitting(why, overrides) for why, overrides in candidates) if item]
        if not found:  # no single change: two together, cheapest pairs first
            pairs = [(i, j) for i in range(len(candidates)) for j in range(i + 1, len(candidates))
                     if not _conflict(candidates[i][1], candidates[j][1])]
            for i, j in sorted(pairs, key=sum):
                item = fitting(f"{candidates[i][0]}; {candidates[j][0]}", candidates[i][1] + candidates[j][1])
                if item:
                    found.append(item)
                if len(found) == 5:
                    break
    return found[:5]


def _world_change(cfg: Config, nodes: int, per_node: int) -> Optional[list[str]]:
    """Overrides that run the job on `nodes` x `per_node` ranks with the same global batch (and a
    smaller micro-batch where the old one no longer divides it); None when nothing changes or the
    global batch cannot be shared by that many ranks."""
    launcher, train = cfg.launcher, cfg.train
    world = nodes * per_node
    if (nodes, per_node) == (launcher.nnodes, launcher.nproc_per_node) or train.global_batch_size % world:
        return None
    per_rank = train.global_batch_size // world
    micro = max(d for d in range(1, min(train.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
    if launcher.kind == "slurm":
        out = [f"launcher.nodes={nodes}"] if nodes != launcher.nnodes else []
        if per_node != launcher.nproc_per_node:
            out += [f"launcher.gpus_per_node={per_node}", f"launcher.tasks_per_node={per_node}"]
    else:
        out = [f"launcher.nnodes={nodes}"] if nodes != launcher.nnodes else []
        if per_node != launcher.nproc_per_node:
            out.append(f"launcher.nproc_per_node={per_node}")
    return out + ([f"train.micro_batch_size={micro}"] if micro != train.micro_batch_size else [])


def _conflict(one: list[str], other: list[str]) -> bool:
    """Two changes that set the same thing (two engines, two micro-batch sizes, ...)."""
    def keys(overrides: list[str]) -> set[str]:
        return {o.split("=", 1)[0].split(".")[0] if o.startswith("parallel") else o.split("=", 1)[0] for o in overrides}

    return bool(keys(one) & keys(other))
