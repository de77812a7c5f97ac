"""Checkpoints that are atomic, verified and safe to load, through processes: saves killed with
SIGKILL or SIGINT at random instants in forked processes, a full disk as a real failing write in a
child (RLIMIT_FSIZE), a second copy of the run, `python -m distft.evaluate` / `distft.export` on
a damaged checkpoint, and a resumed run's W&B run (W&B starts its own service process).

The in-process tests: tests/unit/test_checkpoint.py."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from distft.checkpoint.store import committed_checkpoints
from distft.checkpoint.verify import find_resumable, verify
from distft.errors import CheckpointError
from tests.full_disk import in_child_with_file_limit
from tests.unit import test_checkpoint as unit
from tests.unit.test_checkpoint import RUN, compose, engine_to_save, losses, resume

finished = unit.finished  # tests/unit/test_checkpoint.py's module-scoped fixture, set up again for this module
interrupted = unit.interrupted  # tests/unit/test_checkpoint.py's fixture

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step_of(path: str) -> int:
    return int(os.path.basename(path).split("_")[1])


def test_evaluate_and_export_say_which_checkpoint_they_use_and_why(interrupted, tmp_path):
    """The newest checkpoint damaged: the commands use the previous one and say so on stderr, each
    time (nothing in the run directory is moved); a damaged checkpoint named directly is refused."""
    weights = os.path.join(interrupted, "checkpoints", "step_000008", "model", "adapter_model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe")
    env = {**os.environ, "PYTHONPATH": REPO}
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "distft.evaluate", interrupted, "--no-base", "--num-samples", "1",
                               "--out", str(tmp_path / "report.md")], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (f"distft: using {interrupted}/checkpoints/step_000004, not a newer one: step_000008 is damaged "
                "(model/adapter_model.safetensors: sha256 differs from the manifest (corrupted))") in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "distft.export", os.path.dirname(os.path.dirname(weights)),
                           "--out", str(tmp_path / "exported")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"distft: {os.path.dirname(os.path.dirname(weights))} is not a usable checkpoint: model/adapter_model."
        "safetensors: sha256 differs from the manifest (corrupted); pass an earlier checkpoint or the run directory"]
    assert os.path.isdir(os.path.dirname(os.path.dirname(weights)))  # not moved


def test_killing_a_save_at_any_instant_never_loses_the_previous_checkpoint(tmp_path):
    """20 saves, each SIGKILLed at a random instant (a forked child does the save; the parent
    waits for the kill, then checks): the newest committed checkpoint always verifies and loads, a
    killed save never becomes visible, and the next save replaces its leftovers."""
    from distft.checkpoint.store import STATE_DIR, save_checkpoint

    run_dir = str(tmp_path / "run")
    cfg, engine, tokenizer, state = engine_to_save(run_dir)
    save_checkpoint(run_dir, 1, engine, tokenizer, cfg, state, None)  # warm: the first save imports and allocates
    # Kill instants spread over a warm save's duration: the quickest of three, since a save's
    # fsyncs wait behind whatever else writes to the disk (under the parallel suite one save took
    # several times another, and no child was killed before it finished).
    durations = []
    for step in (2, 3, 4):
        started = time.perf_counter()
        save_checkpoint(run_dir, step, engine, tokenizer, cfg, state, None)
        durations.append(time.perf_counter() - started)
    duration = min(durations)
    rng = random.Random(0)
    kills = 0
    for attempt in range(20):
        step = attempt + 5
        delay = rng.uniform(0.0005, 1.2 * duration)
        pid = os.fork()
        if pid == 0:  # child: save, and die at a random instant of it
            try:
                signal.setitimer(signal.ITIMER_REAL, delay)
                signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGKILL))
                save_checkpoint(run_dir, step, engine, tokenizer, cfg, state, None)
                os.kill(os.getpid(), signal.SIGKILL)  # finished before the timer: die anyway
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        newest = find_resumable(run_dir)
        committed = [step_of(p) for p in committed_checkpoints(run_dir)]
        assert newest is not None and step_of(newest) == max(committed) and verify(newest) == []
        kills += step not in committed
        engine.load_state(os.path.join(newest, STATE_DIR))
        if step not in committed:  # the parent finishes what the child could not, over its leftovers
            save_checkpoint(run_dir, step, engine, tokenizer, cfg, state, None)
        assert [step_of(p) for p in committed_checkpoints(run_dir)][-1] == step
    assert kills >= 5, kills  # most kills land mid-save; the others right after a commit


def test_killing_a_save_between_its_shards_and_its_commit_20_times_loses_nothing(tmp_path, monkeypatch):
    """The acceptance drill: 20 saves SIGKILLed exactly after every shard is written (before the
    manifest) or after the manifest (before the commit marker), alternately, in forked children.
    Each time the killed step stays an uncommitted `.tmp`, the previous checkpoint is the one found
    and it loads with the trained weights; the next save goes over the leftovers."""
    from distft.checkpoint.store import STATE_DIR, save_checkpoint

    run_dir = str(tmp_path / "run")
    cfg, engine, tokenizer, state = engine_to_save(run_dir)
    trainable = [p for p in engine.unwrapped().parameters() if p.requires_grad]
    save_checkpoint(run_dir, 1, engine, tokenizer, cfg, state, None)
    saved = [p.detach().clone() for p in trainable]  # what the newest committed checkpoint holds
    for attempt in range(20):
        step, where = attempt + 2, ("after_shards", "before_commit")[attempt % 2]
        monkeypatch.setenv("DISTFT_FAULTS", f"kill_{where}:{step}")
        pid = os.fork()
        if pid == 0:
            try:
                save_checkpoint(run_dir, step, engine, tokenizer, cfg, state, None)
            finally:
                os._exit(1)  # the fault did not fire
        _, status = os.waitpid(pid, 0)
        monkeypatch.delenv("DISTFT_FAULTS")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (attempt, where)
        root = os.path.join(run_dir, "checkpoints")
        assert os.path.isdir(os.path.join(root, f"step_{step:06d}.tmp"))
        assert not os.path.exists(os.path.join(root, f"step_{step:06d}"))
        newest = find_resumable(run_dir)
        assert step_of(newest) == step - 1 and verify(newest) == []
        with torch.no_grad():
            for p in trainable:
                p.zero_()
        engine.load_state(os.path.join(newest, STATE_DIR))
        assert all(torch.equal(p, q) for p, q in zip(trainable, saved)), (attempt, where)
        with torch.no_grad():  # the next state, saved for real over the killed save's leftovers
            saved = [p.add_(0.01).detach().clone() for p in trainable]
        save_checkpoint(run_dir, step, engine, tokenizer, cfg, state, None)
        assert step_of(committed_checkpoints(run_dir)[-1]) == step
        assert not os.path.exists(os.path.join(root, f"step_{step:06d}.tmp"))


def test_a_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(interrupted, finished):
    """The step-8 checkpoint is removed, then the run resumes from step 4 with files limited to
    64 kB: writing step 8 fails. One message, exit 2, step 4 intact and still resumable, no
    half-written step 8 left; without the limit the rerun finishes as the uninterrupted run did."""
    shutil.rmtree(os.path.join(interrupted, "checkpoints", "step_000008"))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    args = [sys.executable, "-m", "distft", *RUN, f"run.dir={interrupted}"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "saving the checkpoint of step 8 failed" in proc.stderr and "File too large" in proc.stderr
    assert "untouched" in proc.stderr and "Traceback" not in proc.stderr
    names = sorted(os.listdir(os.path.join(interrupted, "checkpoints")))
    assert names == ["latest", "step_000004"], names
    assert verify(os.path.join(interrupted, "checkpoints", "step_000004")) == []
    summary = resume(interrupted)
    assert summary["resumed_from"].endswith("step_000004")
    assert losses(interrupted) == losses(finished["run_dir"])


def test_a_resumed_run_keeps_its_wandb_run(interrupted, finished):
    """The tracker run id is chosen once per run directory: a resume continues the same W&B run."""
    with open(os.path.join(finished["run_dir"], "tracker_run_id")) as f:
        run_id = f.read().strip()
    from distft.train import train

    train(compose(*RUN, f"run.dir={interrupted}", "tracking.wandb.mode=offline"))
    with open(os.path.join(interrupted, "tracker_run_id")) as f:
        assert f.read().strip() == run_id
    offline = [n for n in os.listdir(os.path.join(interrupted, "wandb")) if n.startswith("offline-run-")]
    assert offline and all(n.endswith(run_id) for n in offline)


# ------------------------------------------------------------ why a save failed, named truly


@pytest.fixture(scope="module")
def saver(tmp_path_factory):
    """One built engine (and config, tokenizer, trainer state) for the tests of failed saves:
    building it takes seconds; each test saves into a run directory of its own."""
    return engine_to_save(str(tmp_path_factory.mktemp("saver") / "run"))


def test_ctrl_c_during_a_save_stays_an_interrupt_and_says_nothing_was_committed(saver, tmp_path):
    """A real SIGINT to a process saving (Python's own handler: KeyboardInterrupt), 15 times: 3
    the moment DCP starts writing the engine state (DCP wraps the KeyboardInterrupt in its
    CheckpointException), 12 at a random instant of the save (one inside torch.save's zip writer
    turns into its RuntimeError "unexpected pos", raised while the interrupt is handled). Each is a KeyboardInterrupt (the
    command line exits 130) saying that step N was not committed and the earlier checkpoints are
    untouched; they are, and they load. Before: a CheckpointError "saving ... failed
    (KeyboardInterrupt: ) ... Free disk space"."""
    from distft.checkpoint.store import save_checkpoint

    cfg, engine, tokenizer, state = saver
    run_dir = str(tmp_path / "run")
    root = os.path.join(run_dir, "checkpoints")
    save_checkpoint(run_dir, 1, engine, tokenizer, cfg, state, None)
    durations = []  # of warm saves, as the children's are (the first one in a process imports)
    for scratch in range(3):
        started = time.perf_counter()
        save_checkpoint(str(tmp_path / f"scratch{scratch}"), 1, engine, tokenizer, cfg, state, None)
        durations.append(time.perf_counter() - started)
    duration = min(durations)
    rng = random.Random(0)
    outcomes = []
    for attempt in range(15):
        step, in_dcp = attempt + 2, attempt < 3
        newest = committed_checkpoints(run_dir)[-1]
        read_end, write_end = os.pipe()
        go_read, go_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            stage = "before"
            outcome: dict = {"interrupted": False}
            try:
                os.close(read_end)
                os.close(go_write)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.read(go_read, 1)
                stage = "saving"
                os.write(write_end, b"s")  # started: the parent's random instant counts from here
                save_checkpoint(run_dir, step, engine, tokenizer, cfg, state, None)
                stage = "after"
                time.sleep(30)  # finished before the signal: the interrupt lands here
            except KeyboardInterrupt as err:
                outcome = {"interrupted": stage == "saving", "type": type(err).__name__, "message": str(err),
                           "inside": type(err.__context__).__name__ if err.__context__ else None}
            except BaseException as err:  # not an interrupt any more: what the test must not see
                outcome = {"interrupted": False, "type": type(err).__name__, "message": str(err)}
            finally:
                try:
                    with os.fdopen(write_end, "w") as out:
                        out.write(json.dumps({**outcome, "stage": stage}))
                finally:
                    os._exit(0)  # never back into pytest, even if a late signal lands here
        os.close(write_end)
        os.close(go_read)
        os.write(go_write, b"x")
        if in_dcp:
            state_dir = os.path.join(root, f"step_{step:06d}.tmp", "state")
            deadline = time.time() + 30
            while not os.path.isdir(state_dir) and time.time() < deadline:
                pass
        with os.fdopen(read_end) as f:
            if not in_dcp:
                assert f.read(1) == "s"
                time.sleep(rng.uniform(0.0, 0.8 * duration))
            os.kill(pid, signal.SIGINT)
            outcome = json.loads(f.read().lstrip("s"))
        os.close(go_write)
        os.waitpid(pid, 0)
        outcomes.append((step, in_dcp, outcome))
        committed = [step_of(p) for p in committed_checkpoints(run_dir)]
        assert find_resumable(run_dir) == committed_checkpoints(run_dir)[-1], outcome
        if outcome["stage"] == "after" or outcome.get("message", "").startswith("interrupted (Ctrl-C) right after"):
            assert step in committed, outcome  # the signal came once the save was done
            continue
        assert step not in committed, outcome
        assert outcome == {"interrupted": True, "type": "SaveInterrupted", "inside": outcome["inside"], "stage": "saving",
                           "message": f"interrupted (Ctrl-C) while saving step {step}; nothing committed, earlier "
                                      f"checkpoints untouched (newest: {newest}); rerun the same command to resume"}
        assert verify(newest) == []
    assert all(o["interrupted"] for _, in_dcp, o in outcomes if in_dcp), outcomes
    assert any(o.get("inside") == "CheckpointException" for _, in_dcp, o in outcomes if in_dcp), outcomes  # DCP's wrap
    assert sum(o["interrupted"] for _, in_dcp, o in outcomes if not in_dcp) >= 3, outcomes  # many land inside a save


def test_a_second_copy_of_the_run_is_named_as_the_cause_not_the_disk(saver, tmp_path):
    """A real second process does what a second copy of the run does when it starts the same
    save: it removes `step_000002.tmp` and makes it anew, here the moment the first process
    starts writing the engine state into it. The first process's save fails with a message that
    says another process is writing this run directory, not that the disk is full; nothing is
    committed (before: the manifest listed what was left and a checkpoint without its engine
    state could be committed), and the other process's directory is left alone."""
    from distft.checkpoint.store import save_checkpoint

    cfg, engine, tokenizer, state = saver
    run_dir = str(tmp_path / "run")
    save_checkpoint(run_dir, 1, engine, tokenizer, cfg, state, None)
    tmp = os.path.join(run_dir, "checkpoints", "step_000002.tmp")
    other = subprocess.Popen([sys.executable, "-c", (
        "import os, shutil, sys\n"
        f"tmp = {tmp!r}\n"
        "print('ready', flush=True)\n"
        "while not os.path.isdir(os.path.join(tmp, 'state')):\n"
        "    pass\n"
        "shutil.rmtree(tmp)\n"
        "os.makedirs(tmp)\n"
        "print('replaced', flush=True)\n")], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "ready\n"
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(run_dir, 2, engine, tokenizer, cfg, state, None)
    assert other.wait(timeout=30) == 0 and other.stdout.read() == "replaced\n"
    message = str(caught.value)
    assert message.startswith("saving the checkpoint of step 2 failed (rank 0: "), message
    assert "step_000002.tmp was removed or renamed while it was written, so another process is probably writing " \
           f"this run directory ({run_dir}): two copies of this run?" in message
    assert "disk" not in message and "Stop the other copy, then rerun the same command to resume" in message
    assert [step_of(p) for p in committed_checkpoints(run_dir)] == [1]
    assert os.path.isdir(tmp)  # the other process's, not removed
    assert find_resumable(run_dir).endswith("step_000001")


def test_a_full_disk_and_other_write_errors_each_name_their_own_cause(saver, tmp_path):
    """A real file-size limit (64 kB, in a forked child: a short write, then EFBIG) ends a save in
    the disk-full advice, with its unfinished directory removed; a path problem (`checkpoints` is
    a file) ends in its own error text, with no word about disk space or a second copy."""
    from distft.checkpoint.store import save_checkpoint

    cfg, engine, tokenizer, state = saver
    run_dir = str(tmp_path / "run")
    save_checkpoint(run_dir, 1, engine, tokenizer, cfg, state, None)

    def save_on_a_full_disk() -> dict:
        try:
            save_checkpoint(run_dir, 2, engine, tokenizer, cfg, state, None)
        except CheckpointError as err:
            return {"message": str(err)}
        return {"message": None}

    message = in_child_with_file_limit(64_000, save_on_a_full_disk)["message"]
    assert message.startswith("saving the checkpoint of step 2 failed (rank 0: ") and "File too large" in message
    assert "the disk (or quota) is full; nothing was committed and earlier checkpoints are untouched (newest: " \
           f"{committed_checkpoints(run_dir)[-1]}). Free disk space" in message
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["latest", "step_000001"]

    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(str(elsewhere), 1, engine, tokenizer, cfg, state, None)
    assert str(caught.value) == (
        f"saving the checkpoint of step 1 failed (rank 0: FileExistsError: File exists (EEXIST): {elsewhere}/checkpoints); "
        "nothing was committed and earlier checkpoints are untouched (newest: none)")


def test_a_full_disk_during_an_export_is_one_message_and_leaves_no_partial_copy(saver, tmp_path):
    """`python -m distft.export` (a real process whose files may grow to 64 kB: the merged weights
    are MBs) fails with one line and exit 2 that names the full disk and says nothing was
    exported; `<out>.tmp` is gone, the checkpoint still verifies, and without the limit the same
    export succeeds. Before: a traceback, and the partial `<out>.tmp` stayed. (A process of its
    own, not a fork: the merge's OpenMP threads hang in a child forked after the parent used them.)"""
    from distft.checkpoint.store import save_checkpoint
    from distft.commands.export import main as export_main

    cfg, engine, tokenizer, state = saver
    run_dir = str(tmp_path / "run")
    checkpoint = save_checkpoint(run_dir, 1, engine, tokenizer, cfg, state, None)
    out = str(tmp_path / "exported")

    def full_disk() -> None:  # in the child, before exec: both are inherited by the new program
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "distft.export", checkpoint, "--out", out], capture_output=True,
                          text=True, cwd=REPO, timeout=300, preexec_fn=full_disk)
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("distft: ") and "using" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"distft: exporting into {out} failed (") and "File too large" in lines[0], lines
    assert lines[0].endswith(f"nothing was exported and the partial copy {out}.tmp was removed; the disk (or quota) "
                             "holding it is full: free space there, or choose an --out on another disk, then run the "
                             "export again"), lines
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")
    assert verify(checkpoint) == []
    assert export_main([checkpoint, "--out", out]) == 0 and os.path.exists(os.path.join(out, "config.json"))

