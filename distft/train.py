"""The central training loop: one plain function from a typed Config to a finished run.

config -> `build_run` (tokenizer + data -> model + technique -> engine -> batches; distft/run.py)
-> `fit` (the steps, periodic eval and saves, signals) -> `finish` (final eval, save, report,
summary). A `Checkpointer` saves and restores every stateful part; the loop's own state is a
`TrainState`. The loop only talks to the `Engine` interface, so every technique on every
parallelism strategy runs through the same lines.

Gradient accumulation weights every target token equally: each micro-batch contributes its
*summed* token loss divided by the number of target tokens in the whole optimizer step (over all
micro-batches and ranks). So micro-batch 1 x 4 accumulations gives the same update as
micro-batch 4 x 1, whatever the lengths of the samples.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import Optional

import torch

from distft import dist
from distft.config import Config, config_hash, grad_accum_steps, model_label, to_dict
from distft.config import run_dir as config_run_dir
from distft.engines import autocast_dtype
from distft.errors import CheckpointError, NonFiniteError
from distft.evaluation.evaluate import EvalInterrupted
from distft.evaluation.report import predictions_path
from distft.files import make_dirs, read_json, read_text, write_json, write_text
from distft.model.build import IGNORE_INDEX
from distft.model.loss import computing_loss
from distft.preemption import StopSignal, requeue_count
from distft.run import Run, TrainState, build_run
from distft.tracking import (
    GenerationProgress,
    MemoryMeter,
    Progress,
    Tracker,
    flops_per_token,
    mfu,
    plot_losses,
    quiet_libraries,
    setup_logging,
)

log = logging.getLogger("distft")

SUMMARY = "summary.json"
REPORT = "eval_report.md"
PREDICTIONS = os.path.basename(predictions_path(REPORT))  # eval_report.predictions.jsonl


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def write_config_dump(cfg: Config, run_dir: str) -> None:
    """The run's config, secrets redacted, as YAML: what `python -m distft` actually ran."""
    from omegaconf import OmegaConf

    write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg, redact=True))),
               "the config dump")


def train(cfg: Config) -> dict:
    """Train, evaluate against the base, checkpoint and report. Returns the summary dict."""
    from distft import preemption

    info = dist.from_env()
    setup_logging(info.rank)
    _quiet_libraries()
    run_dir = config_run_dir(cfg)
    if info.is_main:
        print(f"run_dir: {run_dir}", flush=True)
    seed_everything(cfg.train.seed)
    device = dist.pick_device(cfg.train.device, info)
    from distft.engines.deepspeed import pin_accelerator

    pin_accelerator(device)
    threads, why = dist.share_cpu_threads(device)
    if device.type == "cpu":  # this rank's own: every rank says it
        log.info("torch threads: %d (%s)", threads, why)
    # A process group the caller made (a script or a test running several trainings in one group)
    # is left to the caller; the one made here (or by the engine: DeepSpeed's 1-rank group) goes with the run.
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist.init(info, cfg.parallel.backend, cfg.parallel.timeout_s, device)
    # The handlers were installed when the process started (preemption.install, by the entry
    # point); a signal that came before now still stops the run, before its first step.
    stop = StopSignal(cfg, device)
    lock, requeued = None, False
    try:
        lock = _own_run_dir(run_dir, info)
        preemption.set_phase("loading")
        return _start(cfg, info, run_dir, device, stop)
    except preemption.Preempted as stopped:
        requeued = stopped.requeued
        raise
    finally:
        if lock is not None:
            # A requeued job keeps its lock while it waits to run again: a submission of the same
            # run meanwhile is refused (the job is PENDING, so the lock is live), and the job's own
            # rerun takes it over (an earlier run of this job, distft/runlock.py).
            lock.release(remove=not requeued)
        stop.close()
        if owns_group:
            dist.shutdown()


def _own_run_dir(run_dir: str, info):
    """Rank 0 takes the run directory's lock (distft/runlock.py) before anything in it is read or
    moved; every rank learns whether it did, and all refuse together when another run holds it."""
    from distft.errors import RunInUse
    from distft.runlock import acquire

    lock, refusal = None, None
    if info.is_main:
        try:
            lock = acquire(run_dir)
        except RunInUse as err:
            refusal = str(err)
    refusal = dist.all_gather_object(refusal)[0]
    if refusal:
        raise RunInUse(refusal)
    return lock


def _start(cfg: Config, info, run_dir: str, device: torch.device, stop) -> dict:
    """Resume, start over (resume=false, old run set aside) or report a finished run."""
    from distft.checkpoint.store import data_changes, resume_conflicts, set_run_aside
    from distft.runlock import LOCK

    if not cfg.resume:
        if info.is_main:
            aside = set_run_aside(run_dir, keep=(LOCK,))
            if aside:
                log.info("resume=false: the previous run in %s was moved to %s", run_dir, aside)
        dist.barrier()
    summary_path = os.path.join(run_dir, SUMMARY)
    fingerprint = _data_fingerprint(cfg, info)
    if os.path.lexists(summary_path):
        summary = _read_run_file(summary_path, read_json)
        changed = data_changes(summary.get("data_fingerprint"), fingerprint)
        if changed:
            raise CheckpointError(
                f"{run_dir} holds a run that finished on other data: {'; '.join(changed)}. Pass resume=false to "
                "train on the data as it is now (the finished run is kept aside), restore the file, or choose "
                "another run.dir")
        log.info("this run is already complete (%s); nothing to do. Change the config, or pass resume=false "
                 "to train it again.", summary_path)
        return summary
    newest = _newest_trainer_state(run_dir)
    changed = data_changes(newest[1].get("data_fingerprint") if newest else None, fingerprint)
    if changed:
        raise CheckpointError(
            f"cannot resume {newest[0]}: its run trained on other data: {'; '.join(changed)}. Resuming would go on "
            "with rows it never saw (and its base-model scores are of the old split). Restore the file, pass "
            "resume=false to start over on the data as it is now (the interrupted run is kept aside), or choose "
            "another run.dir")
    conflicts = resume_conflicts(cfg, run_dir)
    if conflicts:
        raise CheckpointError(
            f"{run_dir} holds a run with another config ({'; '.join(conflicts[:3])}); rerun it with its own "
            "config to resume, choose a new run.dir, or pass resume=false to start over (the old run is kept aside)"
        )
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        if not os.path.exists(os.path.join(run_dir, "config.yaml")):  # a resume keeps the first dump
            write_config_dump(cfg, run_dir)
    dist.barrier()
    return _train(cfg, info, run_dir, summary_path, device, stop, fingerprint)


def _data_fingerprint(cfg: Config, info) -> Optional[dict]:
    """Rank 0's fingerprint of the data files (distft.data.sources.data_fingerprint), on every rank;
    None when a file cannot be read: the data loader reports that later in its own words (after
    the tokenizer and vocabulary checks, which come first), and nothing is compared."""
    from distft.data.sources import data_fingerprint
    from distft.errors import DataError

    found = None
    if info.is_main:
        try:
            found = data_fingerprint(cfg.data)
        except DataError:
            found = None
    return dist.all_gather_object(found)[0]


def _newest_trainer_state(run_dir: str) -> Optional[tuple[str, dict]]:
    """(the newest committed checkpoint, its trainer state), or None (none, or it cannot be read:
    find_resumable then reports it and falls back)."""
    from distft.checkpoint.store import committed_checkpoints, read_trainer_state

    for checkpoint in reversed(committed_checkpoints(run_dir)):
        try:
            return checkpoint, read_trainer_state(checkpoint)
        except (OSError, ValueError):
            continue
    return None


def _train(cfg: Config, info, run_dir: str, summary_path: str, device: torch.device, stop,
           fingerprint: Optional[dict] = None) -> dict:
    run = build_run(cfg, info, device)
    run.data_fingerprint = fingerprint or {}
    try:
        return _fit_and_finish(run, run_dir, summary_path, stop)
    finally:
        run.engine.close()


def _fit_and_finish(run: Run, run_dir: str, summary_path: str, stop) -> dict:
    from distft import preemption
    from distft.checkpoint.store import find_resumable
    from distft.techniques.build import base_model_context

    cfg, info = run.cfg, run.info
    checkpoint = find_resumable(run_dir)  # verified against its manifest, pickles scanned
    if checkpoint is None:  # starting from step 0: what an earlier attempt logged is not this run's
        if info.is_main:
            _set_attempt_aside(run_dir)
        dist.barrier()
    tracker = Tracker(cfg, run_dir, info.rank, run_id=_tracker_run_id(cfg, run_dir, info))
    state = TrainState()
    checkpointer = Checkpointer(run, run_dir, state)
    resumed_from = checkpointer.resume(checkpoint, tracker) if checkpoint else None
    preemption.set_phase("training")
    if resumed_from is None and cfg.eval.compare_base and not stop.requested():
        try:
            with base_model_context(run.engine.unwrapped()):
                state.eval_before = _evaluate(run, stop, "base model")
        except EvalInterrupted:
            state.eval_before = None
        else:
            if info.is_main:  # the same numbers on every rank: said once
                log.info("base model: %s", _fmt_eval(state.eval_before))
            tracker.log(0, {"eval_loss": state.eval_before["loss"]})
    if resumed_from is None:
        # Each rank its own dropout stream (the model was built identically on every rank above).
        torch.manual_seed(cfg.train.seed + info.rank)
    stopped = fit(run, state, tracker, checkpointer, stop)
    trained_bytes = run.memory.training()  # before the final evaluation and save
    if stopped:  # whatever checkpoint.save_every says, the work so far is kept; then requeue
        _stop(run, state, tracker, checkpointer, stop)
    preemption.set_phase("final")
    return finish(run, state, tracker, checkpointer, summary_path, resumed_from, trained_bytes, stop)


def _stop(run: Run, state: TrainState, tracker: Tracker, checkpointer: Checkpointer, stop, when: str = "") -> None:
    """Every rank, after a stop signal: the checkpoint of the step reached (unless it is saved
    already, or nothing was trained), then requeue or exit (raises Preempted)."""
    if checkpointer.last_step == state.step:
        saved = checkpointer.last  # the final save, the periodic one of this step, or the resumed checkpoint
    elif state.step == 0:
        saved = None
    else:
        saved = checkpointer.save(state.step)
    if not when and state.step == checkpointer.resumed_step:
        when = "before its first step" if state.step == 0 else f"before its first step after step {state.step}"
    preempted = stop.stop(state.step, saved, run.info.is_main, when=when)
    tracker.finish()
    dist.barrier()
    raise preempted


def _set_attempt_aside(run_dir: str) -> None:
    """Rank 0, when a run starts from step 0 in a directory an earlier attempt used (it stopped
    before its first checkpoint): its metrics, plot, report and W&B id move to
    `attempts/<time>/` (kept, never deleted), so this run's curve and W&B run start clean instead
    of appending to the old ones."""
    leftovers = [n for n in ("metrics.jsonl", "tracker_run_id", "wandb", "loss.png", REPORT, PREDICTIONS)
                 if os.path.lexists(os.path.join(run_dir, n))]
    if not leftovers:
        return
    aside = os.path.join(run_dir, "attempts", time.strftime("%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(aside):
        aside, n = f"{aside.rsplit('.', 1)[0]}.{n}", n + 1
    make_dirs(aside, run_dir, "the earlier attempt's files")
    for name in leftovers:
        os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    log.warning("no checkpoint to resume from: training starts at step 0; what an earlier attempt left (%s) was "
                "moved to %s", ", ".join(leftovers), aside)


def fit(run: Run, state: TrainState, tracker: Tracker, checkpointer: Checkpointer, stop) -> bool:
    """The optimizer steps, from state.step to train.max_steps: periodic evaluation (and early
    stopping), periodic saves, and the stop signals. Returns whether a signal stopped it (the last
    applied step's loss is state.last_train_loss)."""
    cfg, engine, info = run.cfg, run.engine, run.info
    accum = grad_accum_steps(cfg)
    # fp16: an inf grad norm with a finite loss is the loss scaler's own overflow skip, not a fault.
    fp16 = autocast_dtype(cfg.train.precision, run.device) == torch.float16
    progress = Progress(cfg.train.max_steps, state.step, info.is_main, cfg.train.log_every)
    iterator = iter(run.batches)
    # Weights in host memory (FSDP cpu_offload, ZeRO-3 offload_param): a norm of every shard on the
    # CPU each step would cost seconds; their finiteness is checked before every save instead.
    offloaded = cfg.parallel.fsdp.cpu_offload if cfg.parallel.strategy == "fsdp" else (
        cfg.parallel.strategy == "zero3" and cfg.parallel.deepspeed.offload_param)
    engine.train()
    steps_here = 0  # optimizer steps taken by this process (a resumed run starts later)
    # A signal during start-up or loading (StopSignal): stop before the first step, nothing new to save.
    stopped = state.step < cfg.train.max_steps and stop.requested()
    while state.step < cfg.train.max_steps and not stopped:
        started = time.time()
        micro_batches = [next(iterator) for _ in range(accum)]
        lr = engine.lr()  # what this step applies: the scheduler moves it on after the update
        loss_total, step_targets, grad_norm, local_finite = optimizer_step(engine, micro_batches, state.step + 1)
        state.step += 1
        step_time = time.time() - started
        steps_here += 1
        run.memory.step(steps_here)
        if steps_here == 1 and cfg.train.compile and info.is_main:
            from distft.engines.compile import compiled_summary

            line, broke = compiled_summary(time.time() - started)
            (log.warning if broke else log.info)("%s", line)
        step_tokens = sum(b["input_ids"].numel() for b in micro_batches) * info.world_size
        state.train_tokens += step_tokens
        state.train_target_tokens += int(step_targets)
        state.train_time_s += step_time
        step = state.step
        # Loss and grad norm are global (all-reduced), so every rank takes the same branch here.
        if not math.isfinite(loss_total) or (not math.isfinite(grad_norm) and not fp16):
            _nonfinite_step(step, loss_total, grad_norm, local_finite, cfg, state, tracker, checkpointer)
        else:
            if not offloaded:
                _check_weights_finite(engine, step)
            last_loss = state.last_train_loss = loss_total / max(step_targets, 1)
            state.train_loss_sum += loss_total
            state.train_loss_tokens += int(step_targets)
            tokens_per_s = step_tokens / max(step_time, 1e-9)
            if step % cfg.train.log_every == 0 or step == 1:
                tracker.log(step, {"loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                                   "tokens_per_s": tokens_per_s, "step_time_s": step_time})
            progress.update(step, last_loss, lr, tokens_per_s)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            if _periodic_eval(run, state, tracker):
                log.info("early stopping at step %d: eval loss did not improve for %d evals",
                         step, cfg.train.early_stopping_patience)
                state.stopped_early = True
                break
        checkpointer.poll()
        periodic = cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0
        if step < cfg.train.max_steps and (periodic or (state.best_step == step and saves_best(cfg))):
            checkpointer.save(step, background=cfg.checkpoint.async_save)
        if stop.requested() and step < cfg.train.max_steps:
            stopped = True
            break
    progress.close()
    checkpointer.finish()
    return stopped


def _best_note(state: TrainState, best: Optional[dict], last: str, final_loss: Optional[float]) -> Optional[str]:
    """The report's line on the best periodic eval: which checkpoint the report scores, and why."""
    if state.best_step is None:
        return None
    if not best and _best_of_run(state, best, final_loss)[0] == state.step:
        return (f"The last model (step {state.step}) is the best: its eval loss {final_loss:.4f} is below every "
                f"periodic eval's (the lowest, {state.best_eval_loss:.4f}, at step {state.best_step}).")
    if best:
        return (f"**Best checkpoint**: this report scores {os.path.basename(best['path'])}, the best periodic eval "
                f"loss ({best['eval_loss']:.4f} at step {best['step']}), because {best['why']}; the last checkpoint "
                f"is {os.path.basename(last)} (step {state.step}). `python -m distft.evaluate` and `distft.checkpoint.export` "
                "use the best one for this run directory too.")
    return (f"Best periodic eval loss: {state.best_eval_loss:.4f} at step {state.best_step}; this report scores the "
            f"last model (step {state.step}). checkpoint.keep_best=true (or early stopping) keeps and scores the best.")


def _best_of_run(state: TrainState, best: Optional[dict], final_loss: Optional[float]) -> tuple:
    """(step, eval loss) of the run's lowest held-out loss, for the summary and loss.png: the best
    periodic eval's, or the last step's when the final evaluation scored the last model at least as
    well (as _best_note says, and best.json with keep_best). (None, None) without periodic evals."""
    if state.best_step is None:
        return None, None
    if not best and final_loss is not None and final_loss <= state.best_eval_loss:
        return state.step, final_loss
    return state.best_step, state.best_eval_loss


def saves_best(cfg: Config) -> bool:
    """Whether each new best periodic eval loss gets its checkpoint: with early stopping (which
    ends the run past its best) or checkpoint.keep_best."""
    return bool(cfg.train.eval_every) and (cfg.checkpoint.keep_best or cfg.train.early_stopping_patience > 0)


def _use_best(run: Run, state: TrainState, checkpointer: Checkpointer) -> Optional[dict]:
    """After the final save: the best checkpoint's pointer (checkpoint.read_best) when the run's
    result is its best checkpoint rather than its last, else None. That is when early
    stopping fired (the last evals were worse) or with checkpoint.keep_best; then the best weights
    are loaded into the engine for the final evaluation, and best.json is made the run
    directory's default for evaluate and export. With keep_best the last model is first scored
    on held-out loss, and stays the result when it is at least as good."""
    from distft.checkpoint.store import read_best, write_best
    from distft.evaluation.evaluate import held_out_loss

    cfg, info = run.cfg, run.info
    if not (state.stopped_early or cfg.checkpoint.keep_best) or state.best_step is None:
        return None
    best = read_best(checkpointer.run_dir)
    if best is None or best["step"] != state.best_step:
        log.warning("the best eval loss (step %d) has no checkpoint; the final report scores the last model (step "
                    "%d)", state.best_step, state.step)
        return None
    why = f"training stopped early at step {state.step}" if state.stopped_early else "checkpoint.keep_best=true"
    if not state.stopped_early and best["step"] != state.step:
        last = held_out_loss(run.engine.unwrapped(), run.held_out, run.engine.device, autocast_ctx=run.engine.autocast)
        run.engine.train()
        if last["loss"] is not None and last["loss"] <= best["eval_loss"]:
            if info.is_main:  # the last model is the best: it becomes best.json's checkpoint
                write_best(checkpointer.run_dir, state.step, last["loss"], default=True, why=why)
            dist.barrier()
            return None
    if best["step"] != state.step:
        checkpointer.load_weights(best["path"])
        log.info("the run's result is its best checkpoint %s (eval loss %.4f at step %d; %s)", best["path"],
                 best["eval_loss"], best["step"], why)
    if info.is_main:
        write_best(checkpointer.run_dir, best["step"], best["eval_loss"], default=True, why=why)
    dist.barrier()
    return {**best, "default": True, "why": why}


def finish(run: Run, state: TrainState, tracker: Tracker, checkpointer: Checkpointer, summary_path: str,
           resumed_from: Optional[str], trained_bytes: int, stop) -> dict:
    """After the last step: the final save, then the final evaluation, the report and the summary.

    Saved first: a stop signal during the evaluation (a time limit) then loses nothing trained;
    the run requeues (or exits 4 / 130) and its rerun resumes from the final checkpoint, takes no
    step, and only evaluates and reports."""
    from distft import preemption
    from distft.evaluation.evaluate import metrics_only
    from distft.evaluation.report import overfitting, write_predictions, write_report
    from distft.tracking import read_metrics

    cfg, info, run_dir = run.cfg, run.info, checkpointer.run_dir
    eval_before = state.eval_before
    final_checkpoint = checkpointer.last if checkpointer.last_step == state.step else checkpointer.save(state.step)
    best = _use_best(run, state, checkpointer)
    evaluated = best["path"] if best else final_checkpoint
    try:
        eval_after = _evaluate(run, stop, "tuned model")
    except EvalInterrupted:
        _stop(run, state, tracker, checkpointer, stop, when=f"during the final evaluation, after step {state.step}")
    if info.is_main:  # the same numbers on every rank: said once
        log.info("tuned model: %s", _fmt_eval(eval_after))
    # The best checkpoint's loss is on the curve at its own step already: not again at the last.
    tracker.log(state.step, {"result_eval_loss" if best else "eval_loss": eval_after["loss"]})
    best_step, best_loss = _best_of_run(state, best, eval_after["loss"])

    tokens_per_s = state.train_tokens / max(state.train_time_s, 1e-9)
    arch = run.model.config  # the real architecture (a local checkpoint's config.json wins over the preset)
    flops_token = flops_per_token(run.total, arch.num_hidden_layers, arch.hidden_size, cfg.data.max_seq_len,
                                  full=cfg.technique.name == "full")
    memory_report = _memory_report(cfg, run.memory, trained_bytes, run.dtype, info)

    summary = {
        "experiment": cfg.run.experiment,
        "technique": cfg.technique.name,
        "parallel": cfg.parallel.strategy,
        "engine": type(run.engine).__name__,
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
        "memory": memory_report,
        "final_train_loss": state.last_train_loss,  # the last step's (token-weighted) loss
        # Token-weighted mean over every applied step of the run, resumes included: what Hugging
        # Face's Trainer reports as train_loss (it averages per-step losses; same with equal batches).
        "mean_train_loss": state.train_loss_sum / state.train_loss_tokens if state.train_loss_tokens else None,
        "stopped_early": state.stopped_early,
        "trainable_params": run.trainable,
        "total_params": run.total,
        "data": run.data.report.as_dict(),
        "data_fingerprint": run.data_fingerprint,  # the data files by content: a rerun on other data is refused
        "eval_before": metrics_only(eval_before) if eval_before else None,
        "eval_after": metrics_only(eval_after),
        "final_checkpoint": final_checkpoint,
        # The run's result: what the final report scored, and what evaluate and export use by
        # default (its best checkpoint after early stopping or with checkpoint.keep_best).
        "evaluated_checkpoint": evaluated,
        "best_step": best_step,
        "best_eval_loss": best_loss,
        "resumed_from": resumed_from,
        "nonfinite_steps": state.nonfinite_steps,
        "requeues": requeue_count(),  # times SLURM requeued this job (preemption, time limit)
    }
    if info.is_main:
        meta = {"experiment": cfg.run.experiment, "technique": cfg.technique.name, "model": model_label(cfg.model),
                "checkpoint": evaluated, "steps": state.step}
        if best:
            meta["checkpoint"] = (f"{evaluated} (the best eval loss, {best['eval_loss']:.4f} at step {best['step']}; "
                                  f"{best['why']}; the last checkpoint is {final_checkpoint})")
        report = os.path.join(run_dir, REPORT)
        predictions = write_predictions(predictions_path(report), {"base": eval_before, "tuned": eval_after})
        notes = [note for note in [_best_note(state, best, final_checkpoint, eval_after["loss"]),
                                   overfitting(read_metrics(tracker.metrics_path), cfg.eval.overfit_evals)] if note]
        intro = ""
        if cfg.data.source == "synthetic" and not cfg.data.sources:
            from distft.data.synthetic import what_it_shows

            intro = what_it_shows(list(cfg.data.synthetic.tasks), eval_after, eval_before, state.step, run.total)
        write_report(report, eval_before, eval_after, meta, num_samples=cfg.eval.report_samples,
                     predictions=predictions, notes=notes, intro=intro)
        tracker.predictions(state.step, predictions)
        if cfg.tracking.plot:
            plot_losses(tracker.metrics_path, os.path.join(run_dir, "loss.png"), best_step=best_step)
        tracker.summary(summary)
        write_json(summary_path, summary, what="the run's summary")
        if eval_before:
            log.info(
                "base -> tuned on %d held-out prompts: loss %.3f -> %.3f, exact match %.3f -> %.3f",
                min(cfg.eval.num_samples, len(run.data.eval_rows)), eval_before["loss"], eval_after["loss"],
                eval_before["exact_match"], eval_after["exact_match"],
            )
        plot = os.path.join(run_dir, "loss.png") if cfg.tracking.plot else None
        for line in closing_lines(run_dir, evaluated, plot, tracker.where()):
            log.info(line)
    preemption.set_phase("finished")  # from here a signal has nothing to stop: the run is complete
    tracker.finish()
    dist.barrier()  # leave together: a rank tearing its process group down early can abort its peers
    return summary


def optimizer_step(engine, micro_batches: list[dict], step: int = 0) -> tuple[float, int, float, bool]:
    """One optimizer step over this rank's micro-batches: (summed loss, target tokens, grad norm,
    whether this rank's own loss was finite); loss and tokens are sums over all ranks, the grad
    norm is global. The engine does not apply a step whose grad norm is not finite.

    Each micro-batch's summed token loss is divided by the target-token count of the whole step,
    so every target token weighs the same however the step is split into micro-batches.
    """
    from distft import faults, preemption

    device = engine.device
    faults.wait_for_signal(step, preemption.received)
    faults.crash(step)
    step_targets = torch.tensor(
        float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)), device=device
    )
    dist.all_reduce_sum(step_targets)
    loss_total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        with engine.accumulating(last_micro_step=i == len(micro_batches) - 1):
            # The head and the loss together, chunk by chunk: no full logits (distft.model.loss).
            with computing_loss(engine.unwrapped(), batch["labels"].to(device)) as armed:
                loss_sum, _ = armed.result(engine.forward(batch))
            if i == 0 and faults.corrupt_loss(step):
                loss_sum = loss_sum * float("nan")  # as an overflow would: the gradients turn NaN too
            engine.backward(loss_sum / step_targets.clamp(min=1))
        loss_total += loss_sum.detach()
    local_finite = bool(torch.isfinite(loss_total))
    grad_norm = engine.step()
    if faults.corrupt_weights(step):
        with torch.no_grad():  # as a bad update would: one trainable weight turns NaN
            _local(next(p for p in engine.unwrapped().parameters() if p.requires_grad)).view(-1)[0] = float("nan")
    dist.all_reduce_sum(loss_total)
    return float(loss_total), int(step_targets.item()), grad_norm, local_finite


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: ZeRO-3's partition, an FSDP2 DTensor's shard."""
    if getattr(param, "ds_tensor", None) is not None:
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters with a NaN or inf in this rank's part of them. One fused
    norm per parameter and a single host sync, so it can run after every step: the norm of finite
    values is finite (float32 accumulation), of anything else not."""
    named = [(name, _local(p)) for name, p in model.named_parameters() if p.requires_grad]
    named = [(name, t) for name, t in named if t.numel()]
    if not named:
        return []
    norms = torch._foreach_norm([t for _, t in named])
    finite = torch.isfinite(torch.stack([n.float() for n in norms]))
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def _check_weights_finite(engine, step: int) -> None:
    """Every rank, after an applied step: a step that left any trainable weight non-finite (an
    update that overflowed, fp16 arithmetic) ends the run before anything is saved from it."""
    bad = nonfinite_parameters(engine.unwrapped())
    if not dist.any_rank(bool(bad), engine.device):
        return
    names = dist.all_gather_object(bad[:3])
    where = "; ".join(f"rank {r}: {', '.join(n)}" for r, n in enumerate(names) if n)
    raise NonFiniteError(
        f"step {step} left trainable weights non-finite ({where}) although its loss and gradients were finite; "
        "stopped without saving anything from it (checkpoints already written are untouched; rerunning resumes from "
        "the newest). Lower train.lr, or use model.dtype=float32/bfloat16 weights (fp16 weights cannot hold AdamW's "
        "updates)")


def _nonfinite_step(step, loss_total, grad_norm, local_finite, cfg: Config, state: TrainState, tracker: Tracker,
                    checkpointer: Checkpointer) -> None:
    """A step whose loss or grad norm was not finite: the engine applied nothing. Count it, and
    under train.nonfinite=halt (or past train.max_nonfinite_steps) save and stop."""
    bad_ranks = [r for r, ok in enumerate(dist.all_gather_object(local_finite)) if not ok]
    state.nonfinite_steps += 1
    tracker.log(step, {"nonfinite": 1, "nonfinite_steps": state.nonfinite_steps, "grad_norm": grad_norm})
    where = f"rank{'s' if len(bad_ranks) > 1 else ''} {', '.join(map(str, bad_ranks))}" if bad_ranks else "all ranks"
    what = f"loss {loss_total} (non-finite on {where}), grad norm {grad_norm}"
    too_many = state.nonfinite_steps > cfg.train.max_nonfinite_steps
    if cfg.train.nonfinite == "halt" or too_many:
        path = checkpointer.save(step)
        reason = ("train.nonfinite=halt" if not too_many
                  else f"{state.nonfinite_steps} skipped steps > train.max_nonfinite_steps")
        raise NonFiniteError(
            f"non-finite step {step}: {what}; stopped ({reason}). The update was not applied; checkpoint {path} "
            "holds the model before it (rerunning resumes after this batch). Lower train.lr, keep train.grad_clip > "
            "0, or use train.precision=bf16 instead of fp16"
        )
    log.warning("step %d skipped: %s; parameters unchanged (%d skipped so far, train.nonfinite=skip)",
                step, what, state.nonfinite_steps)


def _tracker_run_id(cfg: Config, run_dir: str, info) -> str:
    """The W&B run id of this run directory: chosen once, kept in the directory, so a resumed
    (or resharded) run continues the same curve."""
    path = os.path.join(run_dir, "tracker_run_id")
    if info.is_main and not os.path.exists(path):
        # Random suffix: a run started over (resume=false) is a new W&B run, not the old one continued.
        write_text(path, f"{cfg.run.experiment}-{config_hash(cfg)}-{os.urandom(3).hex()}\n")
    dist.barrier()
    return _read_run_file(path, read_text).strip()


def _read_run_file(path: str, read):
    """A small file of the run directory read with `read` (files.read_json / read_text: regular
    files only, never a planted link or FIFO); what cannot be read is a CheckpointError naming it."""
    try:
        value = read(path, max_bytes=16 << 20)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the run directory is damaged: remove that file to "
                              "resume, or pass resume=false to start over (the old run is kept aside)") from None
    if read is read_json and not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object; the run directory is damaged: remove that file to "
                              "resume, or pass resume=false to start over (the old run is kept aside)")
    return value


def _quiet_libraries() -> None:
    """Library progress bars ("Loading weights", "Writing model shards") drown the run's own
    output in logs, as do the few library messages tracking.quiet_libraries names; other
    warnings still show."""
    import transformers

    quiet_libraries()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _evaluate(run: Run, stop=None, label: str = "evaluation") -> dict:
    """The base's or the tuned model's evaluation (`label` names it in the progress lines); with
    `stop`, a stop signal ends it at the next batch (every rank alike) by raising EvalInterrupted."""
    from distft.evaluation.evaluate import evaluate_model

    engine = run.engine
    progress = GenerationProgress(f"{label}: generating", enabled=run.info.is_main)
    result = evaluate_model(engine.unwrapped(), run.tokenizer, run.held_out, run.data.eval_rows, run.cfg.eval,
                            engine.device, stop_ids=run.data.stop_ids, autocast_ctx=engine.autocast,
                            should_stop=stop.requested if stop is not None else None, general=run.general,
                            progress=progress)
    if run.cfg.eval.lm_eval_tasks:  # every rank alike (unsharded engines only: validation), no collectives
        from distft.evaluation.forgetting import run_lm_eval

        result["lm_eval"] = run_lm_eval(engine.unwrapped(), run.tokenizer, list(run.cfg.eval.lm_eval_tasks),
                                        run.cfg.eval.lm_eval_include_path, run.cfg.eval.lm_eval_limit,
                                        run.cfg.eval.batch_size, engine.device)
    engine.train()
    return result


def _periodic_eval(run: Run, state: TrainState, tracker: Tracker) -> bool:
    """Held-out loss during training; True when early stopping says stop."""
    from distft.evaluation.evaluate import held_out_loss

    engine, cfg = run.engine, run.cfg
    result = held_out_loss(engine.unwrapped(), run.held_out, engine.device, autocast_ctx=engine.autocast)
    engine.train()
    tracker.log(state.step, {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]})
    log.info("step %d eval loss %.4f perplexity %.3f", state.step, result["loss"], result["perplexity"])
    if result["loss"] < state.best_eval_loss - cfg.train.early_stopping_min_delta:
        state.best_eval_loss, state.best_step = result["loss"], state.step
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    patience = cfg.train.early_stopping_patience
    return patience > 0 and state.evals_without_improvement >= patience


class Checkpointer:
    """Every stateful part of a run, saved and restored in one place: the engine's state (weights,
    optimizer, schedule, scaler), the data position, the loop's TrainState and every rank's RNG
    (distft/checkpoint/store.py writes and verifies them). Saves are synchronous, or with
    `checkpoint.async_save` written in the background and committed at the first step boundary
    where every rank's write is done."""

    def __init__(self, run: Run, run_dir: str, state: TrainState):
        self.run, self.run_dir, self.state = run, run_dir, state
        self.pending = None
        self.last, self.last_step = None, None  # the newest checkpoint this run committed (or resumed from)
        self.resumed_step = 0  # the step this process started from

    def save(self, step: int, background: bool = False) -> Optional[str]:
        """Every rank. Returns the committed directory, or None while it is written in the background."""
        from distft.checkpoint.store import save_checkpoint

        run = self.run
        self.finish()  # one write at a time, in step order
        bad = nonfinite_parameters(run.engine.unwrapped())
        if dist.any_rank(bool(bad), run.device):  # never a checkpoint (or summary) of non-finite weights
            raise NonFiniteError(f"refusing to save step {step}: trainable weights are non-finite "
                                 f"({', '.join(bad[:3]) or 'on another rank'}); earlier checkpoints are untouched")
        weights = run.engine.gathered_state_dict()  # collective: every rank takes part
        trainer_state = {"step": step, "loop": self.state.state_dict(), "data": run.batches.state_dict(),
                         "world_size": run.info.world_size, "parallel": run.cfg.parallel.strategy,
                         "data_fingerprint": run.data_fingerprint,
                         "formats": run.data.report.formats}  # what chat/compare/export prompt in
        result = save_checkpoint(self.run_dir, step, run.engine, run.tokenizer, run.cfg, trainer_state, weights,
                                 background=background)
        if isinstance(result, str):
            self.last, self.last_step = result, step
            return result
        self.pending = result
        log.info("checkpoint of step %d: writing in the background", step)
        return None

    def poll(self) -> None:
        """Every rank, at each step boundary: commit the background write once all ranks finished it."""
        if self.pending is not None and not dist.any_rank(not self.pending.written(), self.run.device):
            self.finish()

    def finish(self) -> Optional[str]:
        """Every rank: wait for a background write and commit it."""
        from distft.checkpoint.store import commit_checkpoint

        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        self.last, self.last_step = commit_checkpoint(pending), pending.step
        return self.last

    def load_weights(self, checkpoint: str) -> None:
        """Every rank: the engine's training state (weights, optimizer, schedule) from `checkpoint`,
        a verified one of this run, every torch.load through the safe-load allow-list; the loop's
        own state is left as it is (`resume` restores that too)."""
        from distft.checkpoint.safe_load import refusal, weights_only_loads
        from distft.checkpoint.store import STATE_DIR

        try:
            with weights_only_loads():  # and every torch.load of the engine's loader through the allow-list
                self.run.engine.load_state(os.path.join(checkpoint, STATE_DIR))
        except Exception as err:
            refused = refusal(err)
            if refused is None:
                raise
            raise CheckpointError(f"refusing to load {checkpoint}: {refused}; nothing in it was run. Delete that "
                                  "checkpoint (or pass resume=false) if you did not write it") from None

    def resume(self, checkpoint: str, tracker: Tracker) -> str:
        """Continue from `checkpoint` (the run directory's newest sound one: find_resumable):
        weights, optimizer and schedule, data position, loop counters and every rank's RNG, so the
        rest of the run is the one an uninterrupted run would have had. Metrics logged after that
        step are dropped. On another number of ranks the state is resharded; the dropout streams
        (per-rank RNG) are then reseeded, so the run continues validly but not bit for bit."""
        from distft.checkpoint.store import load_rng, read_trainer_state

        run, state = self.run, self.state
        trainer_state = read_trainer_state(checkpoint)
        self.load_weights(checkpoint)
        try:
            run.batches.load_state_dict(trainer_state["data"])
        except ValueError as err:
            raise CheckpointError(f"cannot resume from {checkpoint}: {err}") from err
        state.load_state_dict(trainer_state["loop"])
        if trainer_state["world_size"] != run.info.world_size or not load_rng(checkpoint, run.info.rank):
            torch.manual_seed(run.cfg.train.seed + run.info.rank + 1_000_003 * state.step)
            log.info("resharded from %d to %d ranks: dropout streams reseeded", trainer_state["world_size"],
                     run.info.world_size)
        tracker.truncate_after(state.step)
        self.last, self.last_step = checkpoint, state.step  # nothing to save again at this step
        self.resumed_step = state.step
        log.info("resuming from %s (step %d)", checkpoint, state.step)
        return checkpoint


def _memory_report(cfg: Config, memory: MemoryMeter, trained_bytes: int, dtype: torch.dtype, info) -> dict:
    """Measured training memory of every rank next to the planner's estimate for this config
    (the model dtype as trained; the planner's fixed overhead left out, see MemoryMeter)."""
    import dataclasses

    per_rank = dist.all_gather_object(trained_bytes)
    report = {"kind": memory.kind, "start_gb": round(memory.baseline / 2**30, 3),
              "cpu_profiled_steps": memory.cpu_steps if memory.kind == "cpu_tensors" else None,
              "training_gb_per_rank": [round(b / 2**30, 4) for b in per_rank], "planned_gb": None, "planned": None}
    if not info.is_main:  # the summary is rank 0's
        return report
    try:
        from distft.plan import count_parameters, per_gpu_bytes, with_architecture

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
    "cuda_allocated": "peak CUDA memory allocated by tensors",
    "cpu_tensors": "peak memory of live tensors (torch profiler)",
    "host_rss": "peak resident memory of the process",
}


def memory_line(kind: str, measured: int, baseline: int, planned: dict) -> str:
    """The one sentence comparing what training took with the planner's estimate of the same
    terms: the largest rank's measured peak above what the process held before (so: weights,
    gradients, optimizer state, activations), the plan's sum of exactly those terms (its fixed
    overhead, the CUDA context and allocator slack, left out), and how far off the plan is."""
    gib = 2**30
    plan = sum(planned.values())
    start = f", above the {baseline / gib:.3f} GiB held before the model was built" if baseline else ""
    terms = " + ".join(f"{name} {value:.3f}" for name, value in planned.items() if value)
    off = (plan * gib / measured - 1) if measured else 0.0
    verdict = f"{abs(off):.1%} {'over' if off > 0 else 'under'}" if round(abs(off), 3) else "exact"
    # The resident set also holds the code the first steps import: no verdict on it (said below).
    judged = f"plan {verdict}; " if kind != "host_rss" else ""
    line = (f"memory per rank: measured {measured / gib:.3f} GiB on the busiest rank ({MEASURED.get(kind, kind)}"
            f"{start}), planned {plan:.3f} GiB for the same terms ({judged}{terms} GiB, its fixed "
            "overhead left out)")
    if kind == "host_rss":  # it also grows with the code the first steps import: not comparable to a plan
        line += "; tracking.cpu_memory_steps=2 measures tensors only, as the plan counts"
    return line


def closing_lines(run_dir: str, checkpoint: str, plot: Optional[str], wandb: Optional[tuple[str, str]]) -> list[str]:
    """What a finished run's last lines say: where its files are, the W&B run (offline: the
    command that uploads it), and the next commands, each ready to paste."""
    from shlex import quote as shell_quote

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


def _fmt_eval(result: dict) -> str:
    return (f"loss {result['loss']:.4f} perplexity {result['perplexity']:.3f} exact_match {result['exact_match']:.3f} "
            f"f1 {result['f1']:.3f} rouge_l {result['rouge_l']:.3f}")
