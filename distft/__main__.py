"""`python -m distft [overrides]`: compose the config, check all of it, then train.

Order matters: `preflight()` composes and validates the whole command line first and prints
every problem at once (no traceback, nothing allocated, nothing submitted); only a clean config
reaches Hydra's own entry point, which later hands multirun sweeps to their launcher. Hydra is
told (conf/config.yaml) to write nothing and stay in the current directory: the run directory
is ours, deterministic, and holds a secret-free config dump.
"""

from __future__ import annotations

import sys

import hydra

from distft.config import conf_dir, register_configs, to_config
from distft.preflight import format_errors, preflight


def _user_error_types() -> tuple:
    # Imported lazily: `--help` and config errors should not pay for torch and transformers.
    from distft.checkpoint import CheckpointError
    from distft.data import DataError
    from distft.model import ModelLoadError

    return (DataError, CheckpointError, ModelLoadError)


_ARGV: list[str] = []  # the command line, for launchers that re-run it as rank processes


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def hydra_entry(dict_cfg) -> None:
    cfg = to_config(dict_cfg)
    from distft import dist
    from distft.config import world_size

    env = dist.from_env()
    if world_size(cfg) > 1 and env.world_size == 1:
        # Not started by a launcher yet: become the launcher.
        from launchers.local import launch

        sys.exit(launch(cfg, _ARGV))
    if env.world_size != world_size(cfg):
        print(
            f"distft: the launcher started {env.world_size} ranks but the config asks for {world_size(cfg)} "
            f"(launcher.nnodes x launcher.nproc_per_node); make them match",
            file=sys.stderr,
        )
        sys.exit(2)
    from distft.train import NonFiniteError, train

    try:
        train(cfg)
    except NonFiniteError as err:  # the run itself went wrong, not its input: exit 3
        print(f"distft: {err}", file=sys.stderr)
        sys.exit(3)
    except _user_error_types() as err:
        print(f"distft: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in argv if a.startswith("-")]
    informational = {"--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--resolve", "--shell-completion"}
    if not informational.intersection(a.split("=")[0] for a in flags):
        _, errors = preflight(argv)
        if errors:
            print(format_errors(errors), file=sys.stderr)
            sys.exit(2)
    register_configs()
    _ARGV[:] = argv
    sys.argv = [sys.argv[0], *argv]
    hydra_entry()


if __name__ == "__main__":
    main()
