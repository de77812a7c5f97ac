"""A run is never resumed, nor called complete, on other data than it trained on (issue 18,
scope 1: a changed file is refused, naming it). Real runs of the tiny LoRA preset on a real jsonl
file: one byte changed is enough, and restoring the file (or resume=false) is the way on."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from distft.checkpoint.resume import data_changes
from distft.data.sources import data_fingerprint
from distft.errors import CheckpointError
from distft.preflight import preflight

RUN = ["+experiment=tiny_lora", "train.max_steps=4", "checkpoint.save_every=2", "checkpoint.keep_last=0",
       "eval.num_samples=2", "eval.max_new_tokens=2", "train.eval_max_batches=1", "data.max_seq_len=128",
       "train.global_batch_size=8", "tracking.wandb.mode=disabled", "data.source=jsonl", "data.template=alpaca_short"]


def _rows(n: int) -> bytes:
    return b"".join(json.dumps({"instruction": f"Count to {i}.", "input": "", "output": str(i)}).encode()
                    + b"\n" for i in range(n))


def _train(*overrides: str) -> dict:
    from distft.train import train

    cfg, errors = preflight([*RUN, *overrides])
    assert not errors, errors
    return train(cfg)


def test_a_changed_data_file_is_refused_on_resume_and_on_a_finished_run(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(_rows(600))
    run_dir = tmp_path / "run"
    finished = _train(f"data.path={data}", f"run.dir={run_dir}")
    assert finished["data_fingerprint"]["data.path"]["sha256"] == data_fingerprint(
        preflight([*RUN, f"data.path={data}"])[0].data)["data.path"]["sha256"]
    with open(os.path.join(finished["final_checkpoint"], "trainer_state.json")) as f:
        assert json.load(f)["data_fingerprint"] == finished["data_fingerprint"]

    original = data.read_bytes()
    data.write_bytes(original.replace(b"Count to 3.", b"Count to 4.", 1))  # one byte
    with pytest.raises(CheckpointError) as caught:
        _train(f"data.path={data}", f"run.dir={run_dir}")  # finished: not "already complete" on other data
    message = str(caught.value)
    assert message.startswith(f"{run_dir} holds a run that finished on other data: data.path={data} has other "
                              f"content: {len(original)} -> {len(original)} bytes, sha256 "), message
    assert message.endswith("Pass resume=false to train on the data as it is now (the finished run is kept aside), "
                            "restore the file, or choose another run.dir")

    interrupted = tmp_path / "interrupted"  # as if killed after its step-2 checkpoint
    shutil.copytree(run_dir, interrupted)
    os.remove(interrupted / "summary.json")
    shutil.rmtree(interrupted / "checkpoints" / "step_000004")
    (interrupted / "checkpoints" / "latest").write_text("step_000002\n")
    with pytest.raises(CheckpointError) as caught:
        _train(f"data.path={data}", f"run.dir={interrupted}")
    message = str(caught.value)
    assert message.startswith(f"cannot resume {interrupted}/checkpoints/step_000002: its run trained on other data: "
                              f"data.path={data} has other content: "), message
    assert "Restore the file, pass resume=false to start over" in message
    assert sorted(os.listdir(interrupted / "checkpoints")) == ["latest", "step_000002"]  # nothing touched

    data.write_bytes(original)  # restored: the resume goes on, and ends where the first run did
    resumed = _train(f"data.path={data}", f"run.dir={interrupted}")
    assert resumed["resumed_from"].endswith("step_000002") and resumed["final_train_loss"] == finished["final_train_loss"]
    data.write_bytes(original + _rows(601)[len(original):])  # a row appended
    fresh = _train(f"data.path={data}", f"run.dir={interrupted}", "resume=false")
    assert fresh["resumed_from"] is None and fresh["data_fingerprint"]["data.path"]["bytes"] > len(original)


def test_what_counts_as_a_change():
    """The same content elsewhere is not a change of data; a checkpoint from before fingerprints
    were recorded is not refused; an eval file added or dropped is named."""
    same = {"data.path": {"path": "/a/x.jsonl", "bytes": 10, "sha256": "ab" * 32}}
    moved = {"data.path": {"path": "/b/x.jsonl", "bytes": 10, "sha256": "ab" * 32}}
    assert data_changes(same, moved) == [] and data_changes(None, same) == [] and data_changes(same, None) == []
    with_eval = {**same, "data.eval_path": {"path": "/a/e.jsonl", "bytes": 3, "sha256": "cd" * 32}}
    assert data_changes(same, with_eval) == ["data.eval_path was not set, now /a/e.jsonl"]
    assert data_changes(with_eval, same) == ["data.eval_path was /a/e.jsonl, now not set"]
