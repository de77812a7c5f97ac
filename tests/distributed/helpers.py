"""What the distributed tests share: running the CLI as a user would, reading a run's files, the
whole runs declared for the session's shared launches (runs_worker.py), and the engine matrix
(one launch of matrix_worker.py per test module, its cells checked alike)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TECHNIQUES = ("full", "lora", "dora", "qlora", "prefix", "prompt")
COMMON = ["train.max_steps=10", "train.log_every=1", "eval.num_samples=4", "eval.max_new_tokens=4"]
# DeepSpeed keeps parameters under 1e5 elements whole on every rank (not partitioned), which is every
# parameter of the tiny model: make ZeRO-3 partition them all, as it does a real model's layers.
ZERO3_PARTITION_ALL = "+parallel.deepspeed.overrides.zero_optimization={stage3_param_persistence_threshold:0}"


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def run_dir_of(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("run_dir: ")]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    return lines[0][len("run_dir: "):]


def step_metrics(run_dir: str, key: str = "loss") -> list[float]:
    """`key` of every training step logged in metrics.jsonl (evaluation lines have no loss)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if "loss" in r]


def summary_of(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def final_weights(run_dir: str) -> dict:
    """The trained tensors of a run's final checkpoint (the adapter, or the whole model)."""
    from safetensors.torch import load_file

    model = os.path.join(summary_of(run_dir)["final_checkpoint"], "model")
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(model, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(model, name))


# ------------------------------------------------------------- whole runs in shared launches

# Declared at import by the test modules, run on the first use of the `trainings` fixture
# (tests/conftest.py): each launch of runs_worker.py pays the start-up once for many runs.
_DECLARED: dict[str, dict] = {}
RUNS_WORKER = os.path.join(REPO, "tests", "distributed", "runs_worker.py")
# Launches in this order; a job goes into the first one with its rank count after those of the
# jobs it starts from (a state saved on 2 ranks is loaded on 1 in the third).
LAUNCH_RANKS = (1, 2, 1)


def declare_run(name: str, argv: list[str], ranks: int = 2, faults: str = "",
                resume_from: tuple[str, int] | None = None, share: str = "engines",
                poisoned: tuple[str, int, str] | None = None) -> str:
    """A whole run, `distft.train.train` on the config `argv` composes, as the command line's rank
    processes run it, in `run.dir=<session dir>/<share>/<name>`. `resume_from=(other, step)`:
    started as `other` would be again after being killed right after its step-`step` checkpoint.
    `poisoned=(other, step, kind)`: started in a copy of the finished run `other` (no summary)
    whose step-`step` checkpoint was poisoned (tests/payloads.py poison_checkpoint, `kind`).
    The name is the key: one run declared by several modules with the same argv (a shared
    reference) runs once. `share`: the set of runs it is launched with (a module's SHARED_RUNS;
    each set runs on its own, so two sets run on two pytest-xdist workers at once)."""
    return _declare({"kind": "train", "name": name, "argv": list(argv), "ranks": ranks, "faults": faults,
                     "resume_from": list(resume_from) if resume_from else None,
                     "poisoned": list(poisoned) if poisoned else None,
                     "after": [r[0] for r in (resume_from, poisoned) if r], "share": share})


def declare_state(name: str, mode: str, cell: str, parallel: str, technique: str, ranks: int,
                  overrides=(), after: str | None = None, share: str = "engines") -> str:
    """An engine's training state saved after 3 steps (`mode="save"`) or loaded into a fresh engine
    (`"load"`, after the save named `after`), in `<session dir>/<share>/state-<cell>` (runs_worker.py)."""
    return _declare({"kind": "state", "name": name, "mode": mode, "cell": cell, "parallel": parallel,
                     "technique": technique, "ranks": ranks, "overrides": list(overrides),
                     "after": [after] if after else [], "share": share})


def engine_run(technique: str, parallel: str = "single", ranks: int = 2, *extra: str) -> str:
    """The equivalence tests' run (COMMON; adapters without dropout, whose masks come from each
    rank's own RNG) of `technique` on `parallel`: one declaration per (technique, parallel, ranks),
    so the one-process reference is shared by every engine's test."""
    args = [f"+experiment=tiny_{technique}", *COMMON]
    if technique != "full":
        args.append("technique.dropout=0.0")
    if parallel != "single":
        args += [f"parallel={parallel}", f"launcher.nproc_per_node={ranks}"]
    if parallel.startswith("zero3"):
        args.append(ZERO3_PARTITION_ALL)
    name = f"{parallel}-{technique}" if parallel == "single" or ranks == 2 else f"{parallel}-{technique}-{ranks}"
    return declare_run(name, [*args, *extra], ranks=1 if parallel == "single" else ranks)


def _declare(job: dict) -> str:
    known = _DECLARED.setdefault(job["name"], job)
    assert known == job, f"{job['name']} is declared twice, differently: {known} vs {job}"
    return job["name"]


class Trainings:
    """The results of every declared job, by name (`run_dir`, `log` of rank 0, `logs` of every rank,
    `error` when the run ended with one of distft's own errors). A set of runs (`share`) is run
    the first time one of its names is asked for, in `<root>/<share>`; under pytest-xdist the
    workers share `root`, and a file lock makes each set run once."""

    def __init__(self, root):
        self.root, self.results = root, {}
        self._done: set[str] = set()

    def __getitem__(self, name: str) -> dict:
        assert name in _DECLARED, f"{name} was not declared (helpers.declare_run)"
        self._run(_DECLARED[name]["share"])
        assert name in self.results, f"{name}: its launch failed"
        return self.results[name]

    def finished(self, name: str) -> tuple[str, str]:
        """(run directory, rank 0's output) of a run that trained to the end."""
        result = self[name]
        assert "error" not in result, result["error"]
        assert os.path.exists(os.path.join(result["run_dir"], "summary.json")), result["log"][-3000:]
        return result["run_dir"], result["log"]

    def state_dir(self, cell: str):
        share = _DECLARED[f"save-{cell}"]["share"]
        self._run(share)
        return self.root / share / f"state-{cell}"

    def _run(self, share: str) -> None:
        from filelock import FileLock

        if share in self._done:
            return
        root = self.root / share
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):
            done = root / "results.json"
            if not done.exists():
                with open(done.with_suffix(".tmp"), "w") as f:
                    json.dump(run_declared(root, share), f)
                os.replace(done.with_suffix(".tmp"), done)
            with open(done) as f:
                self.results.update(json.load(f))
        self._done.add(share)


def run_declared(root, share: str) -> dict:
    """Every job declared in `share`, in at most len(LAUNCH_RANKS) launches of runs_worker.py:
    results by name."""
    launch_of: dict[str, int] = {}
    plans: list[list[dict]] = [[] for _ in LAUNCH_RANKS]
    for name, job in _DECLARED.items():  # declaration order: a job comes after what it starts from
        if job["share"] != share:
            continue
        assert all(_DECLARED[d]["share"] == share for d in job["after"]), f"{name} starts from another share's run"
        first = max((launch_of[d] for d in job["after"]), default=0)
        launch_of[name] = next(i for i in range(first, len(LAUNCH_RANKS)) if LAUNCH_RANKS[i] == job["ranks"])
        concrete = {k: v for k, v in job.items() if k not in ("ranks", "after", "share")}
        if job["kind"] == "train":
            concrete["argv"] = [*job["argv"], f"run.dir={root / name}"]
            if job["resume_from"]:
                concrete["resume_from"] = {"run_dir": str(root / job["resume_from"][0]), "step": job["resume_from"][1]}
            if job["poisoned"]:
                source, step, kind = job["poisoned"]
                concrete["poisoned"] = {"run_dir": str(root / source), "step": step, "kind": kind,
                                        "markers": str(root / f"{name}.markers")}
        else:
            out_dir = root / f"state-{job['cell']}"
            out_dir.mkdir(exist_ok=True)
            concrete["out_dir"] = str(out_dir)
        plans[launch_of[name]].append(concrete)
    results: dict = {}
    for i, (ranks, jobs) in enumerate(zip(LAUNCH_RANKS, plans)):
        if not jobs:
            continue
        plan = root / f"launch{i}.json"
        with open(plan, "w") as f:
            json.dump(jobs, f)
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", RUNS_WORKER,
             str(plan)], capture_output=True, text=True, cwd=REPO, timeout=2400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        per_rank = []
        for rank in range(ranks):
            with open(root / f"launch{i}.rank{rank}.json") as f:
                per_rank.append(json.load(f))
        for name, result in per_rank[0].items():
            results[name] = {**result, "logs": [r[name].get("log", "") for r in per_rank]}
    return results


def launch_matrix(out_dir, presets, overrides=()) -> dict:
    """Every technique on every preset in one 2-rank launch of matrix_worker.py."""
    out = os.path.join(str(out_dir), "matrix.json")
    worker = os.path.join(REPO, "tests", "distributed", "matrix_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, out,
         *presets, "--", "train.max_steps=5", *overrides],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def check_matrix_cell(cell: dict, where: str, gathered: bool) -> None:
    """A matrix cell that validation accepted trained, evaluated in lockstep, and saves the trained model."""
    assert "rejected" not in cell, (where, cell.get("rejected"))
    losses = cell["losses"]
    assert len(losses) == 5 and all(map(_finite, losses + cell["grad_norms"])), (where, cell)
    # Falls beyond noise: the held-out loss on the same fixed batches before and after (no
    # batch-to-batch noise; the smallest measured fall, prompt tuning, is 4%), and the train loss.
    eval_loss = cell["eval_loss"][0]
    assert eval_loss < cell["eval_loss_before"] * 0.98, (where, cell["eval_loss_before"], eval_loss)
    assert losses[-1] < losses[0] * 0.98, (where, losses)
    # Evaluation and generation ran on both ranks in lockstep, to the same results.
    assert cell["eval_loss"][1] == eval_loss, where
    assert cell["tokens"][0] == cell["tokens"][1], (where, cell["tokens"])
    assert all(len(row) == 4 for row in cell["tokens"][0]), where
    # What a checkpoint would save is the trained model: a fresh one-process model loaded from
    # it scores the same loss (fp32, same batches: measured bit-identical) and generates the same.
    assert cell["gathered"] is gathered, where
    assert cell["state_keys_match"] and cell["weights_nonempty"], where
    assert cell["reloaded_eval_loss"] == pytest.approx(eval_loss, rel=1e-6), where
    assert cell["reloaded_tokens"] == cell["tokens"][0], where


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
