"""The central training loop: one plain function from a typed Config to a finished run.

`train(cfg)`: set the process up, own the run directory, decide resume or start
(checkpoint/resume.py), `build_run` (tokenizer + data -> model + technique -> engine -> batches;
distft/run.py), evaluate the base, `fit` (the steps, periodic eval and saves, signals), `finish`
(final save and evaluation; summary.py writes what people read). A `Checkpointer`
(checkpoint/checkpointer.py) saves and restores every stateful part; the loop's own state is a
`TrainState`. The loop only talks to the `Engine` interface, so every technique on every
parallelism strategy runs through the same lines.

Gradient accumulation weights every target token equally: each micro-batch contributes its
*summed* token loss divided by the number of target tokens in the whole optimizer step (over all
micro-batches and ranks). So micro-batch 1 x 4 accumulations gives the same update as
micro-batch 4 x 1, whatever the lengths of the samples.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from typing import Optional

import numpy as np
import torch

from distft import dist, faults, preemption
from distft.checkpoint.checkpointer import Checkpointer, best_note, best_of_run, nonfinite_parameters, saves_best
from distft.checkpoint.resume import owning_run_dir, prepare_run_dir, set_attempt_aside, tracker_run_id
from distft.checkpoint.verify import find_resumable
from distft.config import Config, grad_accum_steps
from distft.config import run_dir as config_run_dir
from distft.engines import autocast_dtype, prepare_device
from distft.engines.compile import compiled_summary
from distft.errors import NonFiniteError
from distft.evaluation.evaluate import AnswerLog, EvalInterrupted, evaluate_model, held_out_loss
from distft.evaluation.forgetting import run_lm_eval
from distft.model.build import IGNORE_INDEX
from distft.model.loss import computing_loss
from distft.objective import preference_eval, preference_step, reference_tables
from distft.preemption import StopSignal
from distft.run import Run, TrainState, build_run
from distft.summary import LEFT_BY_AN_ATTEMPT, fmt_eval, summarize, write_results
from distft.techniques.build import base_model_context
from distft.tracking import GenerationProgress, Progress, Tracker, quiet_libraries, setup_logging

log = logging.getLogger("distft")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def train(cfg: Config) -> dict:
    """Train, evaluate against the base, checkpoint and report. Returns the summary dict."""
    info = dist.from_env()
    setup_logging(info.rank)
    quiet_libraries(every_bar=True)
    run_dir = config_run_dir(cfg)
    if info.is_main:
        print(f"run_dir: {run_dir}", flush=True)
    seed_everything(cfg.train.seed)
    device = dist.pick_device(cfg.train.device, info)
    prepare_device(device)
    threads, why = dist.share_cpu_threads(device)
    if device.type == "cpu":  # this rank's own: every rank says it
        log.info("torch threads: %d (%s)", threads, why)
    with contextlib.ExitStack() as cleanup:  # undone in reverse: engine, lock, signals, process group
        # A process group the caller made (a script or a test running several trainings in one group)
        # is left to the caller; the one made here (or by the engine: DeepSpeed's 1-rank group) goes with the run.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            cleanup.callback(dist.shutdown)
        dist.init(info, cfg.parallel.backend, cfg.parallel.timeout_s, device)
        # The handlers were installed when the process started (preemption.install, by the entry
        # point); a signal that came before now still stops the run, before its first step.
        stop = StopSignal(cfg, device)
        cleanup.callback(stop.close)
        cleanup.enter_context(owning_run_dir(run_dir, info))
        preemption.set_phase("loading")
        finished, fingerprint = prepare_run_dir(cfg, info, run_dir)
        if finished is not None:
            return finished
        run = build_run(cfg, info, device)
        run.data_fingerprint = fingerprint
        if run.pairs is not None:  # the reference: the model as built, before a resume loads trained weights
            run.reference = reference_tables(run, run_dir)
        cleanup.callback(run.engine.close)
        checkpoint = find_resumable(run_dir)  # verified against its manifest, pickles scanned
        if checkpoint is None:  # starting from step 0: what an earlier attempt logged is not this run's
            if info.is_main:
                set_attempt_aside(run_dir, LEFT_BY_AN_ATTEMPT)
            dist.barrier()
        tracker = Tracker(cfg, run_dir, info.rank, run_id=tracker_run_id(cfg, run_dir, info))
        state = TrainState()
        checkpointer = Checkpointer(run, run_dir, state)
        resumed_from = checkpointer.resume(checkpoint, tracker) if checkpoint else None
        preemption.set_phase("training")
        if resumed_from is None:
            _evaluate_base(run, state, tracker, stop)
            torch.manual_seed(cfg.train.seed + info.rank)  # each rank its own dropout stream
        stopped = fit(run, state, tracker, checkpointer, stop)
        trained_bytes = run.memory.training()  # before the final evaluation and save
        if stopped:  # whatever checkpoint.save_every says, the work so far is kept; then requeue
            _stop(run, state, tracker, checkpointer, stop)
        preemption.set_phase("final")
        return finish(run, state, tracker, checkpointer, resumed_from, trained_bytes, stop)


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
    engine.train()
    steps_here = 0  # optimizer steps taken by this process (a resumed run starts later)
    # A signal during start-up or loading (StopSignal): stop before the first step, nothing new to save.
    stopped = state.step < cfg.train.max_steps and stop.requested()
    while state.step < cfg.train.max_steps and not stopped:
        started = time.time()
        micro_batches = [next(iterator) for _ in range(accum)]
        lr = engine.lr()  # what this step applies: the scheduler moves it on after the update
        if run.pairs is not None:  # objective=dpo: step_targets counts pairs, the loss is per pair
            loss_total, step_targets, grad_norm, local_finite, pair_metrics = preference_step(
                engine, micro_batches, cfg.objective, run.reference["train"], state.step + 1)
        else:
            loss_total, step_targets, grad_norm, local_finite = optimizer_step(engine, micro_batches, state.step + 1)
            pair_metrics = {}
        state.step += 1
        step_time = time.time() - started
        steps_here += 1
        run.memory.step(steps_here)
        if steps_here == 1 and info.is_main:
            preemption.record_startup(checkpointer.run_dir)  # what the next submission's time limit must hold
        if steps_here == 1 and cfg.train.compile and info.is_main:
            line, broke = compiled_summary(time.time() - started)
            (log.warning if broke else log.info)("%s", line)
        step_tokens = sum(b["input_ids"].numel() for b in micro_batches) * info.world_size
        state.train_tokens += step_tokens
        state.train_target_tokens += int(pair_metrics.get("answer_tokens", step_targets))
        state.train_time_s += step_time
        step = state.step
        # Loss and grad norm are global (all-reduced), so every rank takes the same branch here.
        if not math.isfinite(loss_total) or (not math.isfinite(grad_norm) and not fp16):
            _nonfinite_step(step, loss_total, grad_norm, local_finite, cfg, state, tracker, checkpointer)
        else:
            # Weights in host memory: a norm of every shard on the CPU each step would cost
            # seconds; their finiteness is checked before every save instead.
            if not engine.weights_offloaded:
                _check_weights_finite(engine, step)
            last_loss = state.last_train_loss = loss_total / max(step_targets, 1)
            state.train_loss_sum += loss_total
            state.train_loss_tokens += int(step_targets)
            tokens_per_s = step_tokens / max(step_time, 1e-9)
            if step % cfg.train.log_every == 0 or step == 1:
                tracker.log(step, {"loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                                   "tokens_per_s": tokens_per_s, "step_time_s": step_time,
                                   **{k: v for k, v in pair_metrics.items() if k != "answer_tokens"}})
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


def optimizer_step(engine, micro_batches: list[dict], step: int = 0) -> tuple[float, int, float, bool]:
    """One optimizer step over this rank's micro-batches: (summed loss, target tokens, grad norm,
    whether this rank's own loss was finite); loss and tokens are sums over all ranks, the grad
    norm is global. The engine does not apply a step whose grad norm is not finite.

    Each micro-batch's summed token loss is divided by the target-token count of the whole step,
    so every target token weighs the same however the step is split into micro-batches.
    """
    device = engine.device
    faults.wait_for_signal(step, preemption.received)
    faults.crash(step)
    faults.kill_at(step)
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
            trainable = next(p for p in engine.unwrapped().parameters() if p.requires_grad)
            engine.local_shard(trainable).view(-1)[0] = float("nan")
    dist.all_reduce_sum(loss_total)
    return float(loss_total), int(step_targets.item()), grad_norm, local_finite


def finish(run: Run, state: TrainState, tracker: Tracker, checkpointer: Checkpointer, resumed_from: Optional[str],
           trained_bytes: int, stop) -> dict:
    """After the last step: the final save, then the final evaluation, the report and the summary.

    Saved first: a stop signal during the evaluation (a time limit) then loses nothing trained;
    the run requeues (or exits 4 / 130) and its rerun resumes from the final checkpoint, takes no
    step, and only evaluates and reports. The answers are kept as they come (AnswerLog, in the run
    directory until the results are written), so the rerun generates only those still missing: an
    evaluation longer than a job segment finishes over several."""
    info, run_dir = run.info, checkpointer.run_dir
    final_checkpoint = checkpointer.save_final()
    best = checkpointer.use_best(lambda: _held_out_loss(run)["loss"])
    cfg = run.cfg
    answers = AnswerLog.open(run_dir, best["path"] if best else final_checkpoint, best["step"] if best else state.step,
                             {"precision": cfg.train.precision, "device": run.device.type,
                              "parallel": cfg.parallel.strategy},
                             writes=info.is_main, share=lambda seen: dist.all_gather_object(seen)[0])
    try:
        eval_after = _evaluate(run, stop, "tuned model", answers=answers)
    except EvalInterrupted as interrupted:  # progress: a step trained or a prompt answered by this process
        _stop(run, state, tracker, checkpointer, stop, when=f"during the final evaluation, after step {state.step}",
              progress=state.step > checkpointer.resumed_step or interrupted.answered_now > 0)
    if info.is_main:  # the same numbers on every rank: said once
        log.info("tuned model: %s", fmt_eval(eval_after))
    # The best checkpoint's loss is on the curve at its own step already: not again at the last.
    tracker.log(state.step, {"result_eval_loss" if best else "eval_loss": eval_after["loss"]})
    checkpoints = {"final": final_checkpoint, "evaluated": best["path"] if best else final_checkpoint,
                   "resumed_from": resumed_from}
    summary = summarize(run, state, eval_after, run_dir, checkpoints, best_of_run(state, best, eval_after["loss"]),
                        trained_bytes)
    if info.is_main:
        write_results(run, state, tracker, summary, eval_after, best,
                      notes=[best_note(state, best, final_checkpoint, eval_after["loss"])])
        answers.remove()  # the answers are in the results now: a finished run keeps no partial file
    preemption.set_phase("finished")  # from here a signal has nothing to stop: the run is complete
    tracker.finish()
    dist.barrier()  # leave together: a rank tearing its process group down early can abort its peers
    preemption.ignore_late_signals()  # complete: a time limit's signal during teardown must not fail it
    return summary


def _stop(run: Run, state: TrainState, tracker: Tracker, checkpointer: Checkpointer, stop, when: str = "",
          progress: bool = True) -> None:
    """Every rank, after a stop signal: the checkpoint of the step reached (unless it is saved
    already, or nothing was trained), then requeue or exit (raises Preempted, or SegmentTooShort
    when this segment made no progress before its time limit: `progress`, and no step taken)."""
    if checkpointer.last_step == state.step:
        saved = checkpointer.last  # the final save, the periodic one of this step, or the resumed checkpoint
    elif state.step == 0:
        saved = None
    else:
        saved = checkpointer.save(state.step)
    if not when and state.step == checkpointer.resumed_step:
        when = "before its first step" if state.step == 0 else f"before its first step after step {state.step}"
        progress = False
    preempted = stop.stop(state.step, saved, run.info.is_main, when=when, progress=progress)
    tracker.finish()
    dist.barrier()
    preemption.ignore_late_signals()  # every rank leaves with the same code, whatever comes now
    faults.sleep_at("exit")
    raise preempted


def _check_weights_finite(engine, step: int) -> None:
    """Every rank, after an applied step: a step that left any trainable weight non-finite (an
    update that overflowed, fp16 arithmetic) ends the run before anything is saved from it."""
    bad = nonfinite_parameters(engine)
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


def _evaluate_base(run: Run, state: TrainState, tracker: Tracker, stop) -> None:
    """Before the first step (eval.compare_base): the base model's scores, for the report."""
    if not run.cfg.eval.compare_base or stop.requested():
        return
    try:
        with base_model_context(run.engine.unwrapped()):
            state.eval_before = _evaluate(run, stop, "base model")
    except EvalInterrupted:
        state.eval_before = None
        return
    if run.info.is_main:  # the same numbers on every rank: said once
        log.info("base model: %s", fmt_eval(state.eval_before))
    tracker.log(0, {"eval_loss": state.eval_before["loss"]})


def _evaluate(run: Run, stop=None, label: str = "evaluation", answers: Optional[AnswerLog] = None) -> dict:
    """The base's or the tuned model's evaluation (`label` names it in the progress lines); with
    `stop`, a stop signal ends it at the next batch (every rank alike) by raising EvalInterrupted.
    `answers` (the final evaluation's): keeps the answers as they come, and reuses those an
    interrupted run of the same evaluation kept (evaluate_model)."""
    engine = run.engine
    progress = GenerationProgress(f"{label}: generating", enabled=run.info.is_main)
    result = evaluate_model(engine.unwrapped(), run.tokenizer, run.held_out, run.data.eval_rows, run.cfg.eval,
                            engine.device, stop_ids=run.data.stop_ids, autocast_ctx=engine.autocast,
                            should_stop=stop.requested if stop is not None else None, general=run.general,
                            progress=progress, answers=answers)
    if run.pairs is not None:  # objective=dpo: the held-out pairs, chosen against rejected
        result.update(preference_eval(run, run.reference["eval"]))
    if run.cfg.eval.lm_eval_tasks:  # every rank alike (unsharded engines only: validation), no collectives
        result["lm_eval"] = run_lm_eval(engine.unwrapped(), run.tokenizer, list(run.cfg.eval.lm_eval_tasks),
                                        run.cfg.eval.lm_eval_include_path, run.cfg.eval.lm_eval_limit,
                                        run.cfg.eval.batch_size, engine.device)
    engine.train()
    return result


def _held_out_loss(run: Run) -> dict:
    """Held-out loss and perplexity of the model as it is now; the engine back in training mode."""
    result = held_out_loss(run.engine.unwrapped(), run.held_out, run.engine.device, autocast_ctx=run.engine.autocast)
    run.engine.train()
    return result


def _periodic_eval(run: Run, state: TrainState, tracker: Tracker) -> bool:
    """Held-out loss during training; True when early stopping says stop."""
    result = _held_out_loss(run)
    tracker.log(state.step, {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]})
    log.info("step %d eval loss %.4f perplexity %.3f", state.step, result["loss"], result["perplexity"])
    if result["loss"] < state.best_eval_loss - run.cfg.train.early_stopping_min_delta:
        state.best_eval_loss, state.best_step = result["loss"], state.step
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    patience = run.cfg.train.early_stopping_patience
    return patience > 0 and state.evals_without_improvement >= patience
