"""Tracking: W&B mode resolution, rank-0-only writes, metrics round trip and truncation, plot."""

from __future__ import annotations

import os

from distft.config import Config
from distft.tracking import Tracker, plot_losses, read_metrics, resolve_wandb_mode


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
