"""The command line (`python -m distft [overrides]`): compose the config, check all of it, then train.

Order matters: `preflight()` composes and validates the whole command line first and prints
every problem at once (no traceback, nothing allocated, nothing submitted); only a clean config
reaches Hydra's own entry point, which later hands multirun sweeps to their launcher. Hydra is
told (conf/config.yaml) to write nothing and stay in the current directory: the run directory
is ours, deterministic, and holds a secret-free config dump. Before all of that, secrets given
as overrides leave the command line for the environment (`secrets_to_environment`).

Exit codes (0; 2 a config or user error; 3 a non-finite loss; 4 stopped by the signal; 130 Ctrl-C:
what launchers/local.py ORDERLY_EXITS reads from every rank) come from distft/errors.py
`exit_code`, the one mapping every command uses.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import hydra

from distft import preemption
from distft.commands import exit_now
from distft.config import conf_dir, is_secret_key, redact_secrets, register_configs, to_config, world_size
from distft.errors import EXIT_FAILED, Preempted, exit_code
from distft.evaluation.sweep import (
    error_line,
    lost_peer,
    name_point_job,
    point_exit,
    record_failure,
    sweep_id,
    write_point,
)
from distft.launchers.local import launch, plan_refusal
from distft.launchers.slurm import RANK_MARKER, is_rank_process, rank_environment, submit, sweep_launcher_overrides
from distft.preflight import format_errors, preflight, split_hydra_flags
from distft.tracking import SECRET_ENVIRONMENT

_ARGV: list[str] = []  # the command line, for launchers that re-run it as rank processes


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def hydra_entry(dict_cfg) -> None:
    """One run, or one point of a sweep: the command line's job (see the module docstring)."""
    try:
        cfg = to_config(dict_cfg)
        env = _place_job(cfg)  # submits, launches or refuses (and exits) unless this process trains
        from distft.train import train  # lazy: torch (this module is distft --help's; the other imports are torch-free)

        _record_sweep_point(cfg, env)
        try:
            train(cfg)
        except KeyboardInterrupt as err:  # Ctrl-C before training started (preemption._interrupt): nothing to save
            print("distft: interrupted (Ctrl-C) before training started; nothing was trained or saved",
                  file=sys.stderr)
            sys.exit(exit_code(err))  # 130
        except Exception as err:
            # The orderly ends, one line each (distft/errors.py exit_code): Preempted (a stop signal or
            # Ctrl-C, checkpoint saved: requeued 0, else 4 or 130), NonFiniteError (the run itself went
            # wrong: 3), a UserError (its input: 2). Anything else is a bug: below.
            code = exit_code(err)
            if code != EXIT_FAILED:
                preemption.ignore_late_signals()  # an orderly end: leave with this code, whatever comes now
                print(f"distft: {err}", file=sys.stderr)
                if not isinstance(err, Preempted):
                    _sweep_point_failed(err, env)
                sys.exit(code)
            if env.world_size > 1:  # name the rank: its peers are about to be stopped by the launcher
                import socket

                print(f"distft: rank {env.rank} of {env.world_size} on {socket.gethostname()} failed:",
                      file=sys.stderr)
            if _sweep_point_failed(err, env):  # a submitit job: Hydra would catch it and SLURM record COMPLETED
                import traceback

                traceback.print_exc()
                sys.exit(1)
            raise
    except SystemExit as done:
        # Hydra's basic launcher runs every point of a -m sweep in this process: an exit would end
        # the sweep there, an exception fails this point alone (distft/evaluation/sweep.py point_exit).
        failed = point_exit(done.code)
        if failed is not None:
            raise failed from None
        raise


def _place_job(cfg):
    """Where this job runs: submitted to SLURM from the login node, launched as local ranks, or
    refused by the planner (each exits here); otherwise this process's rank, which trains."""
    from distft import dist  # lazy: torch

    argv = _job_argv()
    if cfg.launcher.kind == "slurm" and not is_rank_process():
        sys.exit(submit(cfg, argv, RankTask(list(argv))))  # from the login node: check, submit, print, return
    if is_rank_process():  # launcher.env applies to ranks however they were started (RankTask, train.sbatch)
        os.environ.update({k: str(v) for k, v in cfg.launcher.env.items()})
        too_late = preemption.start_problem(cfg) if cfg.launcher.kind == "slurm" else None
        if too_late:  # every rank reads the same end time: all leave with 2, none is left waiting
            print(f"distft: {too_late}", file=sys.stderr)
            preemption.ignore_late_signals()
            sys.exit(2)
    rank_environment()  # inside a SLURM step or a submitit job: rendezvous from its environment
    env = dist.from_env()
    if env.world_size == 1 and not is_rank_process():  # the command the user typed: plan before starting
        refusal = plan_refusal(cfg, argv=list(argv))
        if refusal:
            print(refusal, file=sys.stderr)
            sys.exit(2)
    if world_size(cfg) > 1 and env.world_size == 1:
        # Not started by a launcher yet: become the launcher.
        sys.exit(launch(cfg, argv))
    if env.world_size != world_size(cfg):
        print(
            f"distft: the launcher started {env.world_size} ranks but the config asks for {world_size(cfg)} "
            f"(launcher.nnodes x launcher.nproc_per_node); make them match",
            file=sys.stderr,
        )
        sys.exit(2)
    return env


def _job_argv() -> list[str]:
    """The command line of this job alone: in a sweep (-m) the point's own overrides, so that
    ranks or jobs started from it run that point, not the sweep again."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return list(hydra_cfg.overrides.task)
    return list(_ARGV)


def _record_sweep_point(cfg, env) -> None:
    """In a sweep, rank 0 leaves `<sweep dir>/<job num>/point.json` (its overrides and run
    directory) for the sweep summary (distft/evaluation/sweep.py) to find the runs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or env.rank != 0:
        return
    write_point(hydra_cfg.runtime.output_dir, cfg, list(hydra_cfg.overrides.task), hydra_cfg.job.num,
                sweep_id(hydra_cfg.sweep.dir))
    name_point_job(hydra_cfg.launcher.get("name"), hydra_cfg.job.num)  # squeue: one name per point


def _sweep_point_failed(err: BaseException, env) -> bool:
    """In a sweep, any failing rank leaves its error line beside point.json (distft/evaluation/sweep.py
    record_failure) for the summary and the launcher. Returns True in a submitit job: the caller
    then exits non-zero, so that the job ends FAILED (an exception would be caught by Hydra's
    run_job, pickled as the job's result and the job recorded COMPLETED 0:0)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return False
    import socket

    record_failure(hydra_cfg.runtime.output_dir, f"rank{env.rank}", error_line(err), rank=env.rank,
                   host=socket.gethostname(), lost=lost_peer(err))
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def secrets_to_environment(argv: list[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """(the command line without its secrets, the environment variables that carry them, problems).

    A secret given as an override (`tracking.wandb.api_key=...`; any key whose last part
    `is_secret_key`) would be copied into every command line distft starts: the rank processes
    (readable by every user of the machine in `ps`), the one W&B records and `wandb sync`
    uploads (wandb-metadata.json's args), Hydra's overrides and error messages, the pickled SLURM
    task. So it is moved into the
    environment variable the library reads (`tracking.SECRET_ENVIRONMENT`: WANDB_API_KEY;
    `launcher.env.NAME` into NAME) before anything sees the command line; rank processes and
    SLURM jobs inherit it, and it wins over a value the environment already had. Empty and null
    values clear a key and stay. A secret with no variable to go to, a sweep over secrets, or a
    dict override holding one is a problem reported with the others (and left off the line).

    This process's own /proc/<pid>/cmdline still shows what was typed: Python cannot rewrite it
    (short of setproctitle). `export WANDB_API_KEY=...` keeps a key off every command line.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    kept: list[str] = []
    env: dict[str, str] = {}
    problems: list[str] = []
    for arg in argv:
        text, has_value, raw = arg.partition("=")
        key = text.lstrip("+").split("@")[0]
        secret = is_secret_key(key.rpartition(".")[2])
        if arg.startswith(("-", "~")) or not has_value or not (secret or "{" in raw):
            kept.append(arg)  # flags, deletions, group choices, plain settings: nothing to look at
            continue
        try:
            override = parser.parse_override(arg)
            value = _SWEEP if override.is_sweep_override() else override.value()
        except Exception:  # noqa: BLE001 - not Hydra syntax: the user meant the characters typed
            value = raw
        if not secret:  # `tracking.wandb={api_key: ...}`
            if isinstance(value, (dict, list)) and redact_secrets(value) != value:
                problems.append(f"{key}: holds a secret; give it through the environment instead "
                                "(WANDB_API_KEY for tracking.wandb.api_key)")
            else:
                kept.append(arg)
        elif value is None or value == "":
            kept.append(arg)  # clears the key: nothing secret in it
        elif value is _SWEEP or isinstance(value, (dict, list)):
            problems.append(f"{key}: a secret takes one string value (no sweep, list or dict); "
                            "set it in the environment instead")
        elif not (variable := _secret_variable(key)):
            problems.append(f"{key}: looks like a secret and has no environment variable to go to (on the "
                            "command line it would be copied into every rank's command line and W&B's records); "
                            "export the variable the library reads, or pass it as +launcher.env.NAME=...")
        else:
            env[variable] = value if isinstance(value, str) else raw  # 12345 or true: the characters typed
    return kept, env, problems


_SWEEP = object()  # secrets_to_environment: the override has several values


def _secret_variable(key: str) -> str | None:
    """The environment variable that carries the secret config key `key`, if there is one."""
    if key.startswith("launcher.env."):
        return key[len("launcher.env."):]
    return SECRET_ENVIRONMENT.get(key)


def main(argv: list[str] | None = None) -> int:
    """`distft train` / `python -m distft`: check the whole command line, then train, launch or
    submit; returns the exit code (the entry points leave with it through `exit_now`)."""
    try:
        preemption.install()  # before anything slow: a signal during start-up is handled too
        argv = list(sys.argv[1:] if argv is None else argv)
        argv, secret_env, errors = secrets_to_environment(argv)  # first: nothing else sees a secret
        flags = [a for a in argv if a.startswith("-")]
        # Help and facts about the app skip the checks. `--cfg job|hydra|all` (and --resolve) print the
        # config a run would use, which is read as "this is what will run": they check it as the run
        # does and refuse it the same way (exit 2), rather than print a config the run would refuse.
        informational = {"--help", "-h", "--hydra-help", "--info", "--shell-completion"}
        checked = not informational.intersection(a.split("=")[0] for a in flags)
        if checked:
            cfg, config_errors = preflight(argv, command_line=True)
            errors += config_errors
        if errors:
            print(format_errors(errors), file=sys.stderr)
            return 2
        os.environ.update(secret_env)  # before Hydra, W&B or a launcher: ranks and jobs inherit it
        if checked:  # submitit sweeps: each point sized like a run
            # Beside the line's own overrides: Hydra's argparse takes them as one run of arguments,
            # so after a trailing flag (`... --cfg job`, `... -m`) they would be refused as unrecognized.
            given = split_hydra_flags(argv)[2]
            at = max(i for i, a in enumerate(argv) if a == given[-1]) + 1 if given else len(argv)
            argv = argv[:at] + sweep_launcher_overrides(cfg, argv) + argv[at:]
        register_configs()
        _ARGV[:] = argv
        sys.argv = [sys.argv[0], *argv]
        hydra_entry()
    except KeyboardInterrupt as interrupted:  # Ctrl-C while composing or checking the config: nothing started
        print("distft: interrupted (Ctrl-C); nothing was started", file=sys.stderr)
        return exit_code(interrupted)  # 130
    except SystemExit as done:
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)  # what SystemExit("message") prints; exit 1
        return exit_code(done)
    return 0


@dataclass
class RankTask:
    """What each task of a `launcher=slurm` job runs (submitted by launchers/slurm.py `submit`):
    the distft command line, as one rank, in this process (launcher.env is applied by the entry
    point, as for slurm/train.sbatch). It lives here, beside the command line it runs, so the
    launcher never imports the command line that imports it. `argv` is pickled into the job
    folder, so it never holds a secret: the entry point moved any given on the command line into
    the environment, which the job inherits (sbatch exports it unless `--export` says otherwise)."""

    argv: list[str]

    def __call__(self) -> None:
        preemption.install()  # replaces submitit's handlers (which ignore SIGTERM)
        os.environ[RANK_MARKER] = "1"
        rank_environment()
        code = main(list(self.argv))
        if code:
            sys.exit(code)  # as the job's exit status


if __name__ == "__main__":
    exit_now(main())
