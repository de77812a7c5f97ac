"""Odd command-line overrides (issue 13: 77 tried by hand, 15 tracebacks, 4 wrongly accepted):
each one either composes and validates, or ends in one-line messages naming the key, what is
allowed and the fix, before anything starts (`python -m distft` prints them and exits 2);
never a traceback, never silently accepted.

Rules are tested on `validate()` / `path_problems()` / `machine_problems()` of typed configs
(microseconds), the Hydra-level ones through `preflight()`, a fuzz test draws keys of the schema
and values of every kind through `preflight()`, and one real `python -m distft` proves the exit
code and the absence of a traceback. No torch, except where a check of this machine's GPUs or
the data path imports it.

The tests that start a process: tests/cli/test_overrides.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distft.config import Config, conf_dir
from distft.preflight import path_problems, preflight
from distft.validation import validate


def leaf_keys(schema: type = Config, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted key, declared type) of every leaf of the schema."""
    keys = []
    for f in dataclasses.fields(schema):
        hint = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += leaf_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append((f"{prefix}{f.name}", hint))
    return keys


def declared(hint: typing.Any) -> typing.Any:
    """Optional[int] -> int, list[str] -> list."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return declared(args[0])
    return typing.get_origin(hint) or hint


KEYS = leaf_keys()
FLOAT_KEYS = [key for key, hint in KEYS if declared(hint) is float]
INT_KEYS = [key for key, hint in KEYS if declared(hint) is int]


def configured(**changes: typing.Any) -> Config:
    """The default Config with dotted-key changes, e.g. configured(**{"train.lr": 0.1})."""
    cfg = Config()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = getattr(node, parent)
        assert hasattr(node, leaf), key
        setattr(node, leaf, value)
    return cfg


def problems(**changes: typing.Any) -> list[str]:
    return validate(configured(**changes))


# --- numbers: every float finite, every integer in 64 bits, every seed in numpy's range ---------


def test_every_float_of_the_schema_must_be_finite():
    assert len(FLOAT_KEYS) > 20 and "train.lr" in FLOAT_KEYS and "launcher.mem_gb" in FLOAT_KEYS
    for key in FLOAT_KEYS:
        for value in (math.nan, math.inf, -math.inf):
            errors = problems(**{key: value})
            # One message, about that key alone: the other checks see the default instead.
            assert len(errors) == 1 and errors[0].startswith(f"{key}={value} is not a finite number"), (key, errors)
    assert problems(**{"train.lr": math.nan}) == [
        "train.lr=nan is not a finite number (NaN and infinity are refused); give a number such as 0.002"]
    cfg = configured(**{"train.grad_clip": math.nan})
    validate(cfg)
    assert math.isnan(cfg.train.grad_clip)  # the caller's config is left as written


def test_every_integer_must_fit_in_64_bits_and_every_seed_in_numpys_range():
    seeds = [key for key in INT_KEYS if key.endswith("seed")]
    assert sorted(seeds) == ["data.seed", "data.synthetic.seed", "model.init_seed", "train.seed"]
    for key in INT_KEYS:
        errors = problems(**{key: 10**400})
        assert len(errors) == 1 and errors[0] == (
            f"{key}=10000000...0000 (401 digits) does not fit in 64 bits; give an integer of at most "
            "9223372036854775807 (2**63 - 1) in magnitude"), (key, errors)
    for key in seeds:
        for value in (-1, 2**32):
            assert problems(**{key: value}) == [
                f"{key}={value} is not a valid seed; give an integer in [0, 4294967295] (2**32 - 1)"]
        assert problems(**{key: 2**32 - 1}) == []


def test_a_number_too_large_for_a_float_is_one_message():
    _, errors = preflight(["train.lr=" + "9" * 400, "train.max_steps=7"])
    assert errors == ["train.lr: expected a float (such as 2e-4), got 99999999999999999999...99999999 "
                      "(400 characters), too large for a float"]
    _, errors = preflight(["train.max_steps=" + "9" * 400, "train.lr=${train.max_steps}"])  # through an interpolation
    assert errors == ["train.lr: expected a float (such as 2e-4), got an integer too large for a float"]


def test_setting_a_whole_free_form_mapping_is_told_where_the_plus_goes():
    _, errors = preflight(["parallel=zero2", "parallel.deepspeed.overrides={wall_clock_breakdown: true}"])
    assert errors == ["parallel.deepspeed.overrides.wall_clock_breakdown: parallel.deepspeed.overrides is a free-form "
                      "mapping; add new keys with +parallel.deepspeed.overrides={wall_clock_breakdown: true}"]
    assert preflight(["parallel=zero2", "+parallel.deepspeed.overrides={wall_clock_breakdown: true}"])[1] == []


# --- settings that were accepted, or crashed later, one rule each ------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tracking.cpu_memory_steps": -1}, "tracking.cpu_memory_steps=-1 must be >= 0"),
        ({"launcher.monitor_interval_s": -1.0}, "launcher.monitor_interval_s=-1.0 must be > 0"),
        ({"launcher.monitor_interval_s": 0.0}, "launcher.monitor_interval_s=0.0 must be > 0"),
        ({"model.rms_norm_eps": 0.0}, "model.rms_norm_eps=0.0 must be > 0"),
        ({"plan.epoch_sample_rows": -5}, "plan.epoch_sample_rows=-5 must be >= 0"),
        ({"cluster.peak_tflops": -1.0}, "cluster.peak_tflops=-1.0 is negative; give TFLOP/s (0: unknown)"),
        ({"data.path": "my.jsonl"}, "data.path='my.jsonl' is ignored by data.source=synthetic (the built-in data "
                                    "set); choose the file's reader, e.g. data=jsonl data.path=my.jsonl"),
        ({"data.path": "rows.csv"}, "data.path='rows.csv' is ignored by data.source=synthetic (the built-in data "
                                    "set); choose the file's reader, e.g. data=csv data.path=rows.csv"),
        ({"data.eval_size": 0}, "data.eval_size=0 leaves no eval split, but every run scores the model on held-out "
                                "rows before and after training; use data.eval_size >= 1, or give data.eval_path"),
        ({"data.eval_fraction": 0.0}, "data.eval_fraction=0 leaves no eval split, but every run scores the model on "
                                      "held-out rows before and after training; use a fraction in (0, 1) such as "
                                      "0.05, data.eval_size=N, or give data.eval_path"),
        ({"launcher.signal": "FOO"}, "launcher.signal='FOO' is not a signal name; use USR1, USR2 or TERM"),
        ({"launcher.signal": "_DFL"}, "launcher.signal='_DFL' is not a signal name; use USR1, USR2 or TERM"),
        ({"launcher.signal": "KILL"}, "launcher.signal=KILL cannot ask the run to checkpoint: it cannot be caught; "
                                      "use USR1 or USR2"),
        ({"launcher.signal": "SIGSEGV"}, "launcher.signal=SIGSEGV cannot ask the run to checkpoint: it is raised by "
                                         "crashes; use USR1 or USR2"),
        ({"parallel.backend": "nccl", "train.device": "cpu"},
         "parallel.backend=nccl needs CUDA GPUs, but train.device=cpu; use parallel.backend=gloo (or auto: nccl on "
         "GPUs, gloo on the CPU)"),
        ({"model.attn_implementation": "flash_attention_2", "train.device": "cpu"},
         "model.attn_implementation=flash_attention_2 runs on CUDA GPUs only, but train.device=cpu; use "
         "model.attn_implementation=sdpa (or eager)"),
        ({"data.augment.functions": [{"_target_": "os.system"}]},
         "data.augment.functions[0]: os.system(command) cannot be called with a row, an rng (too many positional "
         "arguments); give a function fn(row, rng, **kwargs) -> row | list[row] | None"),
        ({"data.augment.functions": ["os.path"]},
         "data.augment.functions[0]: _target_='os.path' is a module, not a function fn(row, rng, **kwargs) -> row | "
         "list[row] | None"),
        ({"data.augment.functions": [{"_target_": "tests.unit.test_overrides.add_suffix", "sufix": "!"}]},
         "data.augment.functions[0]: tests.unit.test_overrides.add_suffix(row, rng, suffix='!') cannot be called with "
         "a row, an rng and sufix= (got an unexpected keyword argument 'sufix'); give a function fn(row, rng, "
         "**kwargs) -> row | list[row] | None"),
        ({"data.augment.functions": [{"suffix": "!"}]},
         "data.augment.functions[0] has no _target_; write {_target_: pkg.mod.fn, ...kwargs} for a function fn(row, "
         "rng, **kwargs) -> row | list[row] | None"),
    ],
)  # fmt: skip
def test_rule(changes, message):
    assert problems(**changes) == [message]


def add_suffix(row: dict, rng, suffix: str = "!") -> dict:
    row["output"] += suffix
    return row


def test_an_augmentation_target_that_does_not_import_names_the_error():
    (error,) = problems(**{"data.augment.functions": [{"_target_": "nope.module.fn"}]})
    assert error.startswith("data.augment.functions[0]: _target_='nope.module.fn' cannot be imported "
                            "(ModuleNotFoundError: No module named 'nope')")


def test_what_stays_accepted():
    """The rules refuse what cannot run, not what is merely unusual."""
    good_function = {"_target_": "tests.unit.test_overrides.add_suffix", "suffix": "?"}
    for changes in (
        {"data.eval_size": 0, "data.source": "jsonl", "data.path": "t.jsonl", "data.eval_path": "e.jsonl"},
        {"data.eval_fraction": 0.0, "data.eval_size": 3},
        {"data.eval_path": "held.jsonl"},  # synthetic training rows, scored on the user's own eval file
        {"data.eval_size": 0, "data.source": "hf_disk", "data.path": "ds"},  # its validation split may hold out
        {"data.augment.functions": [good_function, "tests.unit.test_overrides.add_suffix"]},
        {"launcher.signal": "SIGUSR1"}, {"launcher.signal": "term"},
        {"train.seed": 0, "data.seed": 2**32 - 1}, {"train.max_steps": 2**63 - 1},
        {"model.attn_implementation": "flash_attention_2", "train.device": "cuda"},  # machine_problems' business
        {"parallel.backend": "nccl", "train.device": "auto"},
    ):
        assert problems(**changes) == [], changes
    # Early stopping with its own eval file: eval_size=0 has nothing to hold out (it used to be refused).
    assert problems(**{"data.eval_size": 0, "data.source": "jsonl", "data.path": "t.jsonl", "data.eval_path": "e.jsonl",
                       "train.early_stopping_patience": 2}) == []


def test_an_augmentation_function_that_raises_is_one_data_error_naming_it_and_the_row():
    from distft.config import AugmentConfig, DataConfig, SyntheticDataConfig
    from distft.data.pipeline import DataError, prepare_data
    from distft.model.build import build_offline_tokenizer

    _CALLS["n"] = 0
    cfg = DataConfig(synthetic=SyntheticDataConfig(num_examples=40, seed=5), eval_size=4,
                     augment=AugmentConfig(functions=["tests.unit.test_overrides.add_suffix",
                                                      "tests.unit.test_overrides.fail_on_third"]))
    with pytest.raises(DataError) as caught:
        prepare_data(cfg, build_offline_tokenizer())
    assert str(caught.value) == (
        "data.augment.functions[1]: tests.unit.test_overrides.fail_on_third raised KeyError ('no such field') on "
        "training row 2 (after the split); fix the function, it is called as fn(row, rng, **kwargs) -> row | "
        "list[row] | None")
    assert isinstance(caught.value.__cause__, KeyError)  # the original, for whoever debugs the function


_CALLS = {"n": 0}


def fail_on_third(row: dict, rng) -> dict:
    _CALLS["n"] += 1
    if _CALLS["n"] == 3:
        raise KeyError("no such field")
    return row


# --- paths: the run directory must be creatable ---------------------------------------------------


def test_run_directory_names_too_long_for_the_file_system(tmp_path):
    long_name = "a" * 300
    assert path_problems(configured(**{"run.root": str(tmp_path), "run.experiment": long_name})) == [
        "run.experiment: the directory name 'aaaaaaaaaaaaaaaaaaaa...aaaaaaaa (300 characters)' is longer than the 255 "
        "bytes the file system allows for one name; choose a shorter run.experiment"]
    assert path_problems(configured(**{"run.root": f"{tmp_path}/{'b' * 256}/runs"})) == [
        "run.root: the directory name 'bbbbbbbbbbbbbbbbbbbb...bbbbbbbb (256 characters)' is longer than the 255 "
        "bytes the file system allows for one name; choose a shorter run.root"]
    deep = str(tmp_path) + "/d" * 1950  # every name short, the whole path too long for the files below it
    (error,) = path_problems(configured(**{"run.dir": deep}))
    assert error.startswith("run.dir: the directory '") and error.endswith(
        "bytes long, which leaves the files below it less than 255 of the file system's 4096; choose a shorter run.dir")


def test_a_run_directory_where_no_directory_can_be_made(tmp_path):
    (error,) = path_problems(configured(**{"run.root": "/proc/distft"}))
    assert error.startswith("run.root: the directory '/proc/distft/default/") and error.endswith(
        "cannot be created: '/proc' takes no new directory (No such file or directory); choose another run.root")
    # A good place is probed without leaving anything behind.
    assert path_problems(configured(**{"run.root": str(tmp_path / "new" / "root")})) == []
    assert list(tmp_path.iterdir()) == []


# --- this machine: GPUs and attention kernels, only for a run that starts here -------------------


def test_gpu_settings_are_checked_against_this_machine_only_for_a_local_run():
    import torch

    from distft.validation import machine_problems

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    beyond = machine_problems(configured(**{"train.device": f"cuda:{gpus}"}))
    expected = (f"train.device=cuda:{gpus}, but this machine has {gpus} GPU(s): cuda:0 to cuda:{gpus - 1}; use one of "
                "them, or train.device=cuda (rank r on GPU r)") if gpus else (
                f"train.device=cuda:{gpus}, but this machine has no GPU that torch can use (torch.cuda.is_available() "
                "is false); use train.device=cpu or auto, or run on a GPU node")
    assert beyond == [expected]
    nccl = machine_problems(configured(**{"parallel.backend": "nccl"}))
    assert nccl == ([] if gpus else [
        "parallel.backend=nccl needs CUDA GPUs, but this machine has none (train.device=auto runs on the CPU here); "
        "use parallel.backend=gloo or auto, or run on a GPU node"])
    assert len(machine_problems(configured(**{"train.device": "cuda"}))) == (0 if gpus else 1)
    # SLURM runs elsewhere: its GPUs are not this (login) node's.
    assert machine_problems(configured(**{"launcher.kind": "slurm", "train.device": f"cuda:{gpus}"})) == []
    # The planner plans GPU configs on any machine: preflight(run_here=False) leaves this out.
    assert preflight([f"train.device=cuda:{gpus}", "parallel.backend=nccl"], run_here=False)[1] == []
    assert preflight([f"train.device=cuda:{gpus}"])[1] == [expected]
    # A sweep whose points hydra-submitit sends to SLURM does not run here either; submitit_local does.
    sweep = ["-m", "train.lr=1e-3,2e-3", f"train.device=cuda:{gpus}"]
    assert preflight([*sweep, "hydra/launcher=submitit_slurm"])[1] == []
    assert preflight([*sweep, "hydra/launcher=submitit_local"])[1] == [expected]


def test_an_attention_kernel_that_is_not_installed():
    from distft.validation import machine_problems

    installed = importlib.util.find_spec("flash_attn") is not None
    errors = machine_problems(configured(**{"model.attn_implementation": "flash_attention_2",
                                            "launcher.kind": "slurm"}))  # the job runs this same Python
    assert errors == ([] if installed else [
        "model.attn_implementation=flash_attention_2 needs the Python module 'flash_attn', which is not installed "
        "here (pip install flash-attn --no-build-isolation); or use model.attn_implementation=sdpa"])


# --- fuzz: any key, any kind of value ----------------------------------------------------------

GROUP_CHOICES = sorted(
    f"{group.name}={option.stem}"
    for group in conf_dir().iterdir() if group.is_dir() and group.name != "experiment"
    for option in group.glob("*.yaml")
)  # fmt: skip
NON_FINITE = ["nan", "inf", "-inf", "1e400", "-1e400"]
ODD = {
    float: [*NON_FINITE, "9" * 400, "-1", "0", "1e-30", "1.5", "abc", "null", "true"],
    int: ["-1", "0", str(2**63), str(2**64), "9" * 400, "1.5", "nan", "abc", "null", "[1]"],
    str: ["''", "a" * 300, "/proc/distft", "my.jsonl", "cuda", "cuda:7", "nccl", "KILL", "FOO", "_DFL",
          "flash_attention_2", "kernels-community/flash-attn", "../up", "x/y", "${nope}", "null", "1", "[a]"],
    bool: ["true", "false", "1", "yes", "null", "nan"],
    list: ["[]", "[a,b]", "[{_target_: os.system}]", "[{_target_: nope.nope}]", "[1,2]", "[{x: 1}]", "a", "null"],
    dict: ["{}", "{a: 1}", "{zero_optimization: {stage: 2}}", "{a: nan}", "[1]", "null"],
}  # fmt: skip
ANY_VALUE = st.one_of(
    st.sampled_from(sorted({v for values in ODD.values() for v in values})),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="abcxyz019_-.:/", min_size=1, max_size=12),
)


@st.composite
def overrides(draw) -> str:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(GROUP_CHOICES))
    key, hint = draw(st.sampled_from(KEYS))
    kind = declared(hint)
    value = draw(st.sampled_from(ODD[kind]) if kind in ODD and draw(st.booleans()) else ANY_VALUE)
    return f"{key}={value}"


@settings(derandomize=True, max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(argv=st.lists(overrides(), min_size=1, max_size=3))
def test_any_override_composes_and_validates_or_is_one_line_messages(argv, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative paths (run.root=x/y, data.path=my.jsonl) land in a scratch directory
    try:
        cfg, errors = preflight(argv)
    finally:
        os.chdir(cwd)
    assert isinstance(errors, list) and all(isinstance(e, str) and e.strip() and "\n" not in e for e in errors), errors
    assert errors or isinstance(cfg, Config), argv
    for override in argv:
        key, _, value = override.partition("=")
        if key in FLOAT_KEYS and value in NON_FINITE and sum(o.startswith(f"{key}=") for o in argv) == 1:
            assert any(key in e for e in errors), (argv, errors)  # never silently accepted


def test_messages_name_a_model_given_by_path_by_its_path(tmp_path):
    """The preset's name ('tiny') is only where the defaults came from: a model loaded from a
    directory is named by that directory."""
    import json as _json

    from distft.preflight import preflight

    (tmp_path / "config.json").write_text(_json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    _, errors = preflight([f"model.name_or_path={tmp_path}", "data.max_seq_len=128"])
    assert len(errors) == 1 and f"of model '{tmp_path}'" in errors[0] and "'tiny'" not in errors[0], errors
