"""Tracking: W&B mode resolution, rank-0-only writes, metrics round trip and truncation, plot.

The tests that start a process: tests/cli/test_tracking.py (W&B's offline fallback without a
server among them: a W&B run starts W&B's own service process)."""

from __future__ import annotations

import json
import logging
import os

from distft.config import Config
from distft.tracking import Tracker, plot_losses, read_metrics, resolve_wandb_mode


def _distft_warnings(request) -> list[str]:
    """The warnings distft logs from now until the end of the test (a list that fills as they come)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("distft")
    logger.addHandler(handler)
    request.addfinalizer(lambda: logger.removeHandler(handler))
    return messages


def test_online_without_a_key_falls_back_to_offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = Config()
    cfg.tracking.wandb.mode = "online"
    assert resolve_wandb_mode(cfg) == ("offline", None)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode(cfg) == ("online", "k" * 40)
    cfg.tracking.wandb.mode = "disabled"
    assert resolve_wandb_mode(cfg)[0] == "disabled"
    monkeypatch.delenv("WANDB_API_KEY")
    cfg.tracking.wandb.mode = "online"
    cfg.tracking.wandb.api_key = "c" * 40
    assert resolve_wandb_mode(cfg) == ("online", "c" * 40)


def test_only_rank_zero_writes(tmp_path):
    cfg = Config()
    cfg.tracking.wandb.mode = "disabled"
    Tracker(cfg, str(tmp_path / "r1"), rank=1).log(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "r1")
    main = Tracker(cfg, str(tmp_path / "r0"), rank=0)
    for step, loss in [(1, 3.0), (2, 2.0), (3, 1.5)]:
        main.log(step, {"loss": loss})
    main.log(3, {"eval_loss": 1.7})
    assert [r["loss"] for r in read_metrics(main.metrics_path) if "loss" in r] == [3.0, 2.0, 1.5]
    main.truncate_after(2)
    assert [r["step"] for r in read_metrics(main.metrics_path)] == [1, 2]
    png = plot_losses(main.metrics_path, str(tmp_path / "r0" / "loss.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_flops_per_token_and_mfu():
    from distft.tracking import flops_per_token, mfu

    # LLaMA-7B-shaped numbers: 6N + 12*L*d*T.
    n, layers, d, t = 6_738_415_616, 32, 4096, 2048
    assert flops_per_token(n, layers, d, t, full=True) == 6 * n + 12 * layers * d * t
    assert flops_per_token(n, layers, d, t, full=False) == 4 * n + 12 * layers * d * t
    # 3,000 tokens/s per GPU of a 7B model on 8 A100s is ~ 0.42 MFU.
    per_token = flops_per_token(n, layers, d, t, full=True)
    value = mfu(3000 * 8, per_token, 312, 8)
    assert value == 3000 * per_token / 312e12
    assert 0.4 < value < 0.45
    assert mfu(1000, per_token, 0, 1) is None


def test_cpu_tensor_memory_of_a_second_run_in_one_process_is_its_own():
    """tracking.cpu_memory_steps counts tensor allocations with torch's profiler. Its running
    total is the process's: what an earlier profiled run allocated and freed after its profile
    ended never leaves it. A second meter in the same process (a sweep point on Hydra's basic
    launcher) must still report its own peak: here 40 MB, after a first run that kept 100 MB past
    its profile (read from the raw total, the second would report 140 MB)."""
    import torch

    from distft.tracking import MemoryMeter

    first = MemoryMeter(torch.device("cpu"), cpu_steps=1)
    kept = torch.ones(25_000_000)  # 100 MB, allocated while the first meter profiles
    first.step(1)
    assert first.training() >= 100e6
    del kept  # freed after the first profile ended

    second = MemoryMeter(torch.device("cpu"), cpu_steps=1)
    held = torch.ones(10_000_000)  # 40 MB at the peak
    transient = torch.ones(1000)
    del held, transient
    second.step(1)
    assert second.kind == "cpu_tensors"
    assert 40e6 <= second.training() < 41e6


def test_cpu_tensor_memory_counts_weights_a_checkpoint_load_allocates(tmp_path):
    """transformers 5 loads checkpoint weights on a thread pool, where the profiler does not see
    their allocations: SmolLM2's 0.5 GiB of fp32 weights were missing from every real-model
    measurement. Under the meter they load on the profiled thread: a bf16 checkpoint loaded as
    fp32 (a copy it must allocate) counts its fp32 size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distft.tracking import MemoryMeter

    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    meter = MemoryMeter(torch.device("cpu"), cpu_steps=1)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    meter.step(1)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert weights > 60e6 and meter.training() >= weights


def test_readers_skip_a_torn_last_line_and_a_resume_repairs_the_file(tmp_path, request):
    """What a crash mid-append leaves (a record cut short, no newline): readers skip it with one
    warning naming the file and line, and `truncate_after` (the resume) rewrites the file without
    it, so the resumed run's appends start on a line of their own. A damaged line in the middle
    is skipped too, and called damage."""
    warnings = _distft_warnings(request)
    cfg = Config()
    cfg.tracking.wandb.mode = "disabled"
    tracker = Tracker(cfg, str(tmp_path / "run"))
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0 / step})
    with open(tracker.metrics_path, "a") as f:
        f.write('{"step": 4, "time": 17.0, "lo')
    assert [r["step"] for r in read_metrics(tracker.metrics_path)] == [1, 2, 3]
    assert warnings == [f"{tracker.metrics_path}: line 4 is torn (cut short by a crash or a full disk while it was "
                        "written); skipped"]
    assert plot_losses(tracker.metrics_path, str(tmp_path / "run" / "loss.png")) is not None
    warnings.clear()
    tracker.truncate_after(2)
    tracker.log(3, {"loss": 0.3})
    assert [(r["step"], r["loss"]) for r in read_metrics(tracker.metrics_path)] == [(1, 1.0), (2, 0.5), (3, 0.3)]
    assert warnings == [f"{tracker.metrics_path}: line 4 is torn (cut short by a crash or a full disk while it was "
                        "written); skipped"]  # the one read by truncate_after; the file is whole since
    warnings.clear()
    with open(tracker.metrics_path) as f:
        lines = f.read().splitlines()
    lines[1] = lines[1][:10] + "\x00\x00"
    with open(tracker.metrics_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    assert [r["step"] for r in read_metrics(tracker.metrics_path)] == [1, 3]
    assert warnings == [f"{tracker.metrics_path}: line 2 is not a JSON record (the file was damaged or edited); "
                        "skipped"]


def test_the_loss_plot_marks_the_best_eval(tmp_path):
    """loss.png marks the best periodic eval (issue 19, item 2): a green star and line at its step,
    and nothing green without one."""
    from PIL import Image

    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 3.0 - 0.05 * s} for s in range(1, 41)]
    records += [{"step": s, "eval_loss": v} for s, v in [(10, 2.5), (20, 2.1), (30, 2.3), (40, 2.4)]]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))

    def green_columns(best_step):
        out = str(tmp_path / f"loss-{best_step}.png")
        plot_losses(str(metrics), out, best_step=best_step)
        image = Image.open(out).convert("RGB")
        width, height = image.size
        pixels = image.load()
        # matplotlib's tab:green is (44, 160, 44).
        return sorted({x for x in range(width) for y in range(height)
                       if abs(pixels[x, y][0] - 44) < 30 and abs(pixels[x, y][1] - 160) < 30
                       and abs(pixels[x, y][2] - 44) < 30})

    assert green_columns(None) == []
    marked = green_columns(20)
    assert len(marked) > 5
    marked_at_30 = green_columns(30)
    # The mark moves with the best step: its vertical line sits further right for step 30.
    assert max(marked_at_30) > max(marked) or min(marked_at_30) > min(marked)


def test_the_eta_leaves_out_a_slow_first_step(monkeypatch, caplog):
    """A first step that compiles the layers (train.compile) or warms up CUDA took 100 s, the next
    ones 1 s each: after step 11 of 111 the ETA is 100 steps x 1 s, not 100 x 110 s / 11."""
    import types

    from distft import tracking

    clock = iter([0.0, 100.0, 110.0])  # the start, the first step's end, step 11's log line
    monkeypatch.setattr(tracking, "time", types.SimpleNamespace(time=lambda: next(clock)))  # its clock only
    progress = tracking.Progress(total=111, initial=0, enabled=True, log_every=11)
    with caplog.at_level(logging.INFO, logger="distft"):
        for step in range(1, 12):
            progress.update(step, 1.0, 1e-3, 1000.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 1 and lines[0].startswith("step 11/111 "), lines
    assert lines[0].endswith("eta 0:01:40"), lines  # with the first step in the rate: 0:16:40
