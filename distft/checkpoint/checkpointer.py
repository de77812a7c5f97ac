"""The `Checkpointer`: every stateful part of a run saved and restored in one place, and the
best-checkpoint policy.

What a save holds: the engine's state (weights, optimizer, schedule, scaler), the data position,
the loop's `TrainState` and every rank's RNG (store.py writes them, verify.py checks them before a
resume). Saves are synchronous, or with `checkpoint.async_save` written in the background and
committed at the first step boundary where every rank's write is done. No checkpoint is ever
made of non-finite weights. The best checkpoint (`checkpoints/best.json`): with early stopping or
`checkpoint.keep_best`, each new lowest periodic eval loss is saved, and at the end the best
becomes the run's result unless the last model scores at least as well (`use_best`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Optional

import torch

from distft import dist
from distft.checkpoint.safe_load import refusal, weights_only_loads
from distft.checkpoint.store import (
    STATE_DIR,
    commit_checkpoint,
    load_rng,
    read_best,
    read_trainer_state,
    save_checkpoint,
    write_best,
)
from distft.config import Config
from distft.errors import CheckpointError, NonFiniteError

log = logging.getLogger("distft")


def nonfinite_parameters(engine) -> list[str]:
    """Names of the trainable parameters with a NaN or inf in this rank's part of them. One fused
    norm per parameter and a single host sync, so it can run after every step: the norm of finite
    values is finite (float32 accumulation), of anything else not."""
    named = [(name, engine.local_shard(p)) for name, p in engine.unwrapped().named_parameters() if p.requires_grad]
    named = [(name, t) for name, t in named if t.numel()]
    if not named:
        return []
    norms = torch._foreach_norm([t for _, t in named])
    finite = torch.isfinite(torch.stack([n.float() for n in norms]))
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def saves_best(cfg: Config) -> bool:
    """Whether each new best periodic eval loss gets its checkpoint: with early stopping (which
    ends the run past its best) or checkpoint.keep_best."""
    return bool(cfg.train.eval_every) and (cfg.checkpoint.keep_best or cfg.train.early_stopping_patience > 0)


class Checkpointer:
    """Saves and restores a run (see the module docstring); `last`/`last_step` is the newest
    checkpoint this run committed or resumed from."""

    def __init__(self, run, run_dir: str, state):
        self.run, self.run_dir, self.state = run, run_dir, state
        self.pending = None
        self.last, self.last_step = None, None  # the newest checkpoint this run committed (or resumed from)
        self.resumed_step = 0  # the step this process started from

    def save(self, step: int, background: bool = False) -> Optional[str]:
        """Every rank. Returns the committed directory, or None while it is written in the background."""
        run = self.run
        self.finish()  # one write at a time, in step order
        bad = nonfinite_parameters(run.engine)
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

    def save_final(self) -> str:
        """Every rank: the checkpoint of the last step (saved now unless it already is)."""
        return self.last if self.last_step == self.state.step else self.save(self.state.step)

    def poll(self) -> None:
        """Every rank, at each step boundary: commit the background write once all ranks finished it."""
        if self.pending is not None and not dist.any_rank(not self.pending.written(), self.run.device):
            self.finish()

    def finish(self) -> Optional[str]:
        """Every rank: wait for a background write and commit it."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        self.last, self.last_step = commit_checkpoint(pending), pending.step
        return self.last

    def load_weights(self, checkpoint: str) -> None:
        """Every rank: the engine's training state (weights, optimizer, schedule) from `checkpoint`,
        a verified one of this run, every torch.load through the safe-load allow-list; the loop's
        own state is left as it is (`resume` restores that too)."""
        try:
            with weights_only_loads():  # and every torch.load of the engine's loader through the allow-list
                self.run.engine.load_state(os.path.join(checkpoint, STATE_DIR))
        except Exception as err:
            refused = refusal(err)
            if refused is None:
                raise
            raise CheckpointError(f"refusing to load {checkpoint}: {refused}; nothing in it was run. Delete that "
                                  "checkpoint (or pass resume=false) if you did not write it") from None

    def resume(self, checkpoint: str, tracker) -> str:
        """Continue from `checkpoint` (the run directory's newest sound one: find_resumable):
        weights, optimizer and schedule, data position, loop counters and every rank's RNG, so the
        rest of the run is the one an uninterrupted run would have had. Metrics logged after that
        step are dropped. On another number of ranks the state is resharded; the dropout streams
        (per-rank RNG) are then reseeded, so the run continues validly but not bit for bit."""
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

    def use_best(self, last_model_loss: Callable[[], Optional[float]]) -> Optional[dict]:
        """Every rank, after the final save: the best checkpoint's pointer (store.read_best) when
        the run's result is its best checkpoint rather than its last, else None. That is when
        early stopping fired (the last evals were worse) or with checkpoint.keep_best; then the
        best weights are loaded into the engine for the final evaluation, and best.json is made
        the run directory's default for evaluate and export. With keep_best the last model is
        first scored (`last_model_loss`: its held-out loss), and stays the result when it is at
        least as good."""
        state, cfg, info = self.state, self.run.cfg, self.run.info
        if not (state.stopped_early or cfg.checkpoint.keep_best) or state.best_step is None:
            return None
        best = read_best(self.run_dir)
        if best is None or best["step"] != state.best_step:
            log.warning("the best eval loss (step %d) has no checkpoint; the final report scores the last model (step "
                        "%d)", state.best_step, state.step)
            return None
        why = f"training stopped early at step {state.step}" if state.stopped_early else "checkpoint.keep_best=true"
        if not state.stopped_early and best["step"] != state.step:
            last = last_model_loss()
            if last is not None and last <= best["eval_loss"]:
                if info.is_main:  # the last model is the best: it becomes best.json's checkpoint
                    write_best(self.run_dir, state.step, last, default=True, why=why)
                dist.barrier()
                return None
        if best["step"] != state.step:
            self.load_weights(best["path"])
            log.info("the run's result is its best checkpoint %s (eval loss %.4f at step %d; %s)", best["path"],
                     best["eval_loss"], best["step"], why)
        if info.is_main:
            write_best(self.run_dir, best["step"], best["eval_loss"], default=True, why=why)
        dist.barrier()
        return {**best, "default": True, "why": why}


def best_of_run(state, best: Optional[dict], final_loss: Optional[float]) -> tuple:
    """(step, eval loss) of the run's lowest held-out loss, for the summary and loss.png: the best
    periodic eval's, or the last step's when the final evaluation scored the last model at least as
    well (as best_note says, and best.json with keep_best). (None, None) without periodic evals."""
    if state.best_step is None:
        return None, None
    if not best and final_loss is not None and final_loss <= state.best_eval_loss:
        return state.step, final_loss
    return state.best_step, state.best_eval_loss


def best_note(state, best: Optional[dict], last: str, final_loss: Optional[float]) -> Optional[str]:
    """The report's line on the best periodic eval: which checkpoint the report scores, and why."""
    if state.best_step is None:
        return None
    if not best and best_of_run(state, best, final_loss)[0] == state.step:
        return (f"The last model (step {state.step}) is the best: its eval loss {final_loss:.4f} is below every "
                f"periodic eval's (the lowest, {state.best_eval_loss:.4f}, at step {state.best_step}).")
    if best:
        return (f"**Best checkpoint**: this report scores {os.path.basename(best['path'])}, the best periodic eval "
                f"loss ({best['eval_loss']:.4f} at step {best['step']}), because {best['why']}; the last checkpoint "
                f"is {os.path.basename(last)} (step {state.step}). `python -m distft.evaluate` and `distft.export` "
                "use the best one for this run directory too.")
    return (f"Best periodic eval loss: {state.best_eval_loss:.4f} at step {state.best_step}; this report scores the "
            f"last model (step {state.step}). checkpoint.keep_best=true (or early stopping) keeps and scores the best.")
