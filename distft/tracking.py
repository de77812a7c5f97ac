"""What a run reports: log lines with the rank, a progress bar, JSONL metrics, W&B, TensorBoard,
MLflow, a loss plot.

Only rank 0 writes files or talks to a tracker; other ranks log to their console only. The
trackers of `tracking.backends` get what metrics.jsonl gets (the same keys and steps, numbers
only) and the config with its secrets redacted; each keeps one run across resumes (W&B and
MLflow by an id kept in the run directory, TensorBoard by its directory): `TensorBoardLog` and
`MlflowLog` say how a resumed run avoids logging a step twice. W&B is imported
lazily (a second of start-up and a service process we do not want when it is off). Without an
API key, `online` falls back to `offline`, which writes a complete run under the run directory
to `wandb sync` later; so does a key without a reachable W&B server (one warning, in seconds,
instead of wandb's 90 s of retries and a traceback). The config given to W&B, like every config
dump, has its secrets redacted; the key itself only ever lives in the environment
(`SECRET_ENVIRONMENT`: the entry point moves a key given on the command line there).

`metrics.jsonl` never stops a run or its resume: an append that fails (a full disk) is cut back
to the last whole line before the one clear error (distft.files.output_error); readers skip a line
that is not JSON (a crash's torn last line, or damage), naming the file and line in a warning; a
resume (`truncate_after`) rewrites the file without it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, Optional

from distft.config import REDACTED, Config, to_dict
from distft.errors import CheckpointError
from distft.files import append_line, make_dirs, read_json, read_json_lines, write_bytes, write_json, write_text

log = logging.getLogger("distft")


def setup_logging(rank: int = 0, level: int = logging.INFO, stream=None) -> None:
    """Every line says its rank, so interleaved multi-rank output stays readable. On stdout (a
    run's log), or `stream` (a command whose stdout is its result: distft/commands/evaluate.py)."""
    root = logging.getLogger("distft")
    root.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


# What libraries print on every start that a user cannot act on, silenced by `quiet_libraries`.
QUIET_BARS = ("Loading weights", "Loading checkpoint shards", "Writing model shards")  # transformers' bars
QUIET_LOG_LINES = {  # logger -> a phrase of the one message of it that is dropped
    # bitsandbytes tries to fetch an optional CPU kernel from the hub on CPUs with AVX512-BF16; the
    # failure says "Set trust_remote_code=True", alarming above a run that never runs hub code.
    "bitsandbytes.backends.cpu.ops": "gemm_4bit_forward",
    # DeepSpeed's accelerator guess on a machine without CUDA (export and chat import it via accelerate).
    "DeepSpeed": "Setting accelerator to CPU",
}
QUIET_WARNINGS = (  # (message regex, category, module regex): deprecations inside the libraries' own calls
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\."),  # peft asks for it
    # torch 2.13 renamed the collectives that DeepSpeed's ZeRO calls (once per rank, every run).
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning,
     r"torch\.distributed\."),
)


class _DropLine(logging.Filter):
    def __init__(self, phrase: str):
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


_DROP_LINES = {name: _DropLine(phrase) for name, phrase in QUIET_LOG_LINES.items()}


def quiet_libraries(every_bar: bool = False) -> None:
    """Silence what third-party libraries print on every start that a user cannot act on, and
    nothing else: the few messages and bars named above (QUIET_*), each by its logger, category
    and text. Every other warning and error, distft's own and the libraries', still shows; hub
    download bars too. Idempotent; every entry point and model load calls it (train, plan,
    distft.model.build's loaders, the evaluate command). `every_bar` (a training run): every
    transformers progress bar ("Loading weights", "Writing model shards") and its info lines
    too, which would drown the run's own output in logs."""
    import warnings

    if every_bar:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, drop in _DROP_LINES.items():
        logging.getLogger(name).addFilter(drop)  # once: addFilter skips a filter it holds already
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return
    if not hasattr(transformers_logging, "set_tqdm_hook"):  # older transformers: every bar off
        transformers_logging.disable_progress_bar()
        return
    previous = transformers_logging.set_tqdm_hook(_hide_loading_bars)
    if previous not in (None, _hide_loading_bars):  # someone else's hook: theirs to decide
        transformers_logging.set_tqdm_hook(previous)


def _hide_loading_bars(factory, args, kwargs):
    """transformers' tqdm hook: its weight loading and writing bars made silent, others as they were."""
    if kwargs.get("desc") in QUIET_BARS:
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


# Secret config keys and the environment variable each is read from. A key given as a command-line
# override is moved into its variable before anything sees the command line (distft/commands/train.py),
# so rank processes and SLURM jobs inherit it and no command line or file holds it.
SECRET_ENVIRONMENT = {"tracking.wandb.api_key": "WANDB_API_KEY"}

# How long `online` waits for the W&B server to answer before logging offline instead.
WANDB_PROBE_TIMEOUT_S = 5.0


def resolve_wandb_mode(cfg: Config) -> tuple[str, Optional[str]]:
    """(mode, api key) after the no-key fallback: online without a key becomes offline."""
    mode = cfg.tracking.wandb.mode
    key = cfg.tracking.wandb.api_key or os.environ.get("WANDB_API_KEY")
    if mode == "online" and not key:
        return "offline", None
    return mode, key


class Tracker:
    """Metrics sink of one run: `metrics.jsonl` always, the trackers of `tracking.backends` (W&B
    unless tracking.wandb.mode=disabled, TensorBoard, MLflow); rank 0 only. `run_id`: the run
    directory's tracker id (checkpoint.resume.tracker_run_id), W&B's run id and the key that
    ties the MLflow run to this attempt."""

    def __init__(self, cfg: Config, run_dir: str, rank: int = 0, run_id: Optional[str] = None):
        self.enabled = rank == 0
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb_run = None
        self.wandb_mode = "disabled"
        self.tensorboard: Optional[TensorBoardLog] = None
        self.mlflow: Optional[MlflowLog] = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        backends = cfg.tracking.backends
        mode, key = resolve_wandb_mode(cfg) if "wandb" in backends else ("disabled", None)
        if mode != "disabled":
            self.wandb_run, mode = _start_wandb(cfg, run_dir, mode, key, run_id)
        self.wandb_mode = mode  # what W&B runs as: "offline" after a fallback from "online"
        if "tensorboard" in backends:
            self.tensorboard = TensorBoardLog(cfg, run_dir)
        if "mlflow" in backends:
            self.mlflow = MlflowLog.start(cfg, run_dir, run_id)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        append_line(self.metrics_path, json.dumps(record), what="the metrics file")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        if self.tensorboard is not None:
            self.tensorboard.log(step, scalars)
        if self.mlflow is not None and not self.mlflow.log(step, scalars):
            self.mlflow = None  # it said why, once; metrics.jsonl and the other trackers go on

    def truncate_after(self, step: int) -> None:
        """Drop metrics of steps after `step` (a resumed run logs them again)."""
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.resume_after(step)
        if not os.path.exists(self.metrics_path):
            return
        kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= step]  # torn lines dropped
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept), what="the metrics file")

    def predictions(self, step: int, path: str) -> None:
        """The final evaluation's predictions file as a W&B table `eval/predictions` (one row per
        prompt: task, prompt, reference, then each model's output, truncated flag and exact
        match), when W&B is on. The file itself stays the record."""
        if self.wandb_run is None:
            return
        import wandb

        records = read_json_lines(path)
        labels = list(records[0]["outputs"]) if records else []
        columns = ["index", "task", "prompt", "reference"]
        for label in labels:
            columns += [f"{label}_output", f"{label}_truncated", f"{label}_exact_match", f"{label}_f1"]
        rows = []
        for r in records:
            row = [r["index"], r["task"], r["prompt"], r["reference"]]
            for label in labels:
                out = r["outputs"][label]
                row += [out["text"], out["truncated"], out.get("exact_match"), out.get("f1")]
            rows.append(row)
        self.wandb_run.log({"eval/predictions": wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            flat = flatten(values)
            for k, v in flat.items():
                if isinstance(v, (int, float, str)):
                    self.wandb_run.summary[k] = v

    def where(self) -> Optional[tuple[str, str]]:
        """(mode, where) of the W&B run: its URL online; offline, its directory, which `wandb sync
        <directory>` uploads later. None without one (disabled, or not rank 0)."""
        if self.wandb_run is None:
            return None
        if self.wandb_mode == "offline":
            return "offline", os.path.dirname(self.wandb_run.dir)  # .../wandb/offline-run-<time>-<id>
        return self.wandb_mode, self.wandb_run.url or self.wandb_run.dir

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.mlflow is not None:
            self.mlflow.finish()
            self.mlflow = None


def _missing(backend: str, module: str) -> RuntimeError:
    """A tracker's package missing in a run that preflight did not check (a library call)."""
    return RuntimeError(f"tracking.backends includes {backend}, but the Python package {module!r} is not installed: "
                        f"pip install 'distft[{backend}]', or drop {backend} from tracking.backends")


def _config_text(cfg: Config) -> str:
    """The config as the run directory's config.yaml holds it, secrets redacted."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg, redact=True)))


class TensorBoardLog:
    """The run's TensorBoard log: `<run dir>/tensorboard/`, one directory for every segment of the
    run (each writes an event file of its own beside the earlier ones, appending), scalars named
    as in metrics.jsonl, and the redacted config as the text `config` at each segment's first
    logged step.

    Decided: a resumed run purges, it does not skip. A run stopped at step T+X resumes from its
    checkpoint of step T and logs steps T+1.. again, as metrics.jsonl does (`truncate_after`).
    Its writer is opened with purge_step=T+1 (`resume_after`): the event file starts with
    TensorBoard's restart marker (SessionLog.START at T+1), and TensorBoard's readers (the UI,
    EventAccumulator) drop every earlier event at steps >= T+1, so each step shows once, with the
    value metrics.jsonl holds. The old events stay in the older files (event files are
    append-only). A fresh start (no checkpoint) purges from step 0: what a stopped attempt left is
    hidden. The writer flushes after every log: a killed run loses nothing it logged."""

    def __init__(self, cfg: Config, run_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer imports the tensorboard package
            raise _missing("tensorboard", "tensorboard") from err
        self._writer_class = SummaryWriter
        self.dir = make_dirs(os.path.join(run_dir, "tensorboard"), run_dir, "TensorBoard's files")
        self.config = _config_text(cfg)
        self.first_step = 0  # this segment's first step: the purge step
        self.writer = None
        log.info("TensorBoard: tensorboard --logdir %s", self.dir)

    def resume_after(self, step: int) -> None:
        """This segment continues from the checkpoint of `step`: steps after it are logged again."""
        if self.writer is None:
            self.first_step = step + 1

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            self.writer = self._writer_class(self.dir, purge_step=self.first_step)
            self.writer.add_text("config", "```yaml\n" + self.config + "```", global_step=step)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


MLFLOW_RUN_FILE = "mlflow_run.json"  # in the run directory: the MLflow run this run continues


class MlflowLog:
    """The run's MLflow run, through MlflowClient (no process-wide active run or tracking URI:
    several trainings share a process in a sweep or a test, and a user's script may hold an
    active run of its own). Where: tracking.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else a
    file store in the run directory (`<run dir>/mlruns`; MLflow 3 refuses file stores unless
    MLFLOW_ALLOW_FILE_STORE is true, which is set for them when the environment leaves it unset,
    as is MLFLOW_DISABLE_TELEMETRY).

    One run across resumes: its id goes into `<run dir>/mlflow_run.json` with the tracker id it
    belongs to (`run_id`); a rerun with the same tracker id continues it (status back to
    RUNNING), while a fresh start, whose earlier attempt's tracker id was set aside, and
    `resume=false` get a new run. The config is its params (flattened, secrets redacted);
    MLflow's params cannot change, so a resume adds new keys only and names the changed ones.

    Decided: a resumed run skips, it does not purge. MLflow's metric history is append-only, and
    a (key, step) logged twice is plotted twice, so each key is logged only at steps after the
    last one the run already holds for it (read back at resume), as W&B ignores steps below its
    run's current one. Steps T+1..T+X a stopped attempt logged keep that attempt's values (a
    resume is exact: the same up to float rounding). An MLflow error (a server gone) is one
    warning, and the run goes on without MLflow: metrics.jsonl keeps the record."""

    def __init__(self, client, run_id: str, where: str, logged: dict[str, int]):
        self.client, self.run_id, self.where, self.logged = client, run_id, where, logged

    @classmethod
    def start(cls, cfg: Config, run_dir: str, tracker_id: Optional[str]) -> Optional[MlflowLog]:
        from urllib.parse import urlsplit

        settings = cfg.tracking.mlflow
        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            from pathlib import Path

            uri = Path(make_dirs(os.path.join(run_dir, "mlruns"), run_dir, "MLflow's files")).as_uri()
        if urlsplit(uri).scheme in ("", "file") and not uri.startswith("databricks"):  # a path: a file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            # A run on this machine's disk sends nothing anywhere: MLflow 3's usage telemetry (read
            # when mlflow is first imported) is off unless the environment says otherwise.
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise _missing("mlflow", "mlflow") from err
        where, name = _without_password(uri), settings.experiment or cfg.run.experiment
        path = os.path.join(run_dir, MLFLOW_RUN_FILE)
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(name)
                except MlflowException:  # another run created it meanwhile
                    experiment_id = client.get_experiment_by_name(name).experiment_id
            else:
                experiment_id = experiment.experiment_id
            run = cls._continue(client, _read_mlflow_run(path), tracker_id, where)
            if run is None:
                run = client.create_run(experiment_id, run_name=os.path.basename(run_dir),
                                        tags={"distft.run_dir": run_dir, "distft.tracker_run_id": str(tracker_id)})
                write_json(path, {"tracker_run_id": tracker_id, "mlflow_run_id": run.info.run_id},
                           what="the MLflow run id")
            logged = {key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
                      for key in run.data.metrics}
            _log_params(client, run, cfg)
        except (MlflowException, OSError) as err:
            log.warning("MLflow at %s did not start the run (%s); this run logs without MLflow (metrics.jsonl "
                        "keeps every metric)", where, _first_line(err))
            return None
        log.info("MLflow: run %s of experiment %s at %s", run.info.run_id, name, where)
        return cls(client, run.info.run_id, where, logged)

    @staticmethod
    def _continue(client, stored: Optional[dict], tracker_id: Optional[str], where: str):
        """The stored MLflow run, RUNNING again, when it belongs to this attempt and still exists."""
        if not stored or stored.get("tracker_run_id") != tracker_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(stored["mlflow_run_id"])
        except MlflowException as err:  # deleted, or another tracking URI than the run started with
            log.warning("MLflow run %s is not at %s (%s); this run continues in a new MLflow run",
                        stored["mlflow_run_id"], where, _first_line(err))
            return None
        client.update_run(run.info.run_id, status="RUNNING")
        return run

    def log(self, step: int, scalars: dict[str, float]) -> bool:
        """Log the keys this run does not hold at `step` yet; False after an MLflow error (warned)."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()
                   if step > self.logged.get(key, -1)]
        try:
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)
        except (MlflowException, OSError) as err:
            log.warning("MLflow at %s failed to log step %d (%s); the rest of this run logs without MLflow "
                        "(metrics.jsonl keeps every metric)", self.where, step, _first_line(err))
            return False
        return True

    def finish(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_terminated(self.run_id, "FINISHED")
        except (MlflowException, OSError) as err:
            log.warning("MLflow at %s did not mark run %s finished (%s)", self.where, self.run_id, _first_line(err))


# MLflow's limits (mlflow.utils.validation): a param's value, a key's length and characters.
MLFLOW_PARAM_VALUE_MAX = 6000
MLFLOW_KEY_MAX = 250


def _log_params(client, run, cfg: Config) -> None:
    """The config, secrets redacted, as the run's params: new keys only (params cannot change)."""
    from mlflow.entities import Param

    held = run.data.params
    params = {}
    for key, value in flatten(to_dict(cfg, redact=True), sep=".").items():
        key = re.sub(r"[^\w\-. /]", "_", key)[:MLFLOW_KEY_MAX]
        params[key] = (json.dumps(value) if isinstance(value, (list, tuple)) else str(value))[:MLFLOW_PARAM_VALUE_MAX]
    changed = sorted(k for k, v in params.items() if k in held and held[k] != v)
    if changed:
        log.info("MLflow keeps the params this run started with; changed since: %s", ", ".join(changed))
    new = [Param(k, v) for k, v in params.items() if k not in held]
    if new:
        client.log_batch(run.info.run_id, params=new)


def _read_mlflow_run(path: str) -> Optional[dict]:
    if not os.path.lexists(path):
        return None
    try:
        stored = read_json(path, max_bytes=1 << 20)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the run directory is damaged: remove that file to "
                              "resume (the run then logs to a new MLflow run)") from None
    return stored if isinstance(stored, dict) else None


def _without_password(uri: str) -> str:
    """`uri` for a log line: a password in it (user:password@host) replaced."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)).geturl()


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or ['no message'])[0]}"


def _start_wandb(cfg: Config, run_dir: str, mode: str, key: Optional[str], run_id: Optional[str]):
    """(the W&B run, the mode it runs in). `online` first asks the server whether it is there
    (`wandb_unreachable`, a few seconds at most) and starts offline, with one warning that says
    why and how to upload later, when it is not or when it refuses the run (a bad key): a W&B
    outage never ends a training run. An offline run sends nothing anywhere: W&B's error
    reporting to its server is turned off (WANDB_ERROR_REPORTING, unless the environment sets it)."""
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError(
            "tracking.wandb.mode is not 'disabled' but wandb is not installed: pip install wandb, "
            "or set tracking.wandb.mode=disabled"
        ) from err
    if key:
        os.environ["WANDB_API_KEY"] = key  # this process only; never written anywhere
    why_offline = None
    if mode == "online":
        base_url = _wandb_base_url(wandb)
        problem = wandb_unreachable(base_url)
        if problem is None:
            try:
                return _init_wandb(wandb, cfg, run_dir, "online", run_id), "online"
            except wandb.errors.Error as err:
                problem = f"{type(err).__name__}: {(str(err).strip().splitlines() or ['no message'])[0]}"
                why_offline = f"W&B at {base_url} did not start the run ({problem})"
        else:
            why_offline = f"W&B is unreachable at {base_url} ({problem})"
        wandb.teardown()  # the offline run gets a session (and service process) of its own
        mode = "offline"
    if mode == "offline":
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    run = _init_wandb(wandb, cfg, run_dir, mode, run_id)
    if why_offline:
        sync_dir = getattr(run.settings, "sync_dir", None) or os.path.join(run_dir, "wandb", "offline-run-*")
        log.warning("%s; this run logs offline: upload it later with `wandb sync %s`", why_offline, sync_dir)
    return run, mode


def _init_wandb(wandb, cfg: Config, run_dir: str, mode: str, run_id: Optional[str]):
    w = cfg.tracking.wandb
    make_dirs(os.path.join(run_dir, "wandb"), run_dir, "W&B's files")  # a planted `wandb` link: refused
    return wandb.init(
        project=w.project,
        entity=w.entity,
        name=os.path.basename(run_dir),
        group=cfg.run.experiment,
        id=run_id,
        resume="allow",
        dir=run_dir,
        mode=mode,
        tags=list(w.tags),
        config=to_dict(cfg, redact=True),
        settings=wandb.Settings(silent=True, x_disable_stats=True, console="off"),
    )


def _wandb_base_url(wandb) -> str:
    """The server W&B would talk to: WANDB_BASE_URL, `wandb login --host`'s settings file, or its
    default; read without starting W&B's service process (so that an offline fallback can still
    start it without error reporting)."""
    try:
        from wandb.sdk import wandb_setup

        return str(wandb_setup.singleton().settings.base_url)
    except Exception:  # noqa: BLE001 - a private API of wandb; its public settings are the fallback
        return os.environ.get("WANDB_BASE_URL") or str(wandb.Settings().base_url)


def wandb_unreachable(base_url: str, timeout: float = WANDB_PROBE_TIMEOUT_S) -> Optional[str]:
    """Why nothing answers at `base_url`, or None when a server does.

    One HTTP request through urllib, which takes HTTP(S)_PROXY and NO_PROXY from the environment
    as W&B does. Any HTTP answer (401, 404, a redirect) and any TLS problem count as reachable:
    whether the key and the certificates are good is W&B's to judge with its own settings; only
    "no server" (DNS failure, connection refused, no answer) sends a run offline. The request
    runs in a thread joined with a deadline, as a DNS lookup ignores socket timeouts.
    """
    outcome: list[Optional[str]] = []

    def probe() -> None:
        import http.client
        import ssl
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(urllib.request.Request(base_url, method="HEAD"), timeout=timeout):
                outcome.append(None)
        except (urllib.error.HTTPError, http.client.HTTPException, ssl.SSLError):
            outcome.append(None)  # an HTTP status, a non-HTTP answer, a TLS problem: something is there
        except urllib.error.URLError as err:
            reason = err.reason
            outcome.append(None if isinstance(reason, ssl.SSLError) else str(reason) or type(reason).__name__)
        except (OSError, ValueError) as err:  # a timeout while reading, a reset, a malformed URL
            outcome.append(str(err) or type(err).__name__)

    thread = threading.Thread(target=probe, name="distft-wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"


def flatten(values: dict, prefix: str = "", sep: str = "/") -> dict:
    """Nested dicts as one level: {"a": {"b": 1}} -> {"a/b": 1}."""
    out = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + sep, sep))
        else:
            out[key] = v
    return out


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file (`files.read_json_lines`). Decided: a torn or damaged line is
    skipped with a warning, not fatal: metrics are a record for plots and people, and a run, its
    resume (which rewrites the file without them) and its plot must not fail on them."""
    return read_json_lines(path)


def plot_losses(metrics_path: str, out_path: str, best_step: Optional[int] = None) -> Optional[str]:
    """Train and eval loss against step, as a PNG next to the metrics, the best periodic eval
    (`best_step`) marked. Written to a temporary name and renamed; a failure (a full disk)
    leaves no partial PNG and raises one OutputError."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    best = [(step, loss) for step, loss in evals if step == best_step]
    if best:
        ax.axvline(best[-1][0], color="tab:green", linestyle="--", alpha=0.6)
        ax.plot(*best[-1], marker="*", markersize=14, color="tab:green", linestyle="none",
                label=f"best eval loss {best[-1][1]:.3f} (step {best[-1][0]})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    run = os.path.dirname(os.path.abspath(out_path))
    ax.set_title(f"{os.path.basename(os.path.dirname(run))}/{os.path.basename(run)}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, format="png")
    finally:
        plt.close(fig)
    write_bytes(out_path, image.getvalue(), "the loss plot")
    return out_path


def flops_per_token(total_params: int, num_layers: int, hidden_size: int, seq_len: int, full: bool) -> float:
    """Training FLOPs per token: the matmuls (6N with weight gradients, 4N when the base is frozen
    and only activation gradients flow through it) plus causal attention scores and values,
    12 * layers * hidden * seq_len forward and backward (PaLM, appendix B). Counted per token
    processed, padding included, as the hardware does the work."""
    return (6.0 if full else 4.0) * total_params + 12.0 * num_layers * hidden_size * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_tflops: float, devices: int) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]; None when the peak of the hardware is unknown."""
    if peak_tflops <= 0 or devices <= 0:
        return None
    return tokens_per_s * flops_token / (peak_tflops * 1e12 * devices)


class MemoryMeter:
    """This rank's peak memory while it trains, above what it held before the model was built:
    the figure the planner estimates (weights, gradients, optimizer state, communication
    buffers, activations; not its fixed overhead).

    - GPU (`cuda_allocated`): allocated CUDA memory, torch's peak counter reset at the start.
    - CPU with tracking.cpu_memory_steps=N (`cpu_tensors`): every tensor allocation, counted by
      torch's profiler (profile_memory) from the model build through the first N optimizer
      steps (step 1 creates the optimizer state; each step holds gradients and activations).
    - CPU otherwise (`host_rss`): the process's resident-set peak (VmHWM, reset at the start
      through /proc/self/clear_refs) minus its size at the start. It includes the code that the
      first model build and step import (~200 MB with torch, transformers and peft), so it is
      not comparable with the plan for small models.
    """

    def __init__(self, device, cpu_steps: int = 0) -> None:
        import torch

        self.device = device
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self.cpu_steps = 0 if self.cuda else cpu_steps
        self._profiler = None
        self._profiled_peak = 0
        self.reset = False
        if self.cuda:
            self.kind = "cuda_allocated"
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
            return
        self.baseline = _proc_status_bytes("VmRSS")
        self.reset = _reset_peak_rss()
        self.kind = "host_rss"
        if self.cpu_steps > 0:
            from torch.profiler import ProfilerActivity, profile

            # The profiler sees the allocations of the threads it runs on: transformers 5 loads
            # checkpoint weights on a thread pool, whose copies it would miss (SmolLM2's 0.5 GiB
            # of fp32 weights were not counted). Loading on this thread is the same allocation.
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"

            self.kind, self.baseline = "cpu_tensors", 0
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()

    def step(self, steps_taken: int) -> None:
        """Called after each optimizer step of this process (the count since it started)."""
        if self._profiler is not None and steps_taken >= self.cpu_steps:
            self.stop()

    def stop(self) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self._profiled_peak = _profiled_peak_bytes(profiler)

    def peak(self) -> int:
        """Peak bytes (absolute; for cpu_tensors: allocated since the start)."""
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        if self.kind == "cpu_tensors":
            self.stop()
            return self._profiled_peak
        return self.rss_peak()

    def process_peak(self) -> int:
        """The process's peak: allocated CUDA memory on a GPU, the resident set on the CPU."""
        import torch

        return torch.cuda.max_memory_allocated(self.device) if self.cuda else self.rss_peak()

    def rss_peak(self) -> int:
        if self.reset:
            return _proc_status_bytes("VmHWM")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def training(self) -> int:
        """Peak bytes above the start: what the model, its training state and the activations took."""
        return max(0, self.peak() - self.baseline)


def _profiled_peak_bytes(profiler) -> int:
    """The most CPU bytes that tensors allocated while `profiler` ran held at once, above what
    they held when it started.

    Each allocation event carries torch's running total of profiled CPU bytes. That total is
    the process's, not the profile's: it starts at 0 only in a process's first profile, and a
    tensor allocated during an earlier profile and freed while none ran stays in it for good
    (measured on torch 2.13: 100 MB freed between two profiles, the second's first event read
    100 MB + its own size). So the peak is taken above the total the first event started from:
    a second run in one process (a sweep on Hydra's basic launcher, the test suite's shared
    launches) measures what a fresh process measures."""
    from torch._C._profiler import _ExtraFields_Allocation

    events, pending = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        fields = node.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - start)


def _proc_status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


class Progress:
    """A tqdm bar (loss, lr, tokens/s; tqdm computes the ETA) on an interactive terminal; plain
    log lines every `log_every` steps elsewhere (CI, SLURM logs), where a bar is noise.

    While the bar is shown, console log lines (the "distft" logger's, and the root logger's that
    Hydra sets up) go through `tqdm.write` (tqdm's logging redirect): the bar is cleared, the line
    written whole on stdout, the bar redrawn under it. Written straight to stdout, a line would
    land after the half-drawn bar on stderr, and the bar would go on in the middle of it."""

    def __init__(self, total: int, initial: int, enabled: bool, log_every: int):
        self.log_every = log_every
        self.total = total
        self.start = time.time()
        self.start_step = initial
        self.first_step_end: float | None = None
        self.bar = None
        self.enabled = enabled
        self._redirect = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            consoles = [logger for logger in (logging.getLogger("distft"), logging.getLogger())
                        if any(_writes_to_console(handler) for handler in logger.handlers)]
            self._redirect = logging_redirect_tqdm(loggers=consoles)
            self._redirect.__enter__()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            return
        if self.first_step_end is None:
            self.first_step_end = time.time()
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start_step
            # From the second step on, the first one (which may compile the layers, warm up CUDA's
            # kernels, or read the data cache) is left out of the rate: one slow start no longer
            # inflates every ETA of the run.
            if done > 1:
                eta = (time.time() - self.first_step_end) / (done - 1) * (self.total - step)
            else:
                eta = (time.time() - self.start) * (self.total - step)
            log.info(
                "step %d/%d loss %.4f lr %.2e tokens/s %.0f eta %s",
                step, self.total, loss, lr, tokens_per_s, _fmt_seconds(eta),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._redirect is not None:  # the loggers' own handlers back
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def _writes_to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


PROGRESS_EVERY_S = 10.0  # how often a slow generation logs where it is (off a terminal)


class GenerationProgress:
    """Where generating answers to held-out prompts is: prompts answered of the total, tokens
    decoded per second, the time left. Generation is the slow part of an evaluation (the default
    job's 64 prompts x 32 tokens: 31 s on one thread, 14.5 min on torch's default two threads of a
    loaded 2-core machine; issue 35), so it is never silent for long.

    As `Progress` does for training: a tqdm bar on an interactive terminal; elsewhere a log line
    every PROGRESS_EVERY_S seconds while it runs, and one at the end when any was written (a
    generation that ends sooner adds no line). The generator reports each decoding step
    (`decoded`) and each batch of prompts answered (`answered`); `start` and `close` bracket one
    generation, so one object may serve several. Off on every rank but the one that logs
    (`enabled`; None: rank 0 of the job, from the launcher's environment); `bar=False`: log lines
    even on a terminal (the default of a library call: a chat's answer draws no bar)."""

    def __init__(self, label: str = "generation", enabled: Optional[bool] = None, every_s: Optional[float] = None,
                 bar: bool = True):
        if enabled is None:
            rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
            enabled = rank == "0"
        self.label, self.enabled, self.draws = label, enabled, bar
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.bar = None
        self.start(0)

    def start(self, total: int) -> None:
        self.close()
        self.total, self.done, self.tokens, self.lines = total, 0, 0, 0
        self.started = self.last = time.time()
        if self.enabled and self.draws and total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="prompt", dynamic_ncols=True, leave=False)

    def decoded(self, tokens: int) -> None:
        """`tokens` more tokens decoded (one step of a batch: one per row still in it)."""
        self.tokens += tokens
        self._show()

    def answered(self, prompts: int) -> None:
        self.done += prompts
        if self.bar is not None:
            self.bar.update(prompts)
        self._show()

    def line(self, final: bool = False) -> str:
        elapsed = time.time() - self.started
        rate = self.tokens / max(elapsed, 1e-9)
        if final:
            return (f"{self.label}: {self.done}/{self.total} prompts answered in {_fmt_seconds(elapsed)}, "
                    f"{self.tokens} tokens, {rate:.1f} tokens/s")
        eta = f", eta {_fmt_seconds(elapsed / self.done * (self.total - self.done))}" if self.done else ""
        return (f"{self.label}: {self.done}/{self.total} prompts answered, {self.tokens} tokens in "
                f"{_fmt_seconds(elapsed)}, {rate:.1f} tokens/s{eta}")

    def _show(self) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.bar is not None:
            if now - self.last >= 1.0:
                self.bar.set_postfix(tok_s=f"{self.tokens / max(now - self.started, 1e-9):.1f}")
                self.last = now
            return
        if now - self.last >= self.every_s:
            log.info("%s", self.line())
            self.lines += 1
            self.last = now

    def close(self) -> None:
        """The end of one generation: its last line (when any was logged) or the bar cleared."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and getattr(self, "lines", 0):
            log.info("%s", self.line(final=True))
        self.lines = 0
