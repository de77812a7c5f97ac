"""The trainer's command line: `python -m distft` keeps its contracts (run_dir line, summary.json,
deterministic run directory, one-line errors), `python -m distft.evaluate` reproduces the run
report, and secrets never reach dumps, checkpoints, W&B or the ranks' command lines.

The in-process tests: tests/unit/test_train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from distft.config import run_dir
from tests.cli.test_tracking import sandbox_wandb
from tests.unit.test_train import SECRET, compose, fast, tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """tests/unit/test_train.py's `tiny_runs`, of the one technique the command line is checked on
    here (its seven runs take minutes; the LoRA run, which needs none of the others, seconds)."""
    return {"lora": tiny_run("lora", tmp_path_factory, {})}


def test_evaluate_command_reproduces_the_run_report(tiny_runs, tmp_path):
    summary = tiny_runs["lora"]
    report = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "-m", "distft.evaluate", summary["run_dir"], "--out", str(report)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    assert f"{summary['eval_after']['loss']:.4f}" in text
    assert f"{summary['eval_before']['loss']:.4f}" in text


def _files_holding(root, *secrets: str) -> tuple[list[str], list[str]]:
    """(every regular file under `root`, those whose bytes hold one of `secrets`): text and binary
    alike (W&B's .wandb transaction log is binary)."""
    scanned, hits = [], []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            scanned.append(path)
            with open(path, "rb") as f:
                data = f.read()
            if any(secret.encode() in data for secret in secrets):
                hits.append(path)
    return scanned, hits


def wait_for_wandb_writers(run_dir: str, timeout_s: float = 60.0) -> None:
    """Until W&B's service has closed every offline run's transaction log under `run_dir`.

    `run.finish()` returns once the service has the run's last records, and the service writes and
    closes the .wandb file a few milliseconds later (wandb 0.31: its debug-internal.log says
    "stream: all finished" ~10 ms after debug.log's "restore done"). A process that exits waits for
    it (W&B's atexit teardown); a test that reads the file in the same process must wait too, or it
    scans a file holding only its 7-byte header (seen once in make test)."""
    logs = [os.path.join(run_dir, "wandb", d, "logs", "debug-internal.log")
            for d in os.listdir(os.path.join(run_dir, "wandb")) if d.startswith("offline-run")]
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(log) and "stream: all finished" in open(log).read() for log in logs):
        assert time.monotonic() < deadline, f"W&B's service did not finish writing {logs} in {timeout_s} s"
        time.sleep(0.05)


def test_secrets_never_reach_dumps_checkpoints_or_wandb(request, monkeypatch, tmp_path):
    """A key held in the config (as from a YAML file): redacted in config.yaml, the checkpoints and
    W&B's recorded config; no file the run or W&B writes (W&B's own directories included) holds it."""
    from distft.train import train

    sandbox_wandb(request, monkeypatch, tmp_path)
    cfg = compose("+experiment=tiny_lora", f"run.root={tmp_path}", "tracking.wandb.mode=offline",
                  f"tracking.wandb.api_key={SECRET}", "train.max_steps=3", "eval.num_samples=2",
                  "eval.max_new_tokens=2")
    summary = train(cfg)
    wandb_runs = [d for d in os.listdir(os.path.join(summary["run_dir"], "wandb")) if d.startswith("offline-run")]
    assert wandb_runs, "W&B offline run was not written"
    wait_for_wandb_writers(summary["run_dir"])  # what W&B writes is scanned whole
    scanned, hits = _files_holding(tmp_path, SECRET)
    assert len(scanned) > 10 and hits == []
    transaction_logs = [p for p in scanned if p.endswith(".wandb")]
    assert len(transaction_logs) == 1
    with open(transaction_logs[0], "rb") as f:
        assert b"REDACTED" in f.read()  # W&B's config record: the key, redacted
    assert "REDACTED" in open(os.path.join(summary["run_dir"], "config.yaml")).read()


def test_a_secret_on_the_command_line_reaches_ranks_only_through_the_environment(request, monkeypatch, tmp_path):
    """Issue 13, items 4 and 5, on a 2-rank local run given a W&B key and a token as overrides.

    Every process the run starts (the ranks, W&B's service) gets them through its environment
    and none has them on its command line (read from /proc while they run); W&B's server is a
    loopback port nobody listens on, so the run logs offline after one warning and exits 0; no
    file the run, W&B or a temporary directory holds has them, and W&B's recorded command line
    (in the binary .wandb log, uploaded by `wandb sync`) is the one without them. The launching
    process itself still shows what was typed: Python cannot rewrite its /proc/self/cmdline.
    """
    url = sandbox_wandb(request, monkeypatch, tmp_path)
    token = "hf_distft-canary-9876543210zyxwvutsrq"
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "NETRC": str(tmp_path / "netrc")}
    args = [sys.executable, "-m", "distft", "+experiment=tiny_lora", "parallel=ddp", "launcher.nproc_per_node=2",
            f"run.root={tmp_path / 'runs'}", "tracking.wandb.mode=online", f"tracking.wandb.api_key={SECRET}",
            f"+launcher.env.DISTFT_CANARY_TOKEN={token}", "train.max_steps=2", "eval.num_samples=2",
            "eval.max_new_tokens=2", "train.eval_max_batches=1", "tracking.progress_bar=false"]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err)
        launcher = psutil.Process(proc.pid)
        seen: dict[int, tuple[list[str], dict]] = {}  # pid -> its latest command line and environment
        parents: dict[int, int] = {}
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            try:
                children = launcher.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for child in children:
                try:
                    seen[child.pid] = (child.cmdline(), child.environ())
                    parents[child.pid] = child.ppid()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            time.sleep(0.1)
        proc.wait(timeout=60)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr[-3000:]

    # A child caught between fork and exec still shows the launcher's own command line: not a copy.
    started = [(cmd, penv) for cmd, penv in seen.values() if cmd and cmd != args]
    for cmd, _ in started:
        assert not any(SECRET in part or token in part for part in cmd), cmd
    # A rank's own children caught between fork and exec (W&B's service, a compile worker) show the
    # rank's command line and environment: a rank is a `-m distft` process whose parent is not one.
    distft_pids = {pid for pid, (cmd, _) in seen.items() if cmd[1:3] == ["-m", "distft"] and cmd != args}
    ranks = sorted(((penv.get("RANK"), cmd, penv) for pid, (cmd, penv) in seen.items()
                    if pid in distft_pids and parents.get(pid) not in distft_pids),
                   key=lambda rank: str(rank[0]))
    assert [rank for rank, _, _ in ranks] == ["0", "1"], ranks
    for _, cmd, penv in ranks:
        assert "launcher.nproc_per_node=2" in cmd
        assert penv.get("WANDB_API_KEY") == SECRET and penv.get("DISTFT_CANARY_TOKEN") == token
    services = [cmd for cmd, _ in started if cmd[0].endswith("wandb-core")]  # W&B's service was looked at too
    assert services and all("--no-observability" in cmd for cmd in services)  # offline: it sends nothing

    lines = stdout.splitlines() + stderr.splitlines()
    warnings = [line for line in lines if "W&B" in line and " WARNING " in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("[rank0]") and f"W&B is unreachable at {url} (" in warnings[0]
    offline = warnings[0].rsplit("`wandb sync ", 1)[1].rstrip("`")
    closing = [line for line in lines if "W&B run (offline): " in line]  # the run's last lines say it again
    assert len(closing) == 1 and closing[0].endswith(f"upload it with `wandb sync {offline}`"), closing
    assert os.path.isdir(offline) and os.path.dirname(os.path.dirname(offline)).startswith(str(tmp_path / "runs"))

    scanned, hits = _files_holding(tmp_path, SECRET, token)
    assert hits == []
    transaction_logs = [p for p in scanned if p.startswith(offline) and p.endswith(".wandb")]
    assert len(transaction_logs) == 1
    with open(transaction_logs[0], "rb") as f:
        assert b"launcher.nproc_per_node=2" in f.read()  # the command line W&B recorded: the clean one
    assert any(p.endswith("metrics.jsonl") for p in scanned) and any("checkpoints" in p for p in scanned)


def test_cli_prints_run_dir_writes_contract_and_reruns_in_place(tmp_path):
    args = [sys.executable, "-m", "distft", *fast(tmp_path, "train.max_steps=5", "eval.num_samples=4",
                                                   "eval.max_new_tokens=4", "data.synthetic.num_examples=300")]
    first = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = [line for line in first.stdout.splitlines() if line.startswith("run_dir: ")]
    assert len(lines) == 1
    rdir = lines[0][len("run_dir: "):]
    assert rdir == run_dir(compose(*fast(tmp_path, "train.max_steps=5", "eval.num_samples=4",
                                         "eval.max_new_tokens=4", "data.synthetic.num_examples=300")))
    summary = json.load(open(os.path.join(rdir, "summary.json")))
    for key in ("experiment", "technique", "parallel", "world_size", "steps", "train_tokens", "tokens_per_s",
                "eval_before", "eval_after", "final_checkpoint"):
        assert key in summary, key
    assert summary["experiment"] == "default" and summary["parallel"] == "single" and summary["world_size"] == 1
    assert summary["engine"] == "single process" and summary["mfu"] is None  # the CPU has no known peak
    assert summary["tokens_per_s_per_rank"] == summary["tokens_per_s"] and summary["peak_memory_gb"] > 0.1
    for name in ("eval_report.md", "loss.png", "config.yaml", "metrics.jsonl"):
        assert os.path.exists(os.path.join(rdir, name)), name
    mtime = os.path.getmtime(os.path.join(rdir, "summary.json"))
    second = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert second.returncode == 0
    assert f"run_dir: {rdir}" in second.stdout and "already complete" in second.stdout
    assert os.path.getmtime(os.path.join(rdir, "summary.json")) == mtime


def test_cli_reports_bad_config_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distft", "train.lr=-1", "model=llama_8b"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.lr" in proc.stderr and "llama_8b" in proc.stderr


def test_cli_reports_missing_data_file_clearly(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run([sys.executable, "-m", "distft", "data=jsonl", f"data.path={missing}",
                           f"run.root={tmp_path}", "tracking.wandb.mode=disabled"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(missing) in proc.stderr and "data.path" in proc.stderr


def test_cli_reports_an_unloadable_model_directory_clearly(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("no weights here")
    proc = subprocess.run([sys.executable, "-m", "distft", f"model.name_or_path={empty}", f"run.root={tmp_path}",
                           "tracking.wandb.mode=disabled"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"model.name_or_path='{empty}'" in proc.stderr and "notes.txt" in proc.stderr

