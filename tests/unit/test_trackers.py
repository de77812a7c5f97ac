"""TensorBoard and MLflow (tracking.backends): the same metrics at the same steps as metrics.jsonl,
the config with its secrets redacted, one run kept across a resume; an unknown backend or a
missing package is one preflight message.

One tiny run with W&B off and both trackers on, stopped after step 8 and rerun (it resumes from
its step-4 checkpoint, as tests/unit/test_train.py's crash check does), is shared by the tests:
its files are read back with the trackers' own readers (tensorboard's EventAccumulator, MLflow's
MlflowClient) after the first run and after the resume."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys

import pytest

from distft.config import REDACTED, config_hash
from distft.preflight import preflight
from distft.tracking import MLFLOW_RUN_FILE, read_metrics

SECRET = "sk-distft-trackers-0123456789abcdefghij"

# MLflow lives off the venv's path (the Makefile: DeepSpeed would import it in every process that
# saves a model); these tests put it on theirs, after the venv's own packages.
MLFLOW_DIR = os.path.join(sys.prefix, "test-extras", "mlflow")
if not os.path.isdir(MLFLOW_DIR):
    pytest.fail(f"MLflow for the tests is missing ({MLFLOW_DIR}): run `make setup`", pytrace=False)
sys.path.append(MLFLOW_DIR)
# MLflow 3's import reads platform.platform() (for its telemetry record, sent or not), which on
# Linux asks `uname -p`, a process, once per process: asked here, at collection, so that the runs
# below stay in process (tests/unit/conftest.py refuses a process start while a module runs).
platform.platform()


def compose(*overrides: str):
    cfg, errors = preflight(list(overrides))
    assert errors == [], errors
    return cfg


def tiny(root, *overrides: str):
    """8 steps of tiny_lora, every step logged, checkpoints at 4 and 8, both trackers, W&B off."""
    return compose("+experiment=tiny_lora", f"run.root={root}", "tracking.backends=[tensorboard,mlflow]",
                   "tracking.progress_bar=false", "tracking.plot=false", "train.max_steps=8", "train.log_every=1",
                   "checkpoint.save_every=4", "checkpoint.keep_last=5", "eval.num_samples=4", "eval.max_new_tokens=4",
                   "data.max_seq_len=128", "train.global_batch_size=8", *overrides)


def tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, as TensorBoard shows them (restart markers applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_texts(log_dir: str) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("config/text_summary")]


def mlflow_state(run_dir: str) -> dict:
    """The run's id, metric histories (key -> [(step, value)]), params and status, read back from
    its file store."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    with open(os.path.join(run_dir, MLFLOW_RUN_FILE)) as f:
        run_id = json.load(f)["mlflow_run_id"]
    client = MlflowClient(tracking_uri=Path(run_dir, "mlruns").as_uri())
    run = client.get_run(run_id)
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
               for key in run.data.metrics}
    return {"id": run_id, "history": history, "params": dict(run.data.params), "status": run.info.status,
            "experiment": client.get_experiment(run.info.experiment_id).name,
            "runs_in_experiment": len(client.search_runs([run.info.experiment_id]))}


def jsonl_series(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per numeric key of metrics.jsonl, `time` left out (no tracker gets it)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                series.setdefault(key, []).append((record["step"], value))
    return series


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run, what its trackers held when it ended, then the same command rerun after a crash
    that lost its step-8 checkpoint: it resumes from step 4 and logs steps 5-8 again."""
    from distft.train import train

    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in the run directory
        patch.setenv("WANDB_API_KEY", SECRET)  # a key in the environment, as a user exports it
        cfg = tiny(root)
        cfg.tracking.wandb.api_key = SECRET  # and one in the config, as a YAML of one's own may hold it
        first = train(cfg)
        run_dir = first["run_dir"]
        after_first = {"jsonl": jsonl_series(run_dir), "tensorboard": tensorboard_scalars(os.path.join(run_dir, "tensorboard")),
                       "mlflow": mlflow_state(run_dir)}
        os.remove(os.path.join(run_dir, "summary.json"))
        shutil.rmtree(os.path.join(run_dir, "checkpoints", "step_000008"))
        cfg = tiny(root)
        cfg.tracking.wandb.api_key = SECRET
        resumed = train(cfg)
    assert resumed["run_dir"] == run_dir and resumed["resumed_from"].endswith("step_000004")
    return {"first": first, "after_first": after_first, "resumed": resumed, "run_dir": run_dir}


def test_tensorboard_holds_the_metrics_of_metrics_jsonl(runs):
    """Every numeric key of metrics.jsonl is a TensorBoard scalar at the same steps with the same
    values (TensorBoard stores float32), and nothing else is."""
    jsonl, scalars = runs["after_first"]["jsonl"], runs["after_first"]["tensorboard"]
    assert [s for s, _ in jsonl["loss"]] == list(range(1, 9))
    assert set(scalars) == set(jsonl) >= {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "eval_loss"}
    for key, series in jsonl.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in series], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in series], rel=1e-6), key


def test_mlflow_holds_the_metrics_and_the_redacted_config(runs):
    """MLflow's file store, read back with MlflowClient: the same keys, steps and values as
    metrics.jsonl (MLflow keeps float64: equal), the config as params with the W&B key redacted,
    in the experiment named after run.experiment, the run finished."""
    jsonl, state = runs["after_first"]["jsonl"], runs["after_first"]["mlflow"]
    assert state["history"] == {key: sorted(series) for key, series in jsonl.items()}
    params = state["params"]
    assert params["tracking.wandb.api_key"] == REDACTED
    assert params["tracking.backends"] == '["tensorboard", "mlflow"]'
    assert params["train.max_steps"] == "8" and params["technique.name"] == "lora"
    assert params["run.experiment"] == state["experiment"] == "tiny_lora"
    assert state["status"] == "FINISHED"


def test_the_secret_reaches_no_tracker_file(runs):
    """The W&B key, in the environment and in the config, is nowhere in TensorBoard's files, the
    MLflow store or the MLflow run file; TensorBoard's config text shows it redacted."""
    run_dir = runs["run_dir"]
    paths = [os.path.join(run_dir, MLFLOW_RUN_FILE)]
    for folder in ("tensorboard", "mlruns"):
        paths += [os.path.join(top, name) for top, _, names in os.walk(os.path.join(run_dir, folder)) for name in names]
    assert len(paths) > 20  # the event files, MLflow's params, metrics, tags and meta files
    for path in paths:
        with open(path, "rb") as f:
            assert SECRET.encode() not in f.read(), path
    texts = tensorboard_texts(os.path.join(run_dir, "tensorboard"))
    assert texts and all(f"api_key: '{REDACTED}'" in text and "max_steps: 8" in text for _, text in texts)


def test_a_resumed_run_keeps_its_mlflow_run_and_logs_each_step_once(runs):
    """The rerun continues the same MLflow run (its id kept in the run directory); MLflow and
    TensorBoard hold each step of metrics.jsonl once. TensorBoard shows the rerun's values (its
    restart marker hides the first run's steps 5-8): the timings too, which differ between runs.
    MLflow keeps what it held (the first run logged steps 1-8 and the final evaluation; the rerun
    logs no step again), the same losses up to float rounding, as a resume is exact."""
    run_dir, before = runs["run_dir"], runs["after_first"]
    jsonl = jsonl_series(run_dir)
    assert [s for s, _ in jsonl["loss"]] == list(range(1, 9))  # metrics.jsonl: truncated, then steps 5-8 again
    state = mlflow_state(run_dir)
    assert state["id"] == before["mlflow"]["id"]
    assert state["runs_in_experiment"] == 1  # not a second run for the rerun
    assert state["history"] == before["mlflow"]["history"]
    for key, series in jsonl.items():
        history = state["history"][key]
        assert [s for s, _ in history] == [s for s, _ in series], key  # each step once
        if key in ("loss", "lr", "grad_norm", "eval_loss"):
            assert [v for _, v in history] == pytest.approx([v for _, v in series], rel=1e-5), key
    assert jsonl["step_time_s"][4:] != before["jsonl"]["step_time_s"][4:]  # the rerun's own timings
    scalars = tensorboard_scalars(os.path.join(run_dir, "tensorboard"))
    for key, series in jsonl.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in series], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in series], rel=1e-6), key
    # Two segments, two event files: the rerun's appends beside the first's.
    assert len(os.listdir(os.path.join(run_dir, "tensorboard"))) == 2
    assert [step for step, _ in tensorboard_texts(os.path.join(run_dir, "tensorboard"))] == [0, 5]
    assert state["status"] == "FINISHED"


def test_a_fresh_start_is_a_new_mlflow_run_and_hides_the_old_tensorboard_steps(tmp_path, monkeypatch):
    """An attempt that stopped before its first checkpoint is set aside, and the run starts over
    from step 0 with a new tracker id (checkpoint.resume.tracker_run_id): a new MLflow run, and
    TensorBoard shows the new attempt's steps only. A rank other than 0 writes nothing."""
    from distft.config import Config
    from distft.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config()
    cfg.tracking.backends = ["tensorboard", "mlflow"]
    run_dir = str(tmp_path / "run")
    Tracker(cfg, run_dir, rank=1, run_id="attempt-1").log(1, {"loss": 9.0})
    assert not os.path.exists(run_dir)
    stopped = Tracker(cfg, run_dir, run_id="attempt-1")
    for step, metrics in [(0, {"eval_loss": 3.0}), (1, {"loss": 2.0}), (2, {"loss": 1.0})]:
        stopped.log(step, metrics)
    stopped.finish()
    first = mlflow_state(run_dir)
    fresh = Tracker(cfg, run_dir, run_id="attempt-2")
    fresh.log(0, {"eval_loss": 3.5})
    fresh.log(1, {"loss": 2.5})
    fresh.finish()
    second = mlflow_state(run_dir)
    assert second["id"] != first["id"] and second["runs_in_experiment"] == 2
    assert second["history"] == {"eval_loss": [(0, 3.5)], "loss": [(1, 2.5)]}
    assert tensorboard_scalars(os.path.join(run_dir, "tensorboard")) == {"eval_loss": [(0, 3.5)], "loss": [(1, 2.5)]}


def test_unknown_backend_and_missing_package_are_one_message_each(monkeypatch):
    """At preflight, before anything is built: an unknown name lists the choices; a tracker whose
    package is missing names the pip extra (only where the run starts: a plan needs no tracker;
    W&B only when its mode is not disabled)."""
    _, errors = preflight(["tracking.backends=[tensorboard,neptune]"])
    assert errors == ["tracking.backends: 'neptune' is not one of: wandb, tensorboard, mlflow"]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` finds without the package
    _, errors = preflight(["tracking.backends=[mlflow]"])
    assert errors == ["tracking.backends includes mlflow, but its Python package 'mlflow' is not installed here: "
                      "pip install 'distft[mlflow]' (or drop mlflow from tracking.backends)"]
    assert preflight(["tracking.backends=[mlflow]"], run_here=False)[1] == []
    monkeypatch.setitem(sys.modules, "wandb", None)
    _, errors = preflight(["tracking.wandb.mode=offline"])
    assert errors == ["tracking.backends includes wandb, but its Python package 'wandb' is not installed here: "
                      "pip install 'distft[wandb]' (or drop wandb from tracking.backends or set "
                      "tracking.wandb.mode=disabled)"]
    assert preflight(["tracking.wandb.mode=disabled"])[1] == []


def test_a_password_in_the_mlflow_uri_is_refused_and_backends_leave_the_run_identity_alone():
    """A URI's password would reach every config dump: refused, without repeating it. The
    backends are not part of what is trained: the run directory (config hash) stays the same
    whichever trackers watch it, so existing runs resume where they are."""
    _, errors = preflight(["tracking.mlflow.tracking_uri=https://me:hunter2@mlflow.example:5000"])
    assert len(errors) == 1 and errors[0].startswith("tracking.mlflow.tracking_uri holds a password")
    assert "hunter2" not in errors[0]
    default = compose("+experiment=tiny_lora")
    assert default.tracking.backends == ["wandb"]
    assert config_hash(compose("+experiment=tiny_lora", "tracking.backends=[tensorboard,mlflow]")) == config_hash(default)
