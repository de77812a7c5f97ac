"""What a finished run leaves for people: summary.json, the report and predictions, the loss plot,
the measured-against-planned memory line and the closing lines.

`summarize` builds the summary (every rank: its memory report gathers every rank's peak);
`write_results` is rank 0's: the files, the tracker's copy and the last lines of the log. The
summary's keys are a format: tests, sweeps (distft/evaluation/sweep.py) and users read them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from shlex import quote as shell_quote
from typing import Optional

from distft import dist
from distft.config import Config, grad_accum_steps, model_label
from distft.data.synthetic import what_it_shows
from distft.evaluation.evaluate import metrics_only
from distft.evaluation.report import overfitting, predictions_path, write_predictions, write_report
from distft.files import write_json
from distft.plan import count_parameters, per_gpu_bytes, with_architecture
from distft.preemption import requeue_count
from distft.techniques.kinds import technique_kind
from distft.tracking import flops_per_token, mfu, plot_losses, read_metrics

log = logging.getLogger("distft")

SUMMARY = "summary.json"
REPORT = "eval_report.md"
PREDICTIONS = os.path.basename(predictions_path(REPORT))  # eval_report.predictions.jsonl
LEFT_BY_AN_ATTEMPT = ("metrics.jsonl", "tracker_run_id", "wandb", "loss.png", REPORT, PREDICTIONS)


def summarize(run, state, eval_after: dict, run_dir: str, checkpoints: dict, best: tuple, trained_bytes: int) -> dict:
    """Every rank: the run's summary.json. `checkpoints`: final, evaluated and resumed_from paths;
    `best`: the (step, eval loss) of the run's lowest held-out loss."""
    cfg, info = run.cfg, run.info
    tokens_per_s = state.train_tokens / max(state.train_time_s, 1e-9)
    arch = run.model.config  # the real architecture (a local checkpoint's config.json wins over the preset)
    flops_token = flops_per_token(run.total, arch.num_hidden_layers, arch.hidden_size, cfg.data.max_seq_len,
                                  full=technique_kind(cfg.technique.name).trains_all_weights)
    return {
        "experiment": cfg.run.experiment,
        "technique": cfg.technique.name,
        "parallel": cfg.parallel.strategy,
        "engine": getattr(run.engine, "name", type(run.engine).__name__),  # DDPEngine's says "single process"
        "world_size": info.world_size,
        "model": model_label(cfg.model),
        "model_build": run.model_build,
        "run_dir": run_dir,
        "steps": state.step,
        "global_batch_size": cfg.train.global_batch_size,
        "grad_accum_steps": grad_accum_steps(cfg),
        "train_tokens": state.train_tokens,
        "train_target_tokens": state.train_target_tokens,
        "train_time_s": round(state.train_time_s, 3),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_rank": tokens_per_s / info.world_size,
        "mfu": mfu(tokens_per_s, flops_token, cfg.cluster.peak_tflops, info.world_size),
        "flops_per_token": flops_token,
        "peak_memory_gb": round(run.memory.process_peak() / 2**30, 3),
        "peak_memory_kind": "cuda_allocated" if run.memory.cuda else "host_rss",
        "memory": memory_report(cfg, run.memory, trained_bytes, run.dtype, info),
        "final_train_loss": state.last_train_loss,  # the last step's (token-weighted) loss
        # Token-weighted mean over every applied step of the run, resumes included: what Hugging
        # Face's Trainer reports as train_loss (it averages per-step losses; same with equal batches).
        "mean_train_loss": state.train_loss_sum / state.train_loss_tokens if state.train_loss_tokens else None,
        "stopped_early": state.stopped_early,
        "trainable_params": run.trainable,
        "total_params": run.total,
        "data": run.data.report.as_dict(),
        "data_fingerprint": run.data_fingerprint,  # the data files by content: a rerun on other data is refused
        "eval_before": metrics_only(state.eval_before) if state.eval_before else None,
        "eval_after": metrics_only(eval_after),
        "final_checkpoint": checkpoints["final"],
        # The run's result: what the final report scored, and what evaluate and export use by
        # default (its best checkpoint after early stopping or with checkpoint.keep_best).
        "evaluated_checkpoint": checkpoints["evaluated"],
        "best_step": best[0],
        "best_eval_loss": best[1],
        "resumed_from": checkpoints["resumed_from"],
        "nonfinite_steps": state.nonfinite_steps,
        "requeues": requeue_count(),  # times SLURM requeued this job (preemption, time limit)
    }


def write_results(run, state, tracker, summary: dict, eval_after: dict, best: Optional[dict], notes: list[str]) -> None:
    """Rank 0: the report and its predictions, the loss plot, summary.json (and the tracker's
    copy), the base-vs-tuned line and the closing lines."""
    cfg, run_dir, eval_before = run.cfg, summary["run_dir"], state.eval_before
    evaluated, final = summary["evaluated_checkpoint"], summary["final_checkpoint"]
    meta = {"experiment": cfg.run.experiment, "technique": cfg.technique.name, "model": model_label(cfg.model),
            "checkpoint": evaluated, "steps": state.step}
    if best:
        meta["checkpoint"] = (f"{evaluated} (the best eval loss, {best['eval_loss']:.4f} at step {best['step']}; "
                              f"{best['why']}; the last checkpoint is {final})")
    report = os.path.join(run_dir, REPORT)
    predictions = write_predictions(predictions_path(report), {"base": eval_before, "tuned": eval_after})
    notes = [*notes, overfitting(read_metrics(tracker.metrics_path), cfg.eval.overfit_evals)]
    intro = ""
    if cfg.data.source == "synthetic" and not cfg.data.sources:
        intro = what_it_shows(list(cfg.data.synthetic.tasks), eval_after, eval_before, state.step, run.total)
    write_report(report, eval_before, eval_after, meta, num_samples=cfg.eval.report_samples,
                 predictions=predictions, notes=[note for note in notes if note], intro=intro)
    tracker.predictions(state.step, predictions)
    plot = os.path.join(run_dir, "loss.png") if cfg.tracking.plot else None
    if plot:
        plot_losses(tracker.metrics_path, plot, best_step=summary["best_step"])
    tracker.summary(summary)
    write_json(os.path.join(run_dir, SUMMARY), summary, what="the run's summary")
    if eval_before:
        log.info("base -> tuned on %d held-out prompts: loss %.3f -> %.3f, exact match %.3f -> %.3f",
                 min(cfg.eval.num_samples, len(run.data.eval_rows)), eval_before["loss"], eval_after["loss"],
                 eval_before["exact_match"], eval_after["exact_match"])
    for line in closing_lines(run_dir, evaluated, plot, tracker.where()):
        log.info(line)


def memory_report(cfg: Config, memory, trained_bytes: int, dtype, info) -> dict:
    """Measured training memory of every rank next to the planner's estimate for this config
    (the model dtype as trained; the planner's fixed overhead left out, see tracking.MemoryMeter)."""
    per_rank = dist.all_gather_object(trained_bytes)
    report = {"kind": memory.kind, "start_gb": round(memory.baseline / 2**30, 3),
              "cpu_profiled_steps": memory.cpu_steps if memory.kind == "cpu_tensors" else None,
              "training_gb_per_rank": [round(b / 2**30, 4) for b in per_rank], "planned_gb": None, "planned": None}
    if not info.is_main:  # the summary is rank 0's
        return report
    try:
        dtype_name = str(dtype).removeprefix("torch.")
        as_trained, _ = with_architecture(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype_name)))
        planned = per_gpu_bytes(as_trained, count_parameters(as_trained))
    except Exception as err:  # an estimate must never cost a finished run its summary
        log.warning("memory plan unavailable for this config: %s", err)
        return report
    planned.pop("overhead"), planned.pop("total"), planned.pop("paged", None)  # paged: not the GPU's (plan/memory.py)
    report["planned"] = {k: round(v / 2**30, 4) for k, v in planned.items()}
    report["planned_gb"] = round(sum(planned.values()) / 2**30, 4)
    log.info(memory_line(memory.kind, max(per_rank), memory.baseline, report["planned"]))
    return report


MEASURED = {  # what each MemoryMeter kind measures, for people
    "cuda_allocated": "CUDA tensors",
    "cpu_tensors": "live tensors",
    "host_rss": "resident set",
}


def memory_line(kind: str, measured: int, baseline: int, planned: dict) -> str:
    """One short sentence comparing what training took with the planner's estimate of the same
    terms: the busiest rank's peak above what the process held before the model was built (so:
    weights, gradients, optimizer state, activations), the plan's sum of exactly those terms (its
    fixed overhead, the CUDA context and allocator slack, left out), and how far off the plan is.
    The breakdown (each term, the starting level, every rank) is summary.json's `memory`. A
    resident set also grows with the code the first steps import: no verdict on it, and the
    setting that measures tensors instead. `baseline` is in summary.json only."""
    gib = 2**30
    plan = sum(planned.values())
    off = (plan * gib / measured - 1) if measured else 0.0
    verdict = f"{abs(off):.1%} {'over' if off > 0 else 'under'}" if round(abs(off), 3) else "exact"
    if kind == "host_rss":
        return (f"memory per rank: {measured / gib:.3f} GiB resident, {plan:.3f} GiB planned for tensors "
                "(tracking.cpu_memory_steps=2 measures those)")
    return (f"memory per rank: {measured / gib:.3f} GiB measured ({MEASURED.get(kind, kind)}), {plan:.3f} GiB planned "
            f"({verdict}); the terms are in summary.json")


def closing_lines(run_dir: str, checkpoint: str, plot: Optional[str], wandb: Optional[tuple[str, str]]) -> list[str]:
    """What a finished run's last lines say: where its files are, the W&B run (offline: the
    command that uploads it), and the next commands, each ready to paste."""
    lines = [f"report: {os.path.join(run_dir, REPORT)}", f"predictions: {os.path.join(run_dir, PREDICTIONS)}",
             f"summary: {os.path.join(run_dir, SUMMARY)}"]
    if plot:
        lines.append(f"loss plot: {plot}")
    if wandb is not None:
        mode, where = wandb
        lines.append(f"W&B run (offline): {where}; upload it with `wandb sync {shell_quote(where)}`" if mode == "offline"
                     else f"W&B run: {where}")
    exported = os.path.join(run_dir, "exported")
    lines += ["next:",
              f"  compare it with its base again:   python -m distft.evaluate {shell_quote(checkpoint)}",
              f"  export a Hugging Face model:      python -m distft.export {shell_quote(checkpoint)} "
              f"--out {shell_quote(exported)}"]
    return lines


def fmt_eval(result: dict) -> str:
    """An evaluation's metrics on one log line."""
    return (f"loss {result['loss']:.4f} perplexity {result['perplexity']:.3f} exact_match {result['exact_match']:.3f} "
            f"f1 {result['f1']:.3f} rouge_l {result['rouge_l']:.3f}")
