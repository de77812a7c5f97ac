"""The default job convinces a newcomer: `python -m distft` as `make run` runs it, its thresholds checked.

The job must, within 3 minutes of training on 2 cores, bring at least 4 of its 6 synthetic tasks to
held-out exact match >= 0.5 and the overall exact match to >= 0.5. This runs it exactly as a user
does (no overrides but the run root and `--set` ones), reads its summary, prints exact match per
task, training time and whether each threshold holds; exit status 1 when one does not. With
`--baseline KEY=VALUE ...` it first runs the job with those overrides too (say, an old learning
rate), so the difference is measured on the same machine in the same run.

    python bench/default_job.py [--eval-samples 64] [--baseline train.lr=5e-3] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402

LEARNED, OVERALL, TASKS_LEARNED, TRAIN_SECONDS = 0.5, 0.5, 4, 180.0


def run_job(root: str, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "distft", f"run.root={root}", "tracking.progress_bar=false",
                           *overrides], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"the default job failed:\n{proc.stderr[-3000:]}")
    run_dir = next(line.split("run_dir: ", 1)[1].strip() for line in proc.stdout.splitlines() if "run_dir: " in line)
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def verdict(summary: dict) -> dict:
    after = summary["eval_after"]
    per_task = {task: v["exact_match"] for task, v in sorted(after["per_task"].items())}
    learned = [t for t, em in per_task.items() if em >= LEARNED]
    return {"per_task": per_task, "learned": learned, "exact_match": after["exact_match"], "loss": after["loss"],
            "base_loss": summary["eval_before"]["loss"], "train_s": summary["train_time_s"], "steps": summary["steps"],
            "ok": {"tasks": len(learned) >= TASKS_LEARNED, "overall": after["exact_match"] >= OVERALL,
                   "time": summary["train_time_s"] <= TRAIN_SECONDS}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-samples", type=int, default=64, help="held-out prompts scored (the job's: 64)")
    parser.add_argument("--baseline", nargs="*", default=None, help="overrides of a baseline run measured first")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the job itself (to try a change)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)
    command = command_line()
    root = tempfile.mkdtemp(prefix="distft-bench-default-")
    common = [f"eval.num_samples={args.eval_samples}"] if args.eval_samples != 64 else []
    runs = {}
    if args.baseline is not None:
        runs["baseline (" + " ".join(args.baseline) + ")"] = verdict(run_job(root, [*common, *args.baseline]))
    runs["default job" + (" (" + " ".join(args.set) + ")" if args.set else "")] = verdict(
        run_job(root, [*common, *args.set]))
    tasks = sorted(next(iter(runs.values()))["per_task"])
    table = ["| run | train s | steps | loss base -> tuned | exact match | " + " | ".join(tasks) + " | tasks >= 0.5 |",
             "|---|---:|---:|---|---:|" + "---:|" * len(tasks) + "---:|"]
    for name, v in runs.items():
        table.append(f"| {name} | {v['train_s']:.0f} | {v['steps']} | {v['base_loss']:.3f} -> {v['loss']:.3f} | "
                     f"{v['exact_match']:.3f} | " + " | ".join(f"{v['per_task'][t]:.2f}" for t in tasks)
                     + f" | {len(v['learned'])} of {len(tasks)} |")
    final = list(runs.values())[-1]
    checks = (f"tasks learned {len(final['learned'])} >= {TASKS_LEARNED}: {final['ok']['tasks']}; "
              f"overall exact match {final['exact_match']:.3f} >= {OVERALL}: {final['ok']['overall']}; "
              f"training {final['train_s']:.0f} s <= {TRAIN_SECONDS:.0f} s: {final['ok']['time']}")
    details = (f"the default job (`python -m distft`), {args.eval_samples} held-out prompts; thresholds: "
               f">= {TASKS_LEARNED} of 6 tasks at exact match >= {LEARNED}, overall >= {OVERALL}, "
               f"training <= {TRAIN_SECONDS:.0f} s")
    report("default_job", command, details, "\n".join(table), checks, args.record)
    return 0 if all(final["ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
