"""The command line's checks (issue 39, item 4), in process: `--cfg job` checks the config as a run
does (distft/commands/train.py main); a key given twice is refused (distft/preflight.py
`_given_once`), by `python -m distft` and the planner alike; a plan needs no rendezvous address
for the job it never starts, a local multi-node launch still does; a hub model the preset does not
describe is not judged by the preset's positions. tests/cli/test_documented_commands.py runs
every documented command."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from distft.commands import plan as plan_command
from distft.commands import train as train_command
from distft.preflight import preflight

BAD = ["train.lr=-1", "train.global_batch_size=10"]
BAD_MESSAGE = """distft: 2 problem(s) in the configuration:
  - train.lr=-1.0 must be > 0 (typical: 1e-5 full fine-tuning, 2e-4 LoRA)
  - train.global_batch_size=10 is not divisible by train.micro_batch_size x world size = 4 x 1 = 4; \
use a multiple of 4 (e.g. 8 or 12), or train.micro_batch_size=1 or 2 or 5 or 10
see the YAML files under conf/, or run `python -m distft --help` for the groups and their options

"""
TWICE = ("train.lr is given twice on the command line: train.lr=1e-4 and train.lr=3e-4; a key holds one value "
         "(Hydra would quietly keep the last): give it once, with the value you mean")


@pytest.fixture
def train_main(monkeypatch):
    """`python -m distft ARGV` in this process: its exit code. main() installs the run's signal
    handlers and sets sys.argv for Hydra; both are put back afterwards."""
    monkeypatch.setattr(sys, "argv", ["distft"])
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    handlers = {signum: signal.getsignal(signum) for signum in signals}
    yield train_command.main
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


# --- --cfg job checks what it prints ------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--cfg", "job"], ["--cfg", "all"], ["-c", "job"], ["--cfg=job", "--resolve"]])
def test_printing_the_config_refuses_it_as_the_run_does(train_main, capsys, flags):
    """A config the run refuses is not printed as if it would run: the same message, exit 2.
    Before, --cfg skipped the checks and printed it (exit 0)."""
    assert train_main(BAD) == 2
    run = capsys.readouterr()
    assert run.err == BAD_MESSAGE and run.out == ""
    assert train_main([*BAD, *flags]) == 2
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", BAD_MESSAGE)


def test_printing_a_good_config_prints_it_with_the_overrides(train_main, capsys):
    assert train_main(["+experiment=tiny_lora", "train.lr=3e-4", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 0.0003\n" in out and "  name: lora\n" in out and "experiment: tiny_lora\n" in out


def test_printing_hydras_config_shows_the_sweep_launcher_sized_as_the_run(train_main, capsys):
    """`--cfg hydra` with hydra-submitit's SLURM launcher prints the job size a run would use
    (launchers/slurm.py sweep_launcher_overrides: 2 nodes, 60 minutes). Those overrides go beside
    the line's own: appended after the trailing flag, Hydra's argument parser refused them."""
    argv = ["+experiment=tiny_lora", "parallel=ddp", "hydra/launcher=submitit_slurm", "launcher=slurm",
            "launcher.nodes=2", "launcher.time_min=60", "--cfg", "hydra"]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    launcher = out[out.index("\n  launcher:\n"):]
    assert "\n    nodes: 2\n" in launcher and "\n    timeout_min: 60\n" in launcher, launcher[:1500]


# --hydra-help: tests/cli/test_documented_commands.py (in process, Hydra's help reconfigures logging
# and broke the worker's sys.stderr after an in-process run's handlers).
@pytest.mark.parametrize("argv, shows", [([*BAD, "--help"], "== Configuration groups ==")])
def test_help_is_not_a_run_and_is_not_checked(train_main, capsys, argv, shows):
    """Help is about the command, not a config: no checks (--help answers beside a bad one), exit 0."""
    assert train_main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and shows in captured.out


# --- a key given twice ---------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_naming_both_values():
    cfg, errors = preflight(["train.lr=1e-4", "train.max_steps=5", "train.lr=3e-4"], command_line=True)
    assert errors == [TWICE]
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 5  # the rest is composed and checked as Hydra would


def test_a_program_building_its_line_keeps_the_last_value():
    """Helpers that add changes to a line of defaults (tests, benchmarks) call preflight() without
    command_line: Hydra's rule holds there, the last value wins, nothing is reported."""
    cfg, errors = preflight(["train.lr=1e-4", "train.lr=3e-4"])
    assert errors == [] and cfg.train.lr == 3e-4


@pytest.mark.parametrize("argv, message", [
    (["+train.lr=1e-4", "train.lr=3e-4"], "train.lr is given twice on the command line: +train.lr=1e-4 and train.lr=3e-4;"),
    (["++train.lr=1e-4", "train.lr=3e-4", "train.lr=5e-4"],
     "train.lr is given 3 times on the command line: ++train.lr=1e-4, train.lr=3e-4 and train.lr=5e-4;"),
    (["~train.lr", "train.lr=3e-4"], "train.lr is given twice on the command line: ~train.lr and train.lr=3e-4;"),
    (["model=tiny", "model=llama_7b"], "model is given twice on the command line: model=tiny and model=llama_7b;"),
    # Hydra's own refusal of this pair ("Multiple values for experiment") is not added to it.
    (["+experiment=tiny_lora", "+experiment=tiny_full"],
     "experiment is given twice on the command line: +experiment=tiny_lora and +experiment=tiny_full;"),
    (["-m", "train.lr=1e-4,3e-4", "train.lr=5e-4"],
     "train.lr is given twice on the command line: train.lr=1e-4,3e-4 and train.lr=5e-4;"),
])
def test_every_form_of_a_repeated_key_is_one_message(argv, message):
    _, errors = preflight(argv, run_here=False, command_line=True)
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_a_sweep_is_one_occurrence_of_its_key():
    cfg, errors = preflight(["-m", "train.lr=1e-4,3e-4", "model=tiny"], run_here=False, command_line=True)
    assert errors == [] and cfg.train.lr == 1e-4


def test_a_secret_given_twice_is_named_without_its_values():
    _, errors = preflight(["tracking.wandb.api_key=abc123", "tracking.wandb.api_key=def456"], run_here=False,
                          command_line=True)
    assert errors == ["tracking.wandb.api_key is given twice on the command line: tracking.wandb.api_key=***REDACTED*** "
                      "and tracking.wandb.api_key=***REDACTED***; a key holds one value (Hydra would quietly keep "
                      "the last): give it once, with the value you mean"]


def test_the_run_and_the_planner_refuse_a_key_given_twice(train_main, capsys):
    argv = ["train.lr=1e-4", "train.lr=3e-4"]
    assert train_main(argv) == 2
    assert f"  - {TWICE}\n" in capsys.readouterr().err
    assert plan_command.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"distft: 1 problem(s) in the configuration:\n  - {TWICE}\n")


# --- what a plan needs, and what only a launch does ---------------------------------------------


def test_a_plan_of_a_multi_node_local_job_needs_no_rendezvous_address_but_its_launch_does():
    argv = ["model=llama_65b", "parallel=zero3", "launcher.nnodes=2", "launcher.nproc_per_node=8",
            "train.micro_batch_size=1", "cluster=a100_80g_8x"]
    cfg, errors = preflight(argv, run_here=False)
    assert errors == [] and cfg.launcher.nnodes == 2
    _, errors = preflight(argv)
    assert [e for e in errors if "rdzv" in e] == [
        "launcher.nnodes=2 needs launcher.rdzv_endpoint=HOST:PORT (an address of the first node that every node "
        "can reach); run the same command on every node"]


def test_a_hub_model_over_the_tiny_preset_is_not_held_to_the_presets_positions(tmp_path, monkeypatch):
    """`+experiment=pretrained_lora model.name_or_path=<hub id>` (data.max_seq_len 1024) is not
    refused for the tiny preset's 512 positions; once the model's config.json is in the Hugging
    Face cache, its own positions are the limit."""
    import huggingface_hub.constants

    hub = "meta-llama/Llama-3.1-8B-Instruct"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    argv = ["+experiment=pretrained_lora", f"model.name_or_path={hub}"]
    assert preflight(argv, run_here=False)[1] == []
    snapshot = tmp_path / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2000}))
    _, errors = preflight([*argv, "data.max_seq_len=4096"], run_here=False)
    assert errors == ["data.max_seq_len=4096 exceeds model.max_position_embeddings=2000 of model 'tiny'; "
                      "set data.max_seq_len <= 2000"]
