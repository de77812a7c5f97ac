"""The config tree through a fresh interpreter: a real @hydra.main run writes nothing, and importing
the config and preflight imports no torch.

The in-process tests: tests/unit/test_config.py."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.unit.test_config import CONF, REPO


def test_hydra_is_told_to_write_nothing(tmp_path):
    text = (CONF / "config.yaml").read_text()
    for setting in (
        "output_subdir: null",
        "dir: .",
        "chdir: false",
        "hydra/job_logging: none",
        "hydra/hydra_logging: none",
    ):
        assert setting in text
    # and a real @hydra.main run in an empty directory leaves it empty and keeps the cwd
    script = (
        "import os, sys, hydra\n"
        "from distft.config import conf_dir, register_configs, to_config\n"
        "register_configs()\n"
        "@hydra.main(version_base='1.3', config_path=str(conf_dir()), config_name='config')\n"
        "def main(c):\n"
        "    print('CWD', os.getcwd(), to_config(c).run.experiment)\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", script, "+experiment=tiny_lora", "tracking.wandb.api_key=sk-secret"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"CWD {tmp_path} tiny_lora" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_importing_config_and_preflight_does_not_import_torch():
    code = (
        "import sys\n"
        "from distft.preflight import preflight\n"
        "cfg, errors = preflight(['+experiment=qlora_70b'])\n"
        "assert errors == [], errors\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout

