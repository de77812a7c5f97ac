"""Checkpoints that are atomic, verified and safe to load, on one process.

Damage is done for real to real checkpoints of tiny runs (truncated and flipped bytes, deleted
metadata, an empty `latest`, a planted pickle), saves are killed with SIGKILL at random instants
in forked processes, and a full disk is a real failing write (RLIMIT_FSIZE: the kernel refuses
the write with EFBIG, the same error path as ENOSPC).

The tests that start a process: tests/cli/test_checkpoint.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal

import pytest
import torch

from distft.checkpoint.safe_load import scan_file
from distft.checkpoint.store import MANIFEST, committed_checkpoints
from distft.checkpoint.verify import find_resumable, verify
from distft.errors import CheckpointError
from distft.preflight import preflight
from distft.tracking import read_metrics

# Steps of 8 x 128 tokens (the preset: 16 x 256): what is checked here is what the checkpoints
# hold and how a resume finds them, not what a step learns.
RUN = ["+experiment=tiny_lora", "train.max_steps=8", "checkpoint.save_every=4", "checkpoint.keep_last=0",
       "train.log_every=1", "eval.num_samples=2", "eval.max_new_tokens=2", "train.eval_max_batches=1",
       "data.max_seq_len=128", "train.global_batch_size=8"]


def compose(*overrides: str):
    cfg, errors = preflight(list(overrides))
    assert not errors, errors
    return cfg


def losses(run_dir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step LoRA run with checkpoints at steps 4 and 8 (kept as the pristine copy)."""
    from distft.train import train

    root = tmp_path_factory.mktemp("finished")
    return train(compose(*RUN, f"run.root={root}"))


@pytest.fixture
def interrupted(finished, tmp_path):
    """A copy of the finished run as if it had been killed after its step-8 checkpoint."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished["run_dir"], run_dir)
    os.remove(os.path.join(run_dir, "summary.json"))
    return run_dir


def resume(run_dir: str):
    from distft.train import train

    return train(compose(*RUN, f"run.dir={run_dir}"))


def test_checkpoint_layout_and_manifest(finished):
    ckpt = finished["final_checkpoint"]
    with open(os.path.join(ckpt, MANIFEST)) as f:
        files = json.load(f)["files"]
    assert {"trainer_state.json", "meta.json", "rng/rank_00000.safetensors", "state/.metadata",
            "state/engine_state.json", "model/adapter_model.safetensors"} <= set(files)
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in files.values())
    assert verify(ckpt) == []
    with open(os.path.join(os.path.dirname(ckpt), "latest")) as f:
        assert f.read().strip() == "step_000008"


@pytest.mark.parametrize("damage", ["truncated shard", "flipped bytes", "missing metadata", "missing manifest",
                                    "unlisted file"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_resumes(interrupted, finished, damage, capsys):
    """Each kind of damage to the newest checkpoint is found before anything loads; the run resumes
    from step 4 instead, sets the damaged one aside (not deleted), and ends as the undamaged run did."""
    newest = os.path.join(interrupted, "checkpoints", "step_000008")
    shard = next(os.path.join(newest, "state", n) for n in sorted(os.listdir(os.path.join(newest, "state")))
                 if n.endswith(".distcp"))
    if damage == "truncated shard":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
        expected = "state/__0_0.distcp: "
    elif damage == "flipped bytes":
        with open(shard, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        expected = "state/__0_0.distcp: sha256 differs"
    elif damage == "missing metadata":
        os.remove(os.path.join(newest, "state", ".metadata"))
        expected = "state/.metadata: missing"
    elif damage == "missing manifest":
        os.remove(os.path.join(newest, MANIFEST))
        expected = "MANIFEST.json is missing or unreadable"
    else:
        with open(os.path.join(newest, "state", "extra.pt"), "wb") as f:
            f.write(b"planted")
        expected = "state/extra.pt: not in the manifest"
    assert any(expected in p for p in verify(newest)), verify(newest)
    summary = resume(interrupted)
    out = capsys.readouterr().out  # distft logs to stdout, each line with its rank
    assert expected in out and "WARNING checkpoint" in out and "is damaged" in out
    assert summary["resumed_from"].endswith("step_000004")
    assert os.path.isdir(newest + ".damaged")  # kept for inspection
    assert losses(interrupted) == losses(finished["run_dir"])
    assert summary["eval_after"]["loss"] == finished["eval_after"]["loss"]


HARMLESS = ["eval_report.md", "meta.json~", os.path.join("notes", "todo.txt")]


def test_a_harmless_file_added_after_the_commit_is_ignored_with_a_warning(interrupted, distft_warnings, capsys):
    """A report, an editor backup and a notes folder added to the newest checkpoint after its
    commit: no loader reads them, so the checkpoint stays sound (not set aside as damaged); each
    is named in one warning on the "distft" logger, and on stderr by the commands that announce."""
    from distft.checkpoint.verify import resolve_checkpoint

    newest = os.path.join(interrupted, "checkpoints", "step_000008")
    for name in HARMLESS:
        os.makedirs(os.path.dirname(os.path.join(newest, name)), exist_ok=True)
        with open(os.path.join(newest, name), "w") as f:
            f.write("added by hand\n")
    assert find_resumable(interrupted) == newest
    assert not os.path.exists(newest + ".damaged")
    notes = [f"checkpoint {newest}: {name}: not in the manifest (added after the save); ignored"
             for name in sorted(HARMLESS)]
    assert distft_warnings == notes  # once each, and nothing about damage
    assert verify(newest) == [] and verify(newest, rank=1, world_size=2) == []
    assert distft_warnings == notes  # the same files are not warned about again in this process
    capsys.readouterr()
    assert resolve_checkpoint(interrupted, announce=True) == newest
    err = capsys.readouterr().err.splitlines()
    assert err == [f"distft: using {newest} (the newest)"] + [f"distft: warning: {n}" for n in notes]


@pytest.mark.parametrize("added", [os.path.join("state", "extra.distcp"), os.path.join("model", "pytorch_model.bin"),
                                   os.path.join("tokenizer", "added_tokens.json"), os.path.join("rng", "rank_00001.safetensors"),
                                   os.path.join("notes", "cache.pkl"), "trainer_state.json"])
def test_an_unlisted_file_a_loader_would_read_is_still_refused(interrupted, added):
    """The ignoring stops where a loader starts: an unlisted file in the engine state, model,
    tokenizer or RNG folders, a pickle anywhere, or one of the top-level JSON files (here dropped
    from the manifest) makes the checkpoint damaged, found by rank 0's share, and it is set aside."""
    newest = os.path.join(interrupted, "checkpoints", "step_000008")
    path = os.path.join(newest, added)
    if os.path.exists(path):  # trainer_state.json: listed at the save; unlist it
        with open(os.path.join(newest, MANIFEST)) as f:
            manifest = json.load(f)
        del manifest["files"][added]
        with open(os.path.join(newest, MANIFEST), "w") as f:
            json.dump(manifest, f)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"planted")
    refusal = f"{added}: not in the manifest (added after the save), and a loader would read it"
    assert verify(newest) == [refusal]
    assert verify(newest, rank=0, world_size=2) == [refusal] and verify(newest, rank=1, world_size=2) == []
    assert find_resumable(interrupted).endswith("step_000004")
    assert os.path.isdir(newest + ".damaged")


def test_evaluate_then_export_leave_the_checkpoint_sound_and_resumable(interrupted, tmp_path, capsys, monkeypatch):
    """The README's pair: `python -m distft.evaluate RUN` writes its report under the run's
    `evals/`, never into the checkpoint, so `python -m distft.export RUN` afterwards finds the same
    checkpoint sound, and so does a resume. A report path inside the checkpoint is one clear
    refusal; a checkpoint outside a run directory reports under ./evals/ of the current directory."""
    from distft.commands import evaluate, export
    from distft.evaluation.evaluate import default_report_path

    newest = os.path.join(interrupted, "checkpoints", "step_000008")
    listing = sorted(os.listdir(newest))
    assert evaluate.main([interrupted, "--no-base", "--num-samples", "1", "--out", os.path.join(newest, "r.md")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"distft: --out {newest}/r.md is inside the checkpoint {newest}, which is never written to after its "
        "commit (it would no longer match its manifest); choose a path outside it")
    assert evaluate.main([interrupted, "--no-base", "--num-samples", "1"]) == 0
    report = os.path.join(interrupted, "evals", "step_000008", "eval_report.md")
    assert capsys.readouterr().out.splitlines()[0] == f"report: {report}"
    assert "- checkpoint: " + newest in open(report).read()
    assert sorted(os.listdir(newest)) == listing and verify(newest) == []
    assert export.main([interrupted, "--out", os.path.join(newest, "merged")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"distft: --out {newest}/merged is inside the checkpoint")
    assert export.main([interrupted, "--out", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    assert os.path.exists(tmp_path / "merged" / "config.json")
    assert find_resumable(interrupted) == newest and not os.path.exists(newest + ".damaged")
    elsewhere = tmp_path / "downloads" / "my_checkpoint"
    monkeypatch.chdir(tmp_path)
    assert default_report_path(str(elsewhere)) == str(tmp_path / "evals" / "my_checkpoint" / "eval_report.md")


def test_retention_keeps_the_newest_complete_checkpoints_and_what_was_set_aside(interrupted, finished):
    """`checkpoint.keep_last=1` on a resume that fell back from a damaged step 8 to step 4 and
    saves every 2 steps: each save deletes only older committed checkpoints once the new one is
    in place, so step 8 (saved again) is all that remains, beside the damaged copy kept for
    inspection; the run ends as the undamaged one did."""
    from distft.train import train

    newest = os.path.join(interrupted, "checkpoints", "step_000008")
    os.remove(os.path.join(newest, "state", ".metadata"))
    summary = train(compose(*RUN, f"run.dir={interrupted}", "checkpoint.save_every=2", "checkpoint.keep_last=1"))
    assert summary["resumed_from"].endswith("step_000004")
    root = os.path.join(interrupted, "checkpoints")
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_000008", "step_000008.damaged"]
    assert committed_checkpoints(interrupted) == [newest] and verify(newest) == []
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "step_000008"
    assert losses(interrupted) == losses(finished["run_dir"])


def test_an_empty_latest_is_reported_and_the_newest_complete_checkpoint_used(interrupted, capsys):
    with open(os.path.join(interrupted, "checkpoints", "latest"), "w"):
        pass
    summary = resume(interrupted)
    assert "latest is empty" in capsys.readouterr().out
    assert summary["resumed_from"].endswith("step_000008")


def test_every_checkpoint_damaged_is_a_clear_error(interrupted):
    for ckpt in committed_checkpoints(interrupted):
        os.remove(os.path.join(ckpt, "trainer_state.json"))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step_000008 is damaged \(trainer_state.json: missing\).*resume=false"):
        resume(interrupted)


class Planted:
    """Unpickling this runs a command, as a malicious checkpoint would."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_refused_before_it_runs(interrupted, tmp_path):
    """DCP's `.metadata` replaced by a pickle that runs a command, the manifest updated to match
    (so only the pickle scan stands in the way): the checkpoint is refused, the command never runs,
    and the run resumes from the previous checkpoint."""
    import hashlib

    marker = tmp_path / "pwned"
    newest = os.path.join(interrupted, "checkpoints", "step_000008")
    metadata = os.path.join(newest, "state", ".metadata")
    with open(metadata, "wb") as f:
        pickle.dump({"state": Planted(str(marker))}, f)
    with open(os.path.join(newest, MANIFEST)) as f:
        manifest = json.load(f)
    data = open(metadata, "rb").read()
    manifest["files"]["state/.metadata"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(newest, MANIFEST), "w") as f:
        json.dump(manifest, f)
    problems = verify(newest)
    assert len(problems) == 1 and "would import posix.system" in problems[0], problems
    summary = resume(interrupted)
    assert summary["resumed_from"].endswith("step_000004")
    assert not marker.exists()


@pytest.mark.parametrize("bypass", ["dotted-global", "load-from-bytes", "polyglot", "dcp-bytes-item"])
def test_each_way_past_the_old_pickle_scan_is_refused_and_the_previous_checkpoint_used(interrupted, tmp_path, bypass):
    """The four ways a tampered step-8 checkpoint (manifest rewritten to match) ran its payload on
    a real resume before: a dotted global under an allowed module, torch.storage._load_from_bytes,
    a raw pickle with a zip appended, and a DCP "bytes" item. Each is refused by the resume's own
    check (set aside, step 4 chosen), and DCP's loader refuses it too when handed it directly."""
    from tests.payloads import plant_dcp_bytes_item, raw_variants, rewrite_in_checkpoint, torch_variants

    markers = tmp_path / "markers"
    markers.mkdir()
    newest = os.path.join(interrupted, "checkpoints", "step_000008")
    poisoned = str(tmp_path / "poisoned")
    if bypass == "dcp-bytes-item":
        plant_dcp_bytes_item(newest, str(markers / bypass))
    else:
        data = {"dotted-global": raw_variants(str(markers))["dotted-torch.storage-torch.os.system"],
                "load-from-bytes": raw_variants(str(markers))["load-from-bytes"],
                "polyglot": torch_variants(str(markers))["polyglot-raw-then-zip"]}[bypass]
        rewrite_in_checkpoint(newest, "state/.metadata", data)
    shutil.copytree(newest, poisoned)
    problems = verify(newest)
    assert len(problems) == 1 and problems[0].startswith("state/.metadata: "), problems
    assert find_resumable(interrupted).endswith("step_000004")
    assert os.path.isdir(newest + ".damaged")
    # The loader itself, handed the poisoned state without the check in front of it:
    cfg, engine, _, _ = engine_to_save(str(tmp_path / "run"))
    with pytest.raises(Exception) as refused:
        engine.load_state(os.path.join(poisoned, "state"))
    from distft.checkpoint.safe_load import refusal

    assert refusal(refused.value), refused.value
    assert os.listdir(markers) == []


def _tamper_meta(checkpoint: str, change) -> None:
    """Edit a checkpoint's meta.json and rewrite its manifest to match (as an attacker could)."""
    from tests.payloads import rewrite_in_checkpoint

    with open(os.path.join(checkpoint, "meta.json")) as f:
        meta = json.load(f)
    change(meta["config"])
    rewrite_in_checkpoint(checkpoint, "meta.json", json.dumps(meta).encode())


def _code_running_folders(tmp_path):
    """A model folder whose config needs its own Python code, and an importable module: each
    touches a marker when its code runs."""
    model_marker, module_marker = tmp_path / "model-code-ran", tmp_path / "module-code-ran"
    evil = tmp_path / "evil_model"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps(
        {"model_type": "distft_evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.M"}}))
    (evil / "evil.py").write_text(f"import pathlib\npathlib.Path({str(model_marker)!r}).touch()\n"
                                  "from transformers import PretrainedConfig\n"
                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'distft_evil'\n")
    (tmp_path / "distft_evil_augment.py").write_text(
        f"import pathlib\npathlib.Path({str(module_marker)!r}).touch()\ndef fn(row, rng):\n    return row\n")
    return evil, model_marker, module_marker


def test_settings_that_run_code_never_come_from_a_checkpoint(interrupted, tmp_path, monkeypatch, capsys):
    """A tampered meta.json turning on trust_remote_code for a base that ships Python code, a hub
    kernel, and an augmentation callable from an importable module: evaluate and export run none
    of it; the remote-code base is one clear message naming --trust-remote-code. With that flag
    (the user's own command line), the base's code does run: the payload was live."""
    from distft.checkpoint.export import checkpoint_config, export, load_model
    from distft.evaluation.evaluate import evaluate_checkpoint

    evil, model_marker, module_marker = _code_running_folders(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # `python -m` from that folder would import from it
    newest, older = (os.path.join(interrupted, "checkpoints", f"step_00000{n}") for n in (8, 4))

    def remote_code(config):
        config["model"].update(name_or_path=str(evil), trust_remote_code=True,
                               attn_implementation="kernels-community/flash-attn")

    def augmentation(config):
        config["data"]["augment"]["functions"] = [{"_target_": "distft_evil_augment.fn"}]

    _tamper_meta(newest, remote_code)
    _tamper_meta(older, augmentation)
    cfg = checkpoint_config(newest)
    assert (cfg.model.trust_remote_code, cfg.model.attn_implementation) == (False, "sdpa")
    assert "asks for model.trust_remote_code=true, model.attn_implementation=kernels-community/flash-attn; not " \
           "honoured" in capsys.readouterr().err
    for attempt in (lambda: load_model(newest), lambda: export(newest, str(tmp_path / "out"))):
        with pytest.raises(CheckpointError, match="runs its own Python code, and trust_remote_code is off.*"
                                                  "--trust-remote-code"):
            attempt()
    assert not os.path.exists(tmp_path / "out")
    out, after, _ = evaluate_checkpoint(older, str(tmp_path / "report.md"), num_samples=1, compare_base=False)
    assert os.path.exists(out) and after["loss"] > 0
    assert not model_marker.exists() and not module_marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - the opt-in runs the folder's code (then fails on its fake model)
        load_model(newest, trust_remote_code=True)
    assert model_marker.exists() and not module_marker.exists()


def test_pickle_scan_reads_torch_archives_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "hook": Planted(str(marker))}, tmp_path / "bad.pt")
    torch.save({"w": torch.ones(2), "step": 3, "groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}, tmp_path / "ok.pt")
    assert scan_file(str(tmp_path / "ok.pt")) == []
    assert "posix.system" in scan_file(str(tmp_path / "bad.pt"))[0]
    assert not marker.exists()


def engine_to_save(run_dir: str):
    """The tiny LoRA run's config, a built single-process engine, its tokenizer and a trainer
    state: what save_checkpoint takes, for saving (and killing) outside a run."""
    from distft.engines import build_engine, build_model_for_engine
    from distft.model.build import load_tokenizer

    cfg = compose(*RUN, f"run.dir={run_dir}")
    tokenizer = load_tokenizer(cfg.model)
    model, _ = build_model_for_engine(cfg, torch.float32, tokenizer, 1)
    engine = build_engine(cfg, model, torch.device("cpu"))
    return cfg, engine, tokenizer, {"step": 0, "loop": {}, "data": {}, "world_size": 1, "parallel": "single"}


def test_resume_false_sets_the_old_run_aside(finished, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished["run_dir"], run_dir)
    from distft.train import train

    summary = train(compose(*RUN, f"run.dir={run_dir}", "resume=false"))
    assert summary["resumed_from"] is None and summary["steps"] == 8
    aside = [n for n in os.listdir(tmp_path) if n.startswith("run.old-")]
    assert len(aside) == 1
    with open(os.path.join(tmp_path, aside[0], "summary.json")) as f:
        assert json.load(f)["final_checkpoint"] == finished["final_checkpoint"]  # the old run, untouched


def test_resuming_with_another_config_is_refused(interrupted):
    from distft.train import train

    with pytest.raises(CheckpointError, match=r"holds a run with another config \(train.lr: 0.01 -> 0.02\); .* resume=false"):
        train(compose(*RUN, f"run.dir={interrupted}", "train.lr=0.02"))
    assert not os.path.exists(os.path.join(interrupted, "summary.json"))


def test_resuming_under_an_engine_that_cannot_read_the_state_is_refused(interrupted):
    """DCP state (single/ddp/fsdp) and DeepSpeed's ZeRO partitions do not convert into each
    other; the refusal comes before any engine is built, nothing in the run changes."""
    from distft.train import train

    before = sorted(os.listdir(os.path.join(interrupted, "checkpoints")))
    with pytest.raises(CheckpointError, match=r"parallel.strategy: 'single' -> 'zero2', whose training states do "
                                              r"not convert into each other.*resume=false"):
        train(compose(*RUN, f"run.dir={interrupted}", "parallel=zero2"))
    assert sorted(os.listdir(os.path.join(interrupted, "checkpoints"))) == before


def test_planner_settings_do_not_stop_a_resume(interrupted):
    """plan.* only says how a run is checked before it starts (and did not exist in older runs'
    dumps): changing it resumes the run."""
    from distft.checkpoint.resume import resume_conflicts

    assert resume_conflicts(compose(*RUN, f"run.dir={interrupted}", "plan.margin=0.3", "plan.override=true"),
                            interrupted) == []
    assert resume_conflicts(compose(*RUN, f"run.dir={interrupted}", "train.lr=0.02"), interrupted) != []


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default(interrupted, tmp_path):
    """A checkpoint written before `train.optimizer` existed holds no such key: it trained with
    what is now the default (adamw), so the same command resumes it; another optimizer is a
    conflict, and so is a recorded value that differs."""
    import json
    import shutil

    from distft.checkpoint.resume import resume_conflicts
    from distft.checkpoint.store import committed_checkpoints

    older = str(tmp_path / "older")
    shutil.copytree(interrupted, older)
    meta_path = os.path.join(committed_checkpoints(older)[-1], "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["config"]["train"]["optimizer"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert resume_conflicts(compose(*RUN, f"run.dir={older}"), older) == []
    assert resume_conflicts(compose(*RUN, f"run.dir={older}", "train.optimizer=adamw_8bit"), older) == [
        "train.optimizer: 'adamw' -> 'adamw_8bit'"]
    assert resume_conflicts(compose(*RUN, f"run.dir={interrupted}", "train.optimizer=adamw_8bit"), interrupted) == [
        "train.optimizer: 'adamw' -> 'adamw_8bit'"]


# ------------------------------------------------------------------ hostile run directories (issue 34)


class _Hung(Exception):
    pass


@pytest.fixture
def within_60s():
    """Fails the test with _Hung when it blocks for a minute (an open() of a FIFO waits for a
    writer forever; SIGALRM's handler raises, which ends the blocked call: PEP 475)."""

    def hung(signum, frame):
        raise _Hung("blocked for 60 s")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


def _plant(path: str, how: str) -> None:
    os.remove(path)
    if how == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


@pytest.mark.parametrize("planted", [("MANIFEST.json", "fifo"), ("meta.json", "fifo"), ("trainer_state.json", "zero"),
                                     ("state/engine_state.json", "fifo"), ("model/adapter_model.safetensors", "zero")])
def test_a_fifo_or_a_link_to_dev_zero_in_a_checkpoint_is_refused_without_hanging(interrupted, finished, planted,
                                                                                   within_60s, capsys):
    """A checkpoint file replaced by a named pipe (open() would wait for a writer forever) or by
    a link to /dev/zero (a read that never ends) is found before anything is opened: verify
    names it, evaluate uses the previous checkpoint, and resume sets it aside and ends as the
    undamaged run did. Before: resume and evaluate hung silently."""
    from distft.checkpoint.verify import resolve_checkpoint

    name, how = planted
    newest = os.path.join(interrupted, "checkpoints", "step_000008")
    _plant(os.path.join(newest, name), how)
    problems = verify(newest)
    kind = "a named pipe (FIFO)" if how == "fifo" else "a symbolic link"
    if name == MANIFEST:
        assert problems == [f"{MANIFEST} is missing or unreadable (NotAFile: {newest}/{MANIFEST} is {kind}, not a "
                            "regular file)"], problems
    else:
        assert f"{name}: {kind}, where a checkpoint holds only regular files (refused, never read)" in problems
    assert resolve_checkpoint(interrupted).endswith("step_000004")
    summary = resume(interrupted)
    assert summary["resumed_from"].endswith("step_000004") and os.path.isdir(newest + ".damaged")
    assert losses(interrupted) == losses(finished["run_dir"])


@pytest.mark.parametrize("name", ["latest", "best.json"])
def test_a_fifo_as_latest_or_best_json_is_reported_not_waited_for(interrupted, name, within_60s, capsys):
    """`checkpoints/latest` and `checkpoints/best.json` are conveniences, read with O_NONBLOCK: a
    FIFO there is reported (latest) or ignored (best.json), and the newest checkpoint resumes."""
    from distft.checkpoint.store import read_best

    path = os.path.join(interrupted, "checkpoints", name)
    if os.path.exists(path):
        os.remove(path)
    os.mkfifo(path)
    assert read_best(interrupted) is None
    summary = resume(interrupted)
    assert summary["resumed_from"].endswith("step_000008")
    if name == "latest":
        assert f"{path} cannot be read ({path} is a named pipe (FIFO), not a regular file)" in capsys.readouterr().out


def test_a_fifo_as_summary_json_is_one_message_not_a_hang(interrupted, within_60s):
    """A finished run's summary.json is read before anything else: a FIFO (or a link) planted
    there is one CheckpointError naming it and what to do."""
    path = os.path.join(interrupted, "summary.json")
    os.mkfifo(path)
    with pytest.raises(CheckpointError) as caught:
        resume(interrupted)
    assert str(caught.value) == (
        f"{path} cannot be read ({path} is a named pipe (FIFO), not a regular file); the run directory is damaged: "
        "remove that file to resume, or pass resume=false to start over (the old run is kept aside)")


def _victims(tmp_path, names):
    victims = {}
    for name in names:
        victim = tmp_path / f"victim-{name.replace('/', '_')}"
        victim.write_text("precious\n")
        victims[name] = victim
    return victims


def test_a_run_writes_nothing_through_links_planted_in_its_directory(interrupted, tmp_path, capsys):
    """Links planted where a resumed run writes its report, predictions, loss plot, checkpoint
    pointer, and at the temporary names this process would have written them under before issue
    34 (`<name>.tmp-<pid>`), point at files elsewhere: the run replaces each link with its own
    file and every target keeps its content. Before: the report, its predictions and the loss
    plot were written through the temporary names' links."""
    names = ["eval_report.md", "eval_report.predictions.jsonl", "loss.png", "checkpoints/latest"]
    names += [f"{name}.tmp-{os.getpid()}" for name in names]
    victims = _victims(tmp_path, names)
    for name, victim in victims.items():
        path = os.path.join(interrupted, name)
        if os.path.exists(path):
            os.remove(path)
        os.symlink(victim, path)
    summary = resume(interrupted)
    assert summary["resumed_from"].endswith("step_000008")
    for name, victim in victims.items():
        assert victim.read_text() == "precious\n", name
    # A resume from the last step saves nothing, so `latest` stays the planted link; the files
    # the finish wrote are regular files of their own.
    for name in ["eval_report.md", "eval_report.predictions.jsonl", "loss.png"]:
        path = os.path.join(interrupted, name)
        assert os.path.isfile(path) and not os.path.islink(path), name
    assert "## Samples" in open(os.path.join(interrupted, "eval_report.md")).read()


def test_evaluate_writes_nothing_through_planted_links(interrupted, tmp_path, within_60s):
    """`python -m distft.evaluate RUN_DIR` writes under `<run_dir>/evals/`: a planted `evals` link
    is refused in one message (an OutputError: exit 2) with nothing written at its target; links
    planted as the report, its predictions file and the temporary name this process would have
    used (`eval_report.md.tmp-<pid>`, the name before issue 34) leave their targets untouched.
    Before: the report overwrote the file a link pointed at."""
    from distft.errors import OutputError, UnsafePathError
    from distft.evaluation.evaluate import evaluate_checkpoint

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    evals = os.path.join(interrupted, "evals")
    os.symlink(elsewhere, evals)
    with pytest.raises(UnsafePathError) as caught:
        evaluate_checkpoint(interrupted, num_samples=1, compare_base=False)
    assert isinstance(caught.value, OutputError)
    assert f"{evals} is a symbolic link (to {elsewhere})" in str(caught.value)
    assert os.listdir(elsewhere) == []

    os.remove(evals)
    folder = os.path.join(evals, "step_000008")
    os.makedirs(folder)
    names = ["eval_report.md", "eval_report.predictions.jsonl", f"eval_report.md.tmp-{os.getpid()}",
             f"eval_report.predictions.jsonl.tmp-{os.getpid()}"]
    victims = _victims(tmp_path, names)
    for name, victim in victims.items():
        os.symlink(victim, os.path.join(folder, name))
    out, after, _ = evaluate_checkpoint(interrupted, num_samples=1, compare_base=False)
    assert out == os.path.join(folder, "eval_report.md") and after["loss"] > 0
    assert all(victim.read_text() == "precious\n" for victim in victims.values())
    assert not os.path.islink(out) and "## Samples" in open(out).read()
