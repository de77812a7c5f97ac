"""A final evaluation cut by a stop signal resumes where it was instead of starting over
(distft.evaluation.evaluate.AnswerLog; issue 38): on SLURM, one longer than a job segment would
otherwise never finish, requeue after requeue.

The signal is real: the run sends it to itself once K answers exist (faults.signal_after_answers),
here in one process, each run forgetting the faults that fired before as a new process would. The
decoder is the real one, counted: what a rerun generates is asserted, not inferred. Every resumed
result is compared with an uninterrupted run of the same config in another run directory.

The run that starts a process (a stop signal during start-up): tests/cli/test_signal_phases.py."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from distft import faults, preemption
from distft.errors import Preempted
from distft.evaluation.evaluate import PARTIAL_ANSWERS, EvalInterrupted
from distft.preflight import preflight

# 8 prompts, 2 a batch: 4 generation batches, of which the fault lets 2 through. A small lr keeps
# the tuned tiny model's answers varied (at the preset's 1e-2 it answers every prompt with nothing
# after 4 steps), so that an answer reused for the wrong prompt would show.
FAST = ["+experiment=tiny_lora", "train.max_steps=4", "train.lr=1e-4", "train.log_every=1", "eval.num_samples=8",
        "eval.batch_size=2", "eval.max_new_tokens=4", "train.eval_max_batches=1", "data.max_seq_len=128",
        "train.global_batch_size=8", "checkpoint.save_every=0"]
CUT = "signal_after_answers:4:USR2"


def train_with(run_dir, fault: str | None = None, *overrides: str) -> tuple[list, dict | BaseException]:
    """One run in `run_dir`: ([prompts of each batch the final evaluation decoded], its summary or
    what it raised). The decoder is the real one, only counted."""
    from distft.evaluation import evaluate
    from distft.train import train

    decoded: list[int] = []
    real = evaluate._generate_cached

    def counted(model, rows, *args, **kwargs):
        if preemption.phase() == "final":  # the base's evaluation (before training) is not the point
            decoded.append(len(rows))
        return real(model, rows, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "_generate_cached", counted)
        patch.setattr(faults, "_fired", set())  # each run as a process of its own
        if fault:
            patch.setenv("DISTFT_FAULTS", fault)
        else:
            patch.delenv("DISTFT_FAULTS", raising=False)
        for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
            patch.delenv(key)
        cfg, errors = preflight([*FAST, *overrides, f"run.dir={run_dir}"])
        assert errors == []
        try:
            return decoded, train(cfg)
        except Preempted as stopped:
            return decoded, stopped


def predictions(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "eval_report.predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def partial_lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, PARTIAL_ANSWERS)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    decoded, summary = train_with(run_dir)
    assert decoded == [2, 2, 2, 2] and not os.path.lexists(run_dir / PARTIAL_ANSWERS)
    return summary


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """A run stopped by SIGUSR2 once 4 answers of its final evaluation existed (the pristine copy)."""
    run_dir = tmp_path_factory.mktemp("cut") / "run"
    decoded, stopped = train_with(run_dir, CUT)
    return run_dir, decoded, stopped


@pytest.fixture
def rerun(cut, tmp_path):
    """A copy of the cut run, to be run again."""
    shutil.copytree(cut[0], tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def test_a_final_evaluation_stopped_after_4_answers_resumes_with_them(cut, rerun, uninterrupted, capsys):
    run_dir, decoded, stopped = cut
    assert isinstance(stopped, Preempted) and stopped.exit_code == 4 and not stopped.requeued
    assert str(stopped).startswith("stopped during the final evaluation, after step 4 by SIGUSR2")
    interrupted = stopped.__context__
    assert isinstance(interrupted, EvalInterrupted)
    assert (interrupted.answered_now, interrupted.answered, interrupted.total) == (4, 4, 8)
    assert decoded == [2, 2]  # the fault fired after the second batch; the third was never started
    header, *batches = partial_lines(run_dir)
    assert header["key"]["checkpoint"] == "checkpoints/step_000004" and header["key"]["step"] == 4
    assert header["key"]["prompts"] == 8 and header["key"]["max_new_tokens"] == 4
    assert [len(b["answers"]) for b in batches] == [2, 2]
    kept = {i: (text, cut) for b in batches for i, text, cut in b["answers"]}

    capsys.readouterr()
    decoded, summary = train_with(rerun)
    assert "final evaluation: 4 of 8 answers kept from the interrupted one" in capsys.readouterr().out
    assert decoded == [2, 2]  # only the 4 answers missing
    assert summary["steps"] == 4 and summary["resumed_from"] == f"{rerun}/checkpoints/step_000004"
    assert summary["eval_after"] == uninterrupted["eval_after"]  # the same answers, the same scores
    assert predictions(rerun) == predictions(uninterrupted["run_dir"])
    records = predictions(rerun)
    assert all(records[i]["outputs"]["tuned"]["text"] == text for i, (text, _) in kept.items())
    assert len({r["outputs"]["tuned"]["text"] for r in records}) >= 4  # varied: a misplaced answer would show
    assert not os.path.lexists(rerun / PARTIAL_ANSWERS)  # a finished run keeps no partial answers


def test_a_segment_that_answers_nothing_says_so_and_keeps_the_answers(rerun, uninterrupted, capsys):
    """Stopped again before its first new answer: answered_now is 0 (the trainer's "no progress in
    this segment"), and the 4 answers kept stay for the next run."""
    decoded, stopped = train_with(rerun, CUT)  # 4 answers exist as it starts: the signal comes at once
    assert isinstance(stopped, Preempted) and decoded == []
    interrupted = stopped.__context__
    assert (interrupted.answered_now, interrupted.answered, interrupted.total) == (0, 4, 8)
    assert [len(b["answers"]) for b in partial_lines(rerun)[1:]] == [4]
    decoded, summary = train_with(rerun)
    assert decoded == [2, 2] and summary["eval_after"] == uninterrupted["eval_after"]


def _header_says(key: str, value):
    def damage(path):
        header, *rest = partial_lines(path.parent)
        header["key"][key] = value
        path.write_text("".join(json.dumps(line) + "\n" for line in [header, *rest]))
    return damage


def _malformed(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))


def _out_of_range(path):
    with open(path, "a") as f:
        f.write(json.dumps({"answers": [[99, "planted", False]]}) + "\n")


def _torn(path):
    text = path.read_text()
    path.write_text(text[: len(text) - 10])  # the last batch cut while it was written


def _link(path):
    target = path.parent.parent / "elsewhere.jsonl"
    shutil.move(path, target)
    os.symlink(target, path)


def _fifo(path):
    os.remove(path)
    os.mkfifo(path)


# (what is done to the kept answers or the rerun, extra overrides, the log's reason, batches decoded)
IGNORED = {
    # another save of step 4 (another manifest); other rows (the prompts cannot change on a resume)
    "another checkpoint": (_header_says("checkpoint_sha256", "0" * 64), [], "holds the answers of another evaluation (another checkpoint: "
                           "checkpoint_sha256 differ)", [2, 2, 2, 2]),
    "other settings": (None, ["eval.max_new_tokens=3"], "holds the answers of another evaluation (other generation "
                       "settings: max_new_tokens differ)", [2, 2, 2, 2]),
    "other prompts": (_header_says("prompts_sha256", "0" * 64), [], "holds the answers of another evaluation (other "
                      "prompts: prompts_sha256 differ)", [2, 2, 2, 2]),
    "malformed line": (_malformed, [], "line 2 is not a batch of answers", [2, 2, 2, 2]),
    "index out of range": (_out_of_range, [], "line 4 is not a batch of answers", [2, 2, 2, 2]),
    "a link": (_link, [], "is unusable ({path} is a symbolic link (to ", [2, 2, 2, 2]),
    "a FIFO": (_fifo, [], "is unusable ({path} is a named pipe (FIFO), not a regular file)", [2, 2, 2, 2]),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_kept_answers_of_another_evaluation_or_damaged_are_ignored_and_rewritten(rerun, uninterrupted, capsys, case):
    damage, overrides, reason, expected = IGNORED[case]
    path = rerun / PARTIAL_ANSWERS
    kept = path.read_text()
    if damage:
        damage(path)
    capsys.readouterr()
    decoded, summary = train_with(rerun, None, *overrides)
    out = capsys.readouterr().out
    assert f"final evaluation: {path} {reason.format(path=path)}" in out and "answers kept" not in out
    assert decoded == expected  # every answer generated again
    if not overrides:
        assert summary["eval_after"] == uninterrupted["eval_after"]
    else:
        assert summary["eval_after"]["max_new_tokens"] == 3 and summary["eval_after"]["num_generated"] == 8
    assert not os.path.lexists(path)
    if case == "a link":  # replaced, never written through
        assert (rerun.parent / "elsewhere.jsonl").read_text() == kept


def test_a_torn_last_batch_is_generated_again(rerun, uninterrupted, capsys):
    """A crash mid-append leaves the last line without its end: that batch alone is generated again."""
    _torn(rerun / PARTIAL_ANSWERS)
    capsys.readouterr()
    decoded, summary = train_with(rerun)
    out = capsys.readouterr().out
    assert "its last line is torn" in out and "final evaluation: 2 of 8 answers kept from the interrupted one" in out
    assert decoded == [2, 2, 2] and summary["eval_after"] == uninterrupted["eval_after"]

