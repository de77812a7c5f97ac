"""distft as users install it: a wheel built from this tree, installed into a fresh virtual
environment, run from another folder (so nothing of the checkout is importable).

The fresh environment has no pip and no packages of its own: the wheel goes in with this
environment's pip (`--no-deps --no-index`, no network), and its dependencies are this
environment's site-packages, added by a plain path line in a .pth file (a path line adds the
folder only; the .pth files inside it, among them the editable install of this checkout, are not
read). What an install must hold: the configs as package data, the launchers inside `distft`,
nothing else at the top level.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, the wheel's path, an empty working folder)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    for name in ("distft", "conf", "launchers"):
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(source), "-w", str(root / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("distft-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "distft_test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return python, wheel, elsewhere


def run(python: str, cwd, *args: str) -> subprocess.CompletedProcess:
    # As from a fresh shell: not this process's own W&B service (WANDB_SERVICE, set once a test in
    # this session has run W&B in-process; its socket goes away with that run).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DISTFT_FAULTS", "WANDB_SERVICE")}
    return subprocess.run([python, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_the_wheel_holds_distft_alone_with_its_configs_and_launchers(installed):
    python, wheel, elsewhere = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"distft", f"{wheel.name.split('-py3')[0]}.dist-info"}
    shipped = {name[len("distft/conf/"):] for name in names if name.startswith("distft/conf/") and name.endswith(".yaml")}
    in_repo = {os.path.relpath(os.path.join(d, f), os.path.join(REPO, "conf"))
               for d, _, files in os.walk(os.path.join(REPO, "conf")) for f in files if f.endswith(".yaml")}
    assert shipped == in_repo and "experiment/qlora_13b.yaml" in shipped
    assert {f"distft/launchers/{n}" for n in ("__init__.py", "local.py", "slurm.py")} <= set(names)
    probe = run(python, elsewhere, "-c", "import importlib.util as u, distft, distft.launchers.slurm as s, distft.config as c;"
                "print(u.find_spec('launchers'), distft.__file__, s.__file__, c.conf_dir())")
    assert probe.returncode == 0, probe.stderr[-2000:]
    missing, package, launcher, conf = probe.stdout.split()
    assert missing == "None"  # no top-level `launchers` package
    installed_at = os.path.dirname(package)
    assert not installed_at.startswith(REPO) and launcher == os.path.join(installed_at, "launchers", "slurm.py")
    assert conf == os.path.join(installed_at, "conf")


def test_the_installed_package_trains_and_plans_from_another_folder(installed, tmp_path):
    """The README's default job (2 steps) and a plan of a GPU preset, from a folder that is not
    the checkout; a user's own --config-dir adds an experiment next to the shipped ones."""
    python, _, elsewhere = installed
    trained = run(python, elsewhere, "-m", "distft", "train.max_steps=2", "eval.num_samples=1", "eval.max_new_tokens=1",
                  "eval.compare_base=false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = next(line[len("run_dir: "):] for line in trained.stdout.splitlines() if line.startswith("run_dir: "))
    assert run_dir.startswith(str(elsewhere)) and os.path.exists(os.path.join(run_dir, "summary.json"))
    # Its last lines say where everything is and what to run next, each ready to paste.
    last = [line.split(" INFO ", 1)[-1] for line in trained.stdout.splitlines()[-8:]]
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000002")
    offline = next(line for line in last if line.startswith("W&B run (offline): "))
    wandb_dir = offline[len("W&B run (offline): "):].split(";")[0]
    assert offline.endswith(f"; upload it with `wandb sync {wandb_dir}`") and os.path.isdir(wandb_dir), last
    assert os.path.basename(wandb_dir).startswith("offline-run-") and wandb_dir.startswith(run_dir)
    assert last[-6:] == [
        f"summary: {run_dir}/summary.json", f"loss plot: {run_dir}/loss.png", offline, "next:",
        f"  compare it with its base again:   python -m distft.evaluate {checkpoint}",
        f"  export a Hugging Face model:      python -m distft.export {checkpoint} --out {run_dir}/exported"], last
    assert os.path.getsize(os.path.join(run_dir, "loss.png")) > 1000
    memory = next(line for line in trained.stdout.splitlines() if "memory per rank: " in line)
    assert re.search(r"memory per rank: \d+\.\d{3} GiB (measured \(.*\)|resident), \d+\.\d{3} GiB planned", memory), \
        memory
    exported = run(python, elsewhere, *shlex.split(last[-1].split(":", 1)[1])[1:])  # the printed command, as pasted
    assert exported.returncode == 0 and os.path.exists(os.path.join(run_dir, "exported", "config.json")), \
        exported.stderr[-3000:]
    planned = run(python, elsewhere, "-m", "distft.plan", "+experiment=qlora_13b", "plan.format=json")
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert '"params_trainable": 250347520' in planned.stdout

    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /technique: lora\n  - _self_\n"
                                    "technique:\n  r: 3\n")
    own = run(python, elsewhere, "-m", "distft.plan", "--config-dir", str(tmp_path / "my_conf"), "+experiment=mine",
              "plan.format=json")
    assert own.returncode == 0, own.stderr[-3000:]
    assert '"technique": "lora"' in own.stdout
    wrong = run(python, elsewhere, "-m", "distft", "--config-dir", str(tmp_path / "nowhere"), "+experiment=mine")
    assert wrong.returncode != 0 and "--config-dir" in wrong.stderr and "no such directory" in wrong.stderr
    assert "Traceback" not in wrong.stderr
