"""When a plan does not fit: the changes (one, else two together) that make it fit, cheapest first."""

from __future__ import annotations

import dataclasses
from typing import Optional

from distft.config import Config
from distft.engines.kinds import engine_kind
from distft.model import ParameterCounts
from distft.plan.architecture import count_parameters
from distft.plan.memory import verdict


def advice(cfg: Config, counts: ParameterCounts) -> list[dict]:
    """When the plan does not fit: single changes that make it fit, cheapest first (what they
    cost: recomputation, smaller steps, more communication, host memory, precision, GPUs)."""
    candidates: list[tuple[str, list[str]]] = []
    if not cfg.train.gradient_checkpointing:
        candidates.append(("recompute activations in backward (~30% slower steps)", ["train.gradient_checkpointing=true"]))
    for mb in (cfg.train.micro_batch_size // 2, 1):
        if 0 < mb < cfg.train.micro_batch_size:
            candidates.append((f"micro-batch {mb} (more accumulation, same global batch)", [f"train.micro_batch_size={mb}"]))
    if cfg.train.optimizer == "adamw" and engine_kind(cfg.parallel.strategy).bnb_refusal is None:
        candidates.append(("8-bit AdamW state (bitsandbytes)", ["train.optimizer=adamw_8bit"]))
        candidates.append(("8-bit AdamW state, paged to host memory when the GPU runs short (QLoRA's optimizer)",
                           ["train.optimizer=paged_adamw_8bit"]))
    ladder = ["ddp", "zero1", "zero2", "fsdp", "zero3"]
    strategy = cfg.parallel.strategy if cfg.parallel.strategy in ladder else "ddp"
    for stronger in ladder[ladder.index(strategy) + 1:]:
        candidates.append((f"shard more state ({stronger})", [f"parallel={stronger}"]))
    if strategy == "zero3":
        candidates.append(("one copy of the base per node while loading (fsdp)", ["parallel=fsdp"]))
    candidates.append(("optimizer state in host memory", ["parallel=zero3", "parallel.deepspeed.offload_optimizer=true"]))
    candidates.append(("weights and optimizer in host memory", ["parallel=zero3", "parallel.deepspeed.offload_optimizer=true",
                                                                "parallel.deepspeed.offload_param=true"]))
    if cfg.technique.name in ("full", "lora", "dora"):
        candidates.append(("4-bit base with LoRA (QLoRA)", ["technique=qlora"]))
    nodes, per_node = cfg.launcher.nnodes, cfg.launcher.nproc_per_node
    worlds = [(f"all {cfg.cluster.gpus_per_node} GPUs of each node", nodes, cfg.cluster.gpus_per_node)]
    worlds += [(f"{factor}x the nodes", nodes * factor, per_node) for factor in (2, 4, 8, 16)]
    for why, new_nodes, new_per_node in worlds:
        overrides = _world_change(cfg, new_nodes, new_per_node) if new_per_node >= per_node else None
        if overrides:
            candidates.append((why, overrides))
    counted: dict[str, ParameterCounts] = {}
    groups_cache: dict = {}

    def try_change(why: str, overrides: list[str]) -> Optional[dict]:
        # A local launch on several nodes also needs the first node's address; any will do to plan.
        needs_endpoint = cfg.launcher.kind != "slurm" and not cfg.launcher.rdzv_endpoint and any(
            o.startswith("launcher.nnodes=") and o != "launcher.nnodes=1" for o in overrides)
        changed = _apply(cfg, overrides + (["launcher.rdzv_endpoint=first-node:29500"] if needs_endpoint else []),
                         groups_cache)
        if needs_endpoint:
            why += "; a local launch also needs launcher.rdzv_endpoint=HOST:PORT"
        if changed is None:
            return None
        technique = next((o for o in overrides if o.startswith("technique")), None)
        if technique and technique not in counted:
            counted[technique] = count_parameters(changed)
        result = verdict(changed, counted[technique] if technique else counts)
        if not result["fits"]:
            return None
        return {"change": " ".join(overrides), "why": why, "per_gpu_total_bytes": result["per_gpu_bytes"]["total"],
                "per_node_host_bytes": result["per_node_host_bytes"]["total"]}

    found = [item for item in (try_change(why, overrides) for why, overrides in candidates) if item]
    if not found:  # no single change: two together, cheapest pairs first
        pairs = [(i, j) for i in range(len(candidates)) for j in range(i + 1, len(candidates))
                 if not _conflict(candidates[i][1], candidates[j][1])]
        for i, j in sorted(pairs, key=sum):
            item = try_change(f"{candidates[i][0]}; {candidates[j][0]}", candidates[i][1] + candidates[j][1])
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


def _apply(cfg: Config, overrides: list[str], groups_cache: Optional[dict] = None) -> Optional[Config]:
    """cfg with overrides applied, or None when the result does not validate. Group choices
    (parallel=, technique=) are re-read from conf/ through OmegaConf, once per combination when a
    `groups_cache` is given; dotted keys are set on the dataclasses directly (advice tries a
    hundred combinations: through OmegaConf each took ~0.1 s)."""
    from distft.config import _size_slurm_job
    from distft.validation import validate

    groups = tuple(o for o in overrides if o.split("=", 1)[0] in ("parallel", "technique"))
    cache = groups_cache if groups_cache is not None else {}
    if groups not in cache:
        cache[groups] = _apply_groups(cfg, groups)
    changed = cache[groups]
    if changed is None:
        return None
    try:
        for override in overrides:
            key, value = override.split("=", 1)
            if key not in ("parallel", "technique"):
                changed = _replace_dotted(changed, key.split("."), _yaml_value(value))
    except (AttributeError, TypeError, ValueError):
        return None
    launcher = dataclasses.replace(changed.launcher)
    _size_slurm_job(launcher)
    changed = dataclasses.replace(changed, launcher=launcher)
    return changed if not validate(changed) else None


def _apply_groups(cfg: Config, groups: tuple[str, ...]) -> Optional[Config]:
    from omegaconf import OmegaConf

    from distft.config import to_config

    if not groups:
        return cfg
    node = OmegaConf.structured(cfg)
    for override in groups:
        key, value = override.split("=", 1)
        node[key] = OmegaConf.merge(node[key], OmegaConf.load(_conf_path(key, value)))
    try:
        return to_config(node)
    except Exception:  # noqa: BLE001 - a combination the schema refuses is not advice
        return None


def _replace_dotted(obj, path: list[str], value):
    """dataclasses.replace along a dotted path; the value converted to the field's current type."""
    if len(path) == 1:
        if not hasattr(obj, path[0]):
            raise AttributeError(path[0])
        current = getattr(obj, path[0])
        if isinstance(current, bool) and not isinstance(value, bool):
            raise TypeError(f"{path[0]} takes true/false")
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace_dotted(getattr(obj, path[0]), path[1:], value)})


def _conf_path(group: str, option: str) -> str:
    from distft.config import conf_dir

    return str(conf_dir() / group / f"{option}.yaml")


def _yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)
