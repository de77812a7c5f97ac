"""The whole plan of a config, as text or JSON (the `distft plan` command, distft/commands/plan.py,
prints it), and the launchers' refusal of a job that cannot fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

from distft.config import Config, model_label, world_size
from distft.plan.advice import advice
from distft.plan.architecture import count_parameters, with_architecture
from distft.plan.memory import verdict
from distft.plan.timing import epoch, throughput
from distft.tracking import quiet_libraries


def plan(cfg: Config, with_epoch: bool = True, argv: Optional[Sequence[str]] = None,
         adjust: Optional[Callable[[Config], Config]] = None) -> dict:
    """The whole plan (`with_epoch=False`: without the time per epoch, which runs the data
    pipeline on a sample of the data). `argv`: the command line `cfg` was composed from, which
    the advice for a plan that does not fit composes its changes with (none without it);
    `adjust`: what the caller did to `cfg` after composing, done to each changed config too."""
    cfg, architecture = with_architecture(cfg)

    def as_planned(changed: Config) -> Config:
        return with_architecture(adjust(changed) if adjust else changed)[0]

    counts = count_parameters(cfg)
    memory = verdict(cfg, counts)
    per_gpu, fits = memory["per_gpu_bytes"], memory["fits"]
    speed = throughput(cfg, counts)
    return {
        "model": model_label(cfg.model), "technique": cfg.technique.name, "parallel": cfg.parallel.strategy,
        "world_size": world_size(cfg), "nodes": cfg.launcher.nnodes, "cluster": cfg.cluster.name,
        "device": "cpu" if runs_on_cpu(cfg) else "gpu",
        "architecture": architecture,
        "params_total": counts.total, "params_trainable": counts.trainable, "params_frozen": counts.frozen,
        "params_quantized": counts.quantized, "largest_layer_params": counts.largest_layer,
        "largest_module_params": counts.largest_module,
        "per_gpu_bytes": per_gpu,
        "per_node_bytes": {k: v * cfg.launcher.nproc_per_node for k, v in per_gpu.items()},
        "gpu_memory_bytes": memory["gpu_memory_bytes"], "margin": cfg.plan.margin,
        "per_node_host_bytes": memory["per_node_host_bytes"], "host_memory_bytes": memory["host_memory_bytes"],
        "host_fits": memory["host_fits"],
        "fits": fits,
        "advice": advice(cfg, counts, argv, as_planned) if fits is False and argv is not None else [],
        "throughput": speed,
        "epoch": epoch(cfg, speed["step_time_s"], speed.get("reference_tokens_per_s")) if with_epoch else None,
    }


def runs_on_cpu(cfg: Config) -> bool:
    """Whether the planned ranks compute on the CPU: train.device=cpu, or `auto` where the config
    names no GPU and the job runs here (cluster=local, launched locally: this machine decides, as
    for its host memory in memory.host_capacity_bytes) and this machine has none."""
    if cfg.train.device == "cpu":
        return True
    if cfg.train.device != "auto" or cfg.cluster.gpus_per_node or cfg.cluster.gpu_memory_gb:
        return False
    if cfg.cluster.name != "local" or cfg.launcher.kind != "local":
        return False
    import torch

    return not torch.cuda.is_available()


def format_text(result: dict) -> str:
    gib = 1024**3
    cpu = result.get("device") == "cpu"  # CPU ranks are processes, not GPUs
    lines = [f"{result['model']} / {result['technique']} / {result['parallel']} on {result['world_size']} "
             f"{'CPU process(es)' if cpu else 'GPU(s)'}, {result['nodes']} node(s) of {result['cluster']}",
             f"  architecture: {result['architecture']}",
             f"  parameters: {result['params_total']:,} total, {result['params_trainable']:,} trainable, "
             f"{result['params_frozen']:,} frozen ({result['params_quantized']:,} in 4 bits)",
             "  per process:" if cpu else "  per GPU:"]
    for key, value in result["per_gpu_bytes"].items():
        if key == "paged":
            lines.append(f"    + paged   {value / gib:9.2f} GiB of optimizer state in unified memory, not in the total: "
                         "it moves to host memory when the GPU runs short (slower steps then)")
        else:
            lines.append(f"    {key:<12}{value / gib:9.2f} GiB")
    host = result["per_node_host_bytes"]
    peak = "loading" if host["load"] >= host["offload"] else "offloaded state"
    line = (f"  host memory per node: {host['total'] / gib:.1f} GiB ({peak} {max(host['load'], host['offload']) / gib:.1f}"
            f" + processes {host['overhead'] / gib:.1f})")
    if result["host_memory_bytes"]:
        said = "fits" if result["host_fits"] else "does NOT fit"
        line += f", {said} in {result['host_memory_bytes'] / gib:.0f} GiB"
    lines.append(line)
    if result["gpu_memory_bytes"]:
        gpu_fits = result["per_gpu_bytes"]["total"] <= result["gpu_memory_bytes"] * (1 - result["margin"])
        said = "fits" if gpu_fits else "does NOT fit"
        lines.append(f"  {said} in {result['gpu_memory_bytes'] / gib:.0f} GiB with {result['margin']:.0%} headroom"
                     + (", but the node's host memory does not" if gpu_fits and result["host_fits"] is False else ""))
    for item in result["advice"]:
        lines.append(f"    would fit: {item['change']}  ({item['why']}; {item['per_gpu_total_bytes'] / gib:.1f} GiB per GPU, "
                     f"{item['per_node_host_bytes'] / gib:.0f} GiB host per node)")
    t, e = result["throughput"], result["epoch"]
    if t["tokens_per_s"]:
        comm = f", of which communication {t['comm_time_s']:.2f} s" if t["comm_time_s"] is not None else ""
        lines.append(f"  ~{t['tokens_per_s']:,.0f} tokens/s at MFU {t['assumed_mfu']:.0%}: {t['step_time_s']:.2f} s per step"
                     f"{comm}, {_duration(t['time_for_max_steps_s'])} for train.max_steps")
    if e is None:
        pass
    elif "unknown" in e:
        lines.append(f"  epoch: unknown ({e['unknown']})")
    else:
        when = f", {_duration(e['time_s'])}" if e["time_s"] else ""
        about = f" (from {e['rows_read']:,} of {e['train_rows']:,} rows)" if e["extrapolated"] else (
            f" (from the data cache {e['cache']})" if e.get("cache") else "")
        unit = "pairs" if "pairs" in e else "sequences"
        lines.append(f"  epoch: {e['sequences']:,} {unit}, {e['tokens']:,} tokens, {e['steps']:,} steps{when}{about}")
        if e.get("reference_time_s"):
            lines.append(f"  reference: every training pair scored once before the first step, "
                         f"{_duration(e['reference_time_s'])} (objective.reference=live: in each step instead)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def refusal(cfg: Config, action: str, where: Optional[str] = None, verb: str = "start",
            argv: Optional[Sequence[str]] = None, adjust: Optional[Callable[[Config], Config]] = None) -> Optional[str]:
    """What a launcher prints instead of starting a job whose plan does not fit
    `cluster.gpu_memory_gb` (`action`: "not submitted, nothing queued"; `verb`: what
    plan.override=true does anyway; `argv` and `adjust`: as plan()'s, for its advice). None when it fits, when there is no GPU size to check against,
    or with plan.override=true. Only the memory is planned first (a fraction of a second once the
    libraries are imported); the whole plan, time per epoch aside, only for a refusal."""
    if not cfg.cluster.gpu_memory_gb or cfg.plan.override:
        return None
    quiet_meta_build()
    architecture_cfg, _ = with_architecture(cfg)
    if verdict(architecture_cfg, count_parameters(architecture_cfg))["fits"] is not False:
        return None
    result = plan(cfg, with_epoch=False, argv=argv, adjust=adjust)
    return (f"distft: {action}: the plan does not fit {where or f'cluster={cfg.cluster.name}'} "
            f"(pass plan.override=true to {verb} it anyway):\n{format_text(result)}")


def quiet_meta_build() -> None:
    """Libraries' hints about kernels and deprecations in the meta build (bitsandbytes' missing
    CPU 4-bit kernel, transformers' `is_gradient_checkpointing`) are noise above the plan: the
    same named messages every entry point drops (tracking.quiet_libraries), and only those (a
    logger's level set here would hide its other warnings in the rest of the process)."""
    quiet_libraries()

