"""Preflight: compose a command line with Hydra and report *every* problem in it at once.

`python -m distft model=llama_8b train.lr=abc train.lrr=1` should answer with three one-line
messages, not with the first Hydra traceback. Hydra stops at the first bad override, so:

1. group choices (`model=...`, `+experiment=...`) are looked up in the config repository; a
   missing one is reported with the available options and left out;
2. everything else is composed in one go. Only when Hydra refuses (or there are sweeps) is it
   asked again one override at a time, so each wrong type or unknown key gets its own message
   and is left out, and the rest still composes;
3. on the composed config, keys the schema does not have (`+foo=1`, a typo in a YAML file) are
   reported, then `validation.validate()` adds the semantic problems and `path_problems()` the
   local files that do not exist.

A key given twice on a typed command line (`train.lr=1e-4 ... train.lr=3e-4`, which Hydra settles
silently, the last winning) is refused first, naming both values.

Sweeps (`a=1,2`, `choice(...)`, `range(...)`, `glob(...)`) are expanded: every value is checked,
the first good one is composed, and each other value is validated too (one sweep at a time).
Hydra's own flags and `hydra.*` overrides are skipped. Nothing here imports torch (unless the
config asks for a GPU here: `machine_problems`), and nothing is written to disk but a probe
directory, created and removed at once where a missing run directory would go.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from collections.abc import Sequence
from typing import Any, Optional

from distft.config import (
    REDACTED,
    Config,
    ModelConfig,
    _size_slurm_job,
    conf_dir,
    is_secret_key,
    register_configs,
    run_dir,
    to_config,
    to_dict,
)
from distft.data.sources import data_file_problem, eval_reader, parts, source_problems
from distft.data.templates import chat_template_problems
from distft.errors import ModelLoadError
from distft.model.pretrained import HOW_TO_GET_IT, SMOLLM2_NAME, cache_root
from distft.model.vocab import preflight_problems  # torch-free: tokenizer.json counted by `tokenizers`
from distft.validation import machine_problems, validate

HINT = "see the YAML files under conf/, or run `python -m distft --help` for the groups and their options"
# Hydra flags that take a value (`-cn NAME` or `--config-name=NAME`); the others are switches.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
_FLAGS_WITH_VALUE |= {"--config-dir", "-cd", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_MAX_SWEEP_VALUES = 16  # values of one sweep that are checked (the first and last few of a long range)
_MAX_SWEEP_VARIANTS = 32  # extra compositions spent validating the other values of sweeps


@dataclasses.dataclass
class _Override:
    """One command-line override: its text, and one override string per (sweep) value."""

    text: str
    key: str
    is_group: bool
    values: list[str]  # single-value override strings; values[0] is the one composed
    is_sweep: bool


def preflight(argv: Sequence[str], run_here: bool = True,
              command_line: bool = False) -> tuple[Optional[Config], list[str]]:
    """Compose `argv` (overrides, Hydra flags allowed) and return (config, every problem).

    The config is the typed `Config` composed from the overrides that are good (the first value
    of each sweep); it is None only when nothing could be composed. An empty list means the
    command line is good to launch. `run_here`: the command starts a run from this machine, so
    `validation.machine_problems()` checks what it needs from it (GPUs, attention kernels);
    False for a dry run (`python -m distft.plan`) of a config meant for other machines.
    `command_line`: argv is what a person typed (the commands pass True), where a key given twice
    is a slip and is refused (`_given_once`); a program that builds its line from defaults plus
    changes (the tests' and benchmarks' helpers) keeps Hydra's rule, the last one wins.
    """
    config_name, multirun, args = split_hydra_flags(argv)
    errors: list[str] = []
    user_dir = user_config_dir(argv)
    if user_dir and not os.path.isdir(user_dir):
        return None, [f"--config-dir {user_dir}: no such directory; give the folder that holds your config groups "
                      "(e.g. experiment/mine.yaml, used as +experiment=mine)"]
    parsed = _parse(args, errors)
    if command_line:
        parsed = _given_once(parsed, errors)
    register_configs()
    with _hydra_session(user_dir) as loader:
        groups = set(loader.list_groups(""))
        overrides = [_expand(ov, groups, loader, errors) for ov in parsed]
        overrides = [ov for ov in overrides if ov is not None]
        if not multirun:
            for ov in overrides:
                if ov.is_sweep:
                    errors.append(
                        f"{ov.text}: several values need --multirun (-m) to run one job each; "
                        "quote the value ('a,b') if it is one string, or use [a,b] for a list"
                    )
        chosen = _existing_choices([ov for ov in overrides if ov.is_group], loader, errors)
        values = [ov for ov in overrides if not ov.is_group]
        composed, problem = _compose(config_name, _first_values(chosen + values))
        cfg, problem = (None, problem) if problem else _typed(composed)
        if problem or any(ov.is_sweep for ov in overrides):
            # Hydra refused something (or there are sweep values to try): ask again, one override
            # at a time, so that each problem gets its own message and the rest still composes.
            chosen = _composable(config_name, [], chosen, errors, stack=True)
            values = _composable(config_name, chosen, values, errors, stack=False)
            composed, problem = _compose(config_name, _first_values(chosen + values))
            cfg, problem = (None, problem) if problem else _typed(composed)
        if problem:
            errors.append(problem)
            return None, errors
        errors += unknown_keys(composed)
        # launch=run_here: a plan (or a data preparation) starts no job, so it needs no rendezvous address.
        errors += validate(cfg, model_max_positions=model_max_positions(cfg.model), launch=run_here)
        errors += path_problems(cfg)
        if run_here:
            # A sweep through hydra-submitit's SLURM launcher runs its points on the cluster's nodes.
            on_slurm = [a.partition("=")[2] for a in args if a.startswith("hydra/launcher=")][-1:] == ["submitit_slurm"]
            errors += machine_problems(cfg, ranks_here=False if on_slurm else None)
        if multirun or cfg.launcher.kind == "slurm":
            errors += _secrets_in_sweep(cfg, "--multirun" if multirun else "launcher=slurm")
        errors += _check_sweep_variants(config_name, chosen + values, errors, launch=run_here)
    return cfg, errors


class Composer:
    """The configs `python -m distft ARGV CHANGE...` would run, for many changes of one command
    line (the planner's advice tries about a hundred). A change replaces the line's own override
    of the same key (the user edits the line) and applies as Hydra applies it: group choices
    (`parallel=fsdp`) through the defaults list, one composition per distinct set of group
    changes; `key=value` parsed by Hydra's override grammar and set by OmegaConf, as Hydra does
    once it has composed, here on the typed section it changes (`train`), which types and
    checks it as the whole config would, in milliseconds instead of a composition. Machine and
    path checks are preflight()'s, not repeated. Use as a context manager (a Hydra session)."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def __enter__(self) -> Composer:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self._config_name, _, args = split_hydra_flags(self.argv)
        parsed = _parse(args, [])
        register_configs()
        self._session = _hydra_session(user_config_dir(self.argv))
        loader = self._session.__enter__()
        self._groups = set(loader.list_groups(""))
        self._base = [ov for ov in (_expand(ov, self._groups, loader, []) for ov in parsed) if ov is not None]
        self._parser = OverridesParser.create()
        self._composed: dict[tuple[str, ...], Optional[Config]] = {}
        self._sections: dict[tuple[tuple[str, ...], str], Any] = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._session.__exit__(*exc)

    def compose(self, change: Sequence[str]) -> Optional[Config]:
        """The config with `change` (overrides) added, or None where it does not compose, type
        or validate."""
        from omegaconf import OmegaConf

        overrides = [self._parser.parse_overrides([text])[0] for text in change]
        groups = {ov.key_or_group for ov in overrides if ov.key_or_group in self._groups}
        group_changes = tuple(ov.input_line for ov in overrides if ov.key_or_group in groups)
        if group_changes not in self._composed:
            # The line's own choice of a changed group goes; its key=value overrides stay (a
            # changed value is set over them below), so the composition depends on the groups alone.
            below = _first_values([ov for ov in self._base if ov.key not in groups])
            node, problem = _compose(self._config_name, below + list(group_changes))
            self._composed[group_changes] = None if problem else _typed(node)[0]
        cfg = self._composed[group_changes]
        values = [ov for ov in overrides if ov.key_or_group not in self._groups]
        if cfg is None or not values:
            return None if cfg is None or validate(cfg) else cfg
        touched: dict[str, Any] = {}
        undo: list[tuple[Any, str, Any]] = []
        try:
            for ov in values:
                section, _, rest = ov.key_or_group.partition(".")
                if (group_changes, section) not in self._sections:
                    self._sections[group_changes, section] = OmegaConf.structured(getattr(cfg, section))
                node = touched[section] = self._sections[group_changes, section]
                before = OmegaConf.select(node, rest, throw_on_missing=True)
                OmegaConf.update(node, rest, ov.value(), merge=True)
                undo.append((node, rest, before))
            changed = dataclasses.replace(cfg, **{k: OmegaConf.to_object(v) for k, v in touched.items()})
            _size_slurm_job(changed.launcher)
        except Exception:  # noqa: BLE001 - a change the schema refuses composes to nothing
            return None
        finally:  # the typed sections are reused by the next change
            for node, key, value in reversed(undo):
                OmegaConf.update(node, key, value, merge=False)
        return None if validate(changed) else changed


def format_errors(errors: Sequence[str]) -> str:
    """The message printed instead of a traceback: every problem, one line each, and a hint."""
    lines = [f"distft: {len(errors)} problem(s) in the configuration:"]
    lines += [f"  - {error}" for error in errors]
    lines.append(HINT)
    return "\n".join(lines) + "\n"


def split_hydra_flags(argv: Sequence[str]) -> tuple[str, bool, list[str]]:
    """(config name, --multirun given, overrides) of a command line; other Hydra flags dropped."""
    config_name, multirun, overrides = "config", False, []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, has_inline_value, inline_value = arg.partition("=")
        if not arg.startswith("-"):
            overrides.append(arg)
        elif arg in ("--multirun", "-m"):
            multirun = True
        elif flag in _FLAGS_WITH_VALUE:
            value = inline_value if has_inline_value else (args[i + 1] if i + 1 < len(args) else "")
            i += 0 if has_inline_value else 1
            if flag in ("--config-name", "-cn"):
                config_name = value
        elif arg in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in _INFO_CHOICES:
            i += 1
        i += 1
    return config_name, multirun, overrides


def user_config_dir(argv: Sequence[str]) -> Optional[str]:
    """The absolute path given with Hydra's `--config-dir`/`-cd` (the last one, as Hydra reads it):
    a user's own config groups, searched after distft's conf/ and before the schema."""
    found = None
    args = list(argv)
    for i, arg in enumerate(args):
        flag, has_inline_value, inline_value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            found = inline_value if has_inline_value else (args[i + 1] if i + 1 < len(args) else None)
    return os.path.abspath(os.path.expanduser(found)) if found else None


def model_max_positions(model: ModelConfig) -> int:
    """Positions of the real model, for the data.max_seq_len check: its config.json wins over the
    preset wherever this machine has it (a local directory; a hub id in the Hugging Face cache,
    looked up offline). 0 (not checked here) for a hub id given over a from-scratch preset and not
    cached (`+experiment=pretrained_lora model.name_or_path=meta-llama/Llama-3.1-8B-Instruct`, over
    model=tiny): the preset's 512 positions are the toy's, not that model's."""
    name = model.name_or_path and os.path.expanduser(model.name_or_path)
    path = name and (os.path.join(name, "config.json") if os.path.isdir(name) else _cached_config_json(name))
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                return int(json.load(f).get("max_position_embeddings", model.max_position_embeddings))
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # reported by path_problems
    if name and not os.path.isdir(name) and not _preset_names_a_model(model.name):
        return 0
    return model.max_position_embeddings


def _cached_config_json(repo_id: str) -> Optional[str]:
    """A hub model's config.json in the Hugging Face cache, looked up offline (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, or no huggingface_hub: nothing cached under it
        return None
    return found if isinstance(found, str) else None


def _preset_names_a_model(preset: str) -> bool:
    """Whether conf/model/<preset>.yaml describes a real model (names one, as llama_7b names
    huggyllama/llama-7b), rather than a from-scratch architecture (tiny). A preset from the user's
    --config-dir, not in conf/, is taken at its word."""
    import yaml

    path = conf_dir() / "model" / f"{preset}.yaml"
    if not path.is_file():
        return True
    try:
        fields = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return True
    return not isinstance(fields, dict) or bool(fields.get("name_or_path"))


def path_problems(cfg: Config) -> list[str]:
    """Local files a run will read, checked on the launching machine before anything starts."""
    errors = []
    d = cfg.data
    files = [] if source_problems(d) else [(p.key, p.cfg.path, p.cfg.source) for p in parts(d)
                                           if p.cfg.source != "synthetic"]
    files.append(("data.eval_path", d.eval_path, eval_reader(d)))
    for key, path, source in files:
        if path and source != "hub":  # a Hub name is no file; loading says what is wrong with it
            path = os.path.expanduser(path)
            problem = data_file_problem(key, path, source)
            if problem:
                errors.append(problem)
            elif not os.path.exists(path):
                errors.append(f"{key}={path!r} does not exist (relative paths start at {os.getcwd()})")
    name = cfg.model.name_or_path
    # A hub id looks like `org/name`; only an explicit local path can be checked here.
    if name and name.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name)):
        if os.path.abspath(os.path.expanduser(name)) == os.path.join(cache_root(), SMOLLM2_NAME):
            errors.append(f"model.name_or_path={name!r}: {SMOLLM2_NAME} is not prepared yet; {HOW_TO_GET_IT}")
        else:
            errors.append(f"model.name_or_path={name!r} is not a directory (give a local model directory, a .gguf "
                          "file or a hub id)")
    config_json = name and os.path.join(os.path.expanduser(name), "config.json")
    if config_json and os.path.isfile(config_json):
        try:
            with open(config_json) as f:
                if not isinstance(json.load(f), dict):
                    raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            errors.append(f"model.name_or_path={name!r}: its config.json is unreadable ({err}); restore the "
                          "model's config.json (save_pretrained writes it)")
    errors += preflight_problems(cfg)
    errors += chat_template_problems(cfg)
    # The run directory (and the SLURM log folder) must be creatable: no file where a folder goes.
    for key, path in (("run.dir" if cfg.run.dir else "run.root", run_dir(cfg)), ("launcher.log_dir", cfg.launcher.log_dir)):
        blocker = _file_in_the_way(path)
        if blocker:
            errors.append(f"{key}: {blocker!r} is a file, so the directory {os.path.abspath(os.path.expanduser(path))!r} "
                          f"cannot be created there; choose another {key} or move the file")
        else:
            errors += _directory_problems(cfg, key, path)
    return errors


_RUN_DIR_HEADROOM = 255  # bytes the paths distft writes below a run directory may add (checkpoints, W&B)


def _directory_problems(cfg: Config, key: str, path: Optional[str]) -> list[str]:
    """Why the directory `path` (the run directory, the SLURM log folder) cannot be created or
    written, checked before anything starts: a name longer than the file system allows, a path too
    long for the files below it, or a place that takes no new directory (`/proc`, read-only,
    permission denied). For the last, a probe directory is created and removed at once in the
    nearest existing parent: os.access cannot tell (root passes it on /proc, where mkdir fails).
    An existing directory is only checked for write access, so ranks starting together never
    probe inside a run directory another rank is using."""
    import tempfile

    if not path:
        return []
    target = os.path.abspath(os.path.expanduser(path))
    existing = target
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    name_max, path_max = _path_limit(existing, "PC_NAME_MAX", 255), _path_limit(existing, "PC_PATH_MAX", 4096)
    for part in target.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            which = "run.experiment" if key == "run.root" and part == cfg.run.experiment else key
            return [f"{which}: the directory name {_short(part)!r} is longer than the {name_max} bytes the file "
                    f"system allows for one name; choose a shorter {which}"]
    if len(os.fsencode(target)) + _RUN_DIR_HEADROOM > path_max:
        return [f"{key}: the directory {_short(target)!r} is {len(os.fsencode(target))} bytes long, which leaves the "
                f"files below it less than {_RUN_DIR_HEADROOM} of the file system's {path_max}; choose a shorter {key}"]
    if existing == target:
        if not os.access(target, os.W_OK | os.X_OK):
            return [f"{key}: the directory {target!r} is not writable by this user; choose another {key} or "
                    "change its permissions"]
        return []
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".distft-probe-", dir=existing))
    except OSError as err:
        return [f"{key}: the directory {_short(target, 80)!r} cannot be created: {existing!r} takes no new directory "
                f"({err.strerror}); choose another {key}"]
    return []


def _path_limit(path: str, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def _file_in_the_way(path: Optional[str]) -> Optional[str]:
    """The first existing non-directory on the way to `path` (itself included), or None."""
    if not path:
        return None
    current = os.path.abspath(os.path.expanduser(path))
    chain = []
    while True:
        chain.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for part in reversed(chain):
        if os.path.exists(part) and not os.path.isdir(part):
            return part
        if not os.path.exists(part):
            return None
    return None


def _secrets_in_sweep(cfg: Config, why: str = "--multirun") -> list[str]:
    """Hydra's sweeper saves the whole config to <hydra.sweep.dir>/multirun.yaml, and the SLURM
    launcher pickles the command line (and launcher.env) for the job: secrets would be on disk."""

    def walk(value: Any, prefix: str) -> list[str]:
        if isinstance(value, dict):
            return [key for k, v in value.items() for key in walk(v, f"{prefix}{k}.")]
        key = prefix.rstrip(".")
        return [key] if is_secret_key(key.rpartition(".")[2]) and value not in (None, "") else []

    return [
        f"{key} is set, and {why} writes the whole "
        f"{'config to multirun.yaml' if why == '--multirun' else 'command line into the job folder'}; "
        f"pass it through the environment instead (WANDB_API_KEY for tracking.wandb.api_key; jobs inherit it)"
        for key in walk(to_dict(cfg, redact=False), "")
    ]


def unknown_keys(node: Any, schema: type = Config, prefix: str = "") -> list[str]:
    """Keys in a composed config that the dataclass schema does not have (added with `+`, or in YAML)."""
    from omegaconf import DictConfig

    errors = []
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in node.items_ex(resolve=False):
        full = f"{prefix}{key}"
        if key not in fields:
            errors.append(_unknown_key_message(full, list(fields)))
            continue
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, DictConfig):
            errors += unknown_keys(value, hints[key], f"{full}.")
    return errors


def _unknown_key_message(full_key: str, siblings: list[str]) -> str:
    parent, _, leaf = full_key.rpartition(".")
    close = difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.6)
    scope = f"{parent}." if parent else ""
    if close:
        hint = "did you mean " + " or ".join(scope + c for c in close) + "?"
    else:
        hint = f"{parent or 'the top level'} has: {', '.join(siblings)}"
    return f"{full_key}: unknown key; {hint}"


# --- parsing and expanding overrides ---------------------------------------------------------


def _parse(args: list[str], errors: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for arg in args:
        try:
            (override,) = parser.parse_overrides([arg])
        except HydraException as err:
            errors.append(f"{arg}: cannot be parsed as key=value ({_first_line(err)})")
            continue
        if not override.is_hydra_override():  # hydra.* settings are Hydra's business
            parsed.append(override)
    return parsed


def _given_once(overrides: list[Any], errors: list[str]) -> list[Any]:
    """The parsed overrides with each key once. Hydra lets the last of `train.lr=1e-4 ...
    train.lr=3e-4` win without a word, so a long command line edited in a hurry would train at a
    value its author did not mean to keep: a repeated key is reported with every value it was given,
    and only its last occurrence is composed (what Hydra would use), so the rest of the line is
    still checked without a second message about the same key. One override is one occurrence
    whatever it holds (a -m sweep `train.lr=1e-4,3e-4`); `+key`, `++key` and `~key` name the same
    key as `key=` (each adds, forces or deletes what the other sets), and `group@package` is a key
    of its own. Secret values are shown redacted."""
    given: dict[tuple[str, Optional[str]], list[Any]] = {}
    for override in overrides:
        given.setdefault((override.key_or_group, override.package), []).append(override)
    for (key, package), found in given.items():
        if len(found) > 1:
            name = f"{key}@{package}" if package else key
            texts = [_as_typed(override) for override in found]
            count = "twice" if len(found) == 2 else f"{len(found)} times"
            errors.append(f"{name} is given {count} on the command line: {', '.join(texts[:-1])} and {texts[-1]}; a key "
                          "holds one value (Hydra would quietly keep the last): give it once, with the value you mean")
    return [override for override in overrides if given[override.key_or_group, override.package][-1] is override]


def _as_typed(override: Any) -> str:
    """An override as typed, for a message; a secret's value redacted (`tracking.wandb.api_key=***REDACTED***`)."""
    text = override.input_line
    name, has_value, _ = text.partition("=")
    if has_value and is_secret_key(override.key_or_group.rpartition(".")[2]):
        return f"{name}={REDACTED}"
    return text


def _expand(override: Any, groups: set[str], loader: Any, errors: list[str]) -> Optional[_Override]:
    """Wrap a parsed override; a sweep becomes one single-value override string per value."""
    from hydra.core.object_type import ObjectType
    from hydra.core.override_parser.types import Glob

    key = override.key_or_group
    is_group = key in groups
    text = override.input_line
    if not override.is_sweep_override():
        return _Override(text, key, is_group, [text], is_sweep=False)
    if override.is_interval_sweep():
        sweep = override.value()
        strings = [str(sweep.start), str(sweep.end)]
    elif isinstance(override.value(), Glob):
        options = loader.get_group_options(key, results_filter=ObjectType.CONFIG) if is_group else []
        strings = override.value().filter(options)
        if not strings:
            errors.append(f"{text}: matches none of the options of {key}: {', '.join(options) or '(not a group)'}")
            return None
    else:
        strings = list(override.sweep_string_iterator())
    if len(strings) > _MAX_SWEEP_VALUES:
        half = _MAX_SWEEP_VALUES // 2
        strings = strings[:half] + strings[-half:]
    element = override.get_key_element()
    return _Override(text, key, is_group, [f"{element}={value}" for value in strings], is_sweep=True)


# --- composing ---------------------------------------------------------------------------------


class _hydra_session:
    """Hydra's Compose API on conf/ (and a user's `--config-dir`, where @hydra.main puts it: after
    the primary config dir, before the schema). Whatever GlobalHydra held before (nothing, or a
    running @hydra.main) is put back afterwards, so a later @hydra.main in this process still starts."""

    def __init__(self, user_dir: Optional[str] = None):
        self.user_dir = user_dir

    def __enter__(self) -> Any:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.initialize import get_gh_backup

        self._previous = get_gh_backup()
        GlobalHydra.instance().clear()
        self._init = initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3")
        if self.user_dir:
            from hydra._internal.hydra import Hydra
            from hydra._internal.utils import create_config_search_path
            from hydra.core.config_search_path import SearchPathQuery

            search_path = create_config_search_path(str(conf_dir()))
            search_path.prepend(provider="command-line", path=f"file://{self.user_dir}",
                                anchor=SearchPathQuery(provider="schema"))
            GlobalHydra.instance().clear()
            Hydra.create_main_hydra2(task_name="distft", config_search_path=search_path)
        return GlobalHydra.instance().config_loader()

    def __exit__(self, *exc: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.initialize import restore_gh_from_backup

        GlobalHydra.instance().clear()
        restore_gh_from_backup(self._previous)


def _compose(config_name: str, overrides: list[str]) -> tuple[Any, Optional[str]]:
    """(DictConfig, None), or (None, one-line message) when Hydra refuses the overrides."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name, overrides=overrides), None
    # Hydra raises ValueError too; OmegaConf lets OverflowError through (train.lr=<400 digits>).
    except (HydraException, OmegaConfBaseException, ValueError, OverflowError) as err:
        return None, _describe(err, overrides[-1] if overrides else "")


def _typed(composed: Any) -> tuple[Optional[Config], Optional[str]]:
    """The typed Config; interpolations are resolved here, so `${nope}` is reported here."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return to_config(composed), None
    except ModelLoadError as err:  # model.name_or_path=<file>.gguf that cannot be converted
        return None, str(err)
    except OverflowError:  # an integer too large for a float field, through an interpolation or a YAML file
        return None, _overflowing_float(composed)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        return None, f"{key}: {_first_line(err)}" if key else _first_line(err)


def _overflowing_float(composed: Any, schema: type = Config, prefix: str = "") -> Optional[str]:
    """The message for the float field whose integer value no float holds, reached through an
    interpolation (`train.lr=${train.max_steps}`): OmegaConf's OverflowError does not say which."""
    from omegaconf import OmegaConf

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            found = _overflowing_float(composed, hint, f"{key}.")
            if found:
                return found
        elif hint in (float, Optional[float]):
            try:
                OmegaConf.select(composed, key)  # resolves the interpolation into the float field
            except OverflowError:
                return f"{key}: expected a float (such as 2e-4), got an integer too large for a float"
            except Exception:  # noqa: BLE001 - any other problem at this key is reported on its own
                continue
    return None if prefix else "a number too large for a float field; give one of at most about 1.8e308"


def _first_values(overrides: list[_Override]) -> list[str]:
    return [ov.values[0] for ov in overrides]


def _existing_choices(overrides: list[_Override], loader: Any, errors: list[str]) -> list[_Override]:
    """Group choices with the options that exist; a missing one is reported with the options."""
    from hydra.core.object_type import ObjectType

    kept = []
    for ov in overrides:
        options = loader.get_group_options(ov.key, results_filter=ObjectType.CONFIG)
        choices = [value.partition("=")[2] for value in ov.values]
        missing = [c for c in choices if c and c not in options]  # `~group` has no choice to check
        if missing:
            what = ov.text if not ov.is_sweep else f"{ov.text}: {', '.join(missing)}"
            errors.append(f"{what}: no such option in group '{ov.key}'; available: {', '.join(options)}")
        values = [v for v, c in zip(ov.values, choices) if c not in missing]
        if values:
            kept.append(dataclasses.replace(ov, values=values))
    return kept


def _composable(
    config_name: str, base: list[_Override], overrides: list[_Override], errors: list[str], stack: bool
) -> list[_Override]:
    """The overrides (and sweep values) that compose on top of `base`; each refusal is reported.

    stack=True checks each override on top of the ones kept before it too: group choices can
    clash with each other (two experiments), value overrides cannot.
    """
    kept: list[_Override] = []
    for ov in overrides:
        below = _first_values(base + (kept if stack else []))
        good_values, problems = [], []
        for value in ov.values:
            composed, problem = _compose(config_name, below + [value])
            problem = problem or _typed(composed)[1]
            if problem is None:
                good_values.append(value)
            elif problem not in problems:
                problems.append(problem)
        errors.extend(problems)
        if good_values:
            kept.append(dataclasses.replace(ov, values=good_values))
    return kept


def _check_sweep_variants(config_name: str, good: list[_Override], errors: list[str],
                          launch: bool = True) -> list[str]:
    """Validate the other values of each sweep, one sweep at a time (the others at their first)."""
    found: list[str] = []
    seen: set[str] = set()
    budget = _MAX_SWEEP_VARIANTS
    for i, ov in enumerate(good):
        for value in ov.values[1:]:
            if budget == 0:
                return found
            budget -= 1
            overrides = [o.values[0] for o in good[:i]] + [value] + [o.values[0] for o in good[i + 1 :]]
            composed, problem = _compose(config_name, overrides)
            cfg, problem = (None, problem) if problem else _typed(composed)
            problems = [problem] if problem else validate(cfg, model_max_positions=model_max_positions(cfg.model),
                                                          launch=launch)
            for message in problems:
                if message not in errors and message not in seen:
                    seen.add(message)
                    found.append(message if message.startswith(value) else f"with {value}: {message}")
    return found


# --- messages ----------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _describe(err: BaseException, override: str) -> str:
    """One line for a composition error: what the key expects, or which keys exist."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = err.__cause__ or err
    key = getattr(cause, "full_key", None) or override.lstrip("+~").partition("=")[0].partition("@")[0]
    value = override.partition("=")[2]
    if isinstance(cause, OverflowError):
        return f"{key}: expected {_expected(_schema_at(key)) or 'a number'}, got {_short(value)}, too large for a float"
    value = _short(value)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        parent, _, _ = key.rpartition(".")
        schema = _schema_at(parent)
        if schema is not None and dataclasses.is_dataclass(schema):
            return _unknown_key_message(key, [f.name for f in dataclasses.fields(schema)])
        if typing.get_origin(schema) is dict:  # a free-form mapping such as parallel.deepspeed.overrides
            # `mapping={a: 1}` sets the whole mapping: the `+` goes in front of that same override.
            written = override.lstrip("+~").partition("=")[0]
            return f"{key}: {parent} is a free-form mapping; add new keys with +{written if written == parent else key}={value}"
    if isinstance(cause, ValidationError):
        expected = _expected(_schema_at(key))
        if expected:
            return f"{key}: expected {expected}, got {value if value == 'null' else repr(value)}"
    detail = _first_line(cause)
    if cause is not err and "override" not in detail:
        detail = f"{_first_line(err)}: {detail}"
    return f"{override}: {detail}" if override else detail


def _short(value: str, limit: int = 40) -> str:
    """A value for a one-line message: a 400-digit number or a long path is cut in the middle."""
    return value if len(value) <= limit else f"{value[:20]}...{value[-8:]} ({len(value)} characters)"


def _schema_at(dotted_key: str) -> Any:
    """The declared type at a dotted key of Config (None when the key is not in the schema)."""
    node: Any = Config
    for part in [p for p in dotted_key.split(".") if p]:
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


def _expected(annotation: Any) -> Optional[str]:
    """A declared type in words: `Optional[int]` -> 'an integer or null'."""
    if annotation is None:
        return None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        inner = _expected(next(a for a in args if a is not type(None)))
        return f"{inner} or null" if inner else None
    origin = typing.get_origin(annotation) or annotation
    words = {
        bool: "true or false",
        int: "an integer",
        float: "a float (such as 2e-4)",
        str: "a string",
        list: "a list (such as [a,b])",
        dict: "a mapping (such as {key: value})",
    }
    if origin in words:
        return words[origin]
    if dataclasses.is_dataclass(origin):
        return f"a group of keys ({', '.join(f.name for f in dataclasses.fields(origin))})"
    return None
