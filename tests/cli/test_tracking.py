"""Tracking through processes: W&B's offline fallback without a server (W&B starts its own service
process), the predictions table, a full disk and a planted link for the metrics file in a child,
and log lines through the progress bar on a real terminal.

W&B never talks to anything but loopback here: `sandbox_wandb` points it at a local port.

The in-process tests: tests/unit/test_tracking.py."""

from __future__ import annotations

import glob
import http.server
import json
import os
import socket
import threading
import time

import psutil

from distft.config import Config
from distft.tracking import Tracker, read_metrics
from tests.unit.test_tracking import _distft_warnings


def sandbox_wandb(request, monkeypatch, root) -> str:
    """W&B for one test: its server a loopback port where nothing listens (bound, never listening:
    connections are refused at once), no proxy, its config/cache/data directories under `root`, and
    a session of its own (wandb reads the environment once per session). Returns the server URL."""
    import wandb

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    request.addfinalizer(closed.close)
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy") or name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(root / "wandb-home" / name.lower()))
    # Variables the tracker sets in this process: restored after the test.
    for name in ("WANDB_API_KEY", "WANDB_ERROR_REPORTING"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    wandb.teardown()
    request.addfinalizer(wandb.teardown)
    return url


def _online(tmp_path):
    cfg = Config()
    cfg.tracking.wandb.mode = "online"
    cfg.tracking.progress_bar = False
    return cfg, str(tmp_path / "run")


def _offline_run_of(run_dir: str) -> str:
    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1, runs
    assert glob.glob(os.path.join(runs[0], "*.wandb")), "no W&B transaction log written"
    return runs[0]


def test_online_without_a_reachable_server_logs_offline_with_one_warning(request, monkeypatch, tmp_path):
    """A key but no server (issue 13, item 5): offline in seconds with one warning that names the
    server, the reason and the `wandb sync` command, instead of 90 s of retries and a traceback."""
    url = sandbox_wandb(request, monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    warnings = _distft_warnings(request)
    cfg, run_dir = _online(tmp_path)
    started = time.monotonic()
    tracker = Tracker(cfg, run_dir)
    services = [p.cmdline() for p in psutil.Process().children(recursive=True) if p.name() == "wandb-core"]
    tracker.log(1, {"loss": 2.5})
    tracker.finish()
    assert time.monotonic() - started < 30  # wandb alone retries for 90 s
    assert tracker.wandb_mode == "offline"
    offline = _offline_run_of(run_dir)
    messages = list(warnings)
    assert len(messages) == 1, messages
    assert f"W&B is unreachable at {url} (" in messages[0] and "Connection refused" in messages[0]
    assert messages[0].endswith(f"this run logs offline: upload it later with `wandb sync {offline}`")
    # Offline sends nothing, not even W&B's own telemetry (which goes to the server even offline).
    assert len(services) == 1 and "--no-observability" in services[0], services


def _serve(request, status: int) -> str:
    """A loopback HTTP server answering every request with `status` (a W&B that refuses the key)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = do_HEAD = _answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.server_close)
    request.addfinalizer(server.shutdown)
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_a_server_that_refuses_the_run_also_means_offline(request, monkeypatch, tmp_path):
    """The server answers (so the probe lets `online` try) but refuses the key: wandb's error
    becomes the one warning and the run logs offline; an HTTP error is not "unreachable"."""
    from distft.tracking import wandb_unreachable

    sandbox_wandb(request, monkeypatch, tmp_path)
    url = _serve(request, 401)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    assert wandb_unreachable(url) is None
    warnings = _distft_warnings(request)
    cfg, run_dir = _online(tmp_path)
    tracker = Tracker(cfg, run_dir)
    tracker.log(1, {"loss": 2.5})
    tracker.finish()
    assert tracker.wandb_mode == "offline"
    offline = _offline_run_of(run_dir)
    messages = list(warnings)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"W&B at {url} did not start the run (CommError")
    assert messages[0].endswith(f"`wandb sync {offline}`")


# A child that fills a real disk for the metrics writer: a file-size limit (RLIMIT_FSIZE, with
# SIGXFSZ ignored, as Python does) gives the short write and EFBIG a full disk gives; a real
# tmpfs of 8 kB, mounted in a mount namespace of its own (`unshare`), gives ENOSPC. A link to
# /dev/full planted as the metrics file is refused, never written through. No torch is imported:
# it starts in a fraction of a second.
FULL_METRICS_CHILD = r"""
import json, os, resource, signal, sys
from distft.config import Config
from distft.errors import OutputError, UnsafePathError
from distft.tracking import Tracker

run_dir, how = sys.argv[1], sys.argv[2]
cfg = Config()
cfg.tracking.wandb.mode = "disabled"
tracker = Tracker(cfg, run_dir)
if how == "dev_full_link":
    os.symlink("/dev/full", tracker.metrics_path)
elif how == "fsize":
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0 / step})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = os.path.getsize(tracker.metrics_path) + 40  # the next record (~150 bytes) fits only in part
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    for step in range(4, 1000):  # the 8 kB tmpfs fills after ~50 records
        tracker.log(step, {"loss": 0.25, "note": "x" * 100})
except UnsafePathError as err:
    print(json.dumps({"error": str(err), "refused": True}))
except OutputError as err:
    text = open(tracker.metrics_path).read()  # on the tmpfs, gone with the namespace: read it here
    print(json.dumps({"error": str(err), "text": text, "at": step}))
"""


def _fill_the_metrics_disk(tmp_path, how: str) -> tuple[str, dict]:
    import json
    import subprocess
    import sys

    run_dir = str(tmp_path / how)
    command = [sys.executable, "-c", FULL_METRICS_CHILD, run_dir, how]
    if how == "tmpfs":
        os.makedirs(run_dir)
        command = ["unshare", "--map-root-user", "--mount", "sh", "-c",
                   'mount -t tmpfs -o size=8k tmpfs "$1" && shift && exec "$@"', "_", run_dir, *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return os.path.join(run_dir, "metrics.jsonl"), json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_full_disk_while_appending_metrics_leaves_whole_lines_and_one_clear_error(tmp_path, request):
    """A real short write and EFBIG (the file-size limit reached mid-record), then ENOSPC (a real
    full tmpfs): one OutputError naming the file, the full disk and what to do, and the file
    still ends with a whole line, so the rerun reads it without a warning. Before: the torn
    record stayed and every later read (the resume, the plot) died with JSONDecodeError."""
    path, outcome = _fill_the_metrics_disk(tmp_path, "fsize")
    message = outcome["error"]
    assert path in message and "File too large (EFBIG)" in message, message
    assert "disk (or quota)" in message and "free space" in message and "rerun the same command" in message
    warnings = _distft_warnings(request)
    with open(path) as f:
        text = f.read()
    assert text.endswith("\n") and len(text.splitlines()) == 3, text  # step 4 cut back, not torn
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3] and warnings == []

    path, outcome = _fill_the_metrics_disk(tmp_path, "tmpfs")
    assert path in outcome["error"] and "No space left on device (ENOSPC)" in outcome["error"]
    assert "disk (or quota)" in outcome["error"]
    lines = outcome["text"].splitlines()
    assert outcome["text"].endswith("\n") and len(lines) == outcome["at"] - 4 > 10  # whole records only
    assert [json.loads(line)["step"] for line in lines] == list(range(4, outcome["at"]))


def test_a_link_planted_as_the_metrics_file_is_refused_not_written_through(tmp_path):
    """Issue 34: a run directory is untrusted. A link to /dev/full (or anywhere) planted as
    metrics.jsonl is refused in one message naming it; the link stays a link. Before: the
    metrics were appended to the link's target."""
    path, outcome = _fill_the_metrics_disk(tmp_path, "dev_full_link")
    assert outcome.get("refused") and f"{path} is a symbolic link (to /dev/full)" in outcome["error"]
    assert os.readlink(path) == "/dev/full"


PROGRESS_CHILD = r"""
import logging, time
from distft.tracking import Progress, setup_logging

setup_logging(0)
log = logging.getLogger("distft")
progress = Progress(total=4, initial=0, enabled=True, log_every=1)
for step in range(1, 5):
    time.sleep(0.12)  # past tqdm's mininterval: the bar is redrawn at each update
    progress.update(step, 1.0 / step, 1e-3, 1000.0)
    log.info("log line %d", step)
progress.close()
log.info("after the bar")
"""


def _screen(output: str) -> list[str]:
    """The terminal's lines after `output`: a carriage return moves back to the start of the line
    and what follows overwrites it, as a terminal shows it."""
    lines = []
    for raw in output.split("\n"):
        cells: list[str] = []
        column = 0
        for char in raw:
            if char == "\r":
                column = 0
                continue
            if column < len(cells):
                cells[column] = char
            else:
                cells.append(char)
            column += 1
        lines.append("".join(cells).rstrip())
    return [line for line in lines if line]


def test_log_lines_go_through_the_progress_bar_on_a_terminal():
    """On a real pseudo-terminal (stdout and stderr both the terminal, 100 columns), every log
    line shows whole on a line of its own and the bar is redrawn under it, ending at 4/4. Before,
    each line landed after the half-drawn bar: "train:  25%|...| 1/4 [...][rank0] ... log line 1"."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", PROGRESS_CHILD], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert proc.wait(timeout=30) == 0, output.decode(errors="replace")
    screen = _screen(output.decode())
    logged = [line for line in screen if "log line" in line or "after the bar" in line]
    assert [line.split(" INFO ")[1] for line in logged] == [f"log line {k}" for k in range(1, 5)] + ["after the bar"]
    assert all(line.startswith("[rank0] ") and "train:" not in line for line in logged), screen
    bars = [line for line in screen if line.startswith("train:")]
    assert bars and "4/4" in bars[-1] and "loss=0.2500" in bars[-1] and "[rank0]" not in bars[-1], screen
    assert screen[-2:] == [bars[-1], logged[-1]], screen  # the bar ends above the line logged after it


def test_the_predictions_reach_wandb_as_a_table(request, monkeypatch, tmp_path):
    """Issue 19, item 1: with W&B on, the final evaluation's predictions file is logged as the
    table eval/predictions, one row per prompt (W&B writes logged tables as JSON under files/media)."""
    from distft.evaluation.report import write_predictions

    sandbox_wandb(request, monkeypatch, tmp_path)
    cfg = Config()
    cfg.tracking.wandb.mode = "offline"
    run_dir = str(tmp_path / "run")
    sample = {"prompt": "Q: 2+2\nA: ", "reference": "4", "task": "add", "prediction": "4", "truncated": False,
              "scores": {"exact_match": 1.0, "exact_match_strict": 1.0, "f1": 1.0, "rouge_l": 1.0}}
    cut = {**sample, "prompt": "Q: spell\nA: ", "reference": "abcdef", "task": "spell", "prediction": "abc",
           "truncated": True, "scores": {"exact_match": 0.0, "exact_match_strict": 0.0, "f1": 0.0, "rouge_l": 0.0}}
    base = {"samples": [{**sample, "prediction": "5", "scores": dict.fromkeys(sample["scores"], 0.0)}, cut]}
    path = write_predictions(str(tmp_path / "eval_report.predictions.jsonl"), {"base": base, "tuned": {"samples": [sample, cut]}})
    tracker = Tracker(cfg, run_dir)
    tracker.predictions(7, path)
    tracker.finish()
    tables = glob.glob(os.path.join(_offline_run_of(run_dir), "files", "media", "table", "eval", "predictions_*.table.json"))
    assert len(tables) == 1, tables
    table = json.load(open(tables[0]))
    assert table["columns"] == ["index", "task", "prompt", "reference", "base_output", "base_truncated",
                                "base_exact_match", "base_f1", "tuned_output", "tuned_truncated", "tuned_exact_match",
                                "tuned_f1"]
    assert table["data"] == [[0, "add", "Q: 2+2\nA: ", "4", "5", False, 0.0, 0.0, "4", False, 1.0, 1.0],
                             [1, "spell", "Q: spell\nA: ", "abcdef", "abc", True, 0.0, 0.0, "abc", True, 0.0, 0.0]]

