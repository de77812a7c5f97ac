"""The planner against what training allocates, on the real SmolLM2-135M-Instruct and a Llama-3-size
vocabulary: each cell is a whole run (`python -m distft`, 2 optimizer steps) with
`tracking.cpu_memory_steps=2`, which counts every rank's tensor allocations with torch's profiler
(the CPU's counterpart of a GPU's allocated-memory peak); its summary.json holds each rank's
measured peak and the plan of the same terms. Prints measured, planned and the error per cell.

    python bench/plan_accuracy.py [--cells smollm2-lora-single,...] [--record]

It measures memory, not time; the machine's load does not change the figures.
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

PROFILED = ["train.max_steps=2", "eval.num_samples=1", "eval.max_new_tokens=1", "eval.compare_base=false",
            "train.eval_max_batches=1", "tracking.cpu_memory_steps=2", "tracking.plot=false",
            "tracking.wandb.mode=disabled", "checkpoint.save_every=0", "data.synthetic.num_examples=300"]


def smollm2(technique: str, parallel: str, ranks: int) -> list[str]:
    from distft.model.pretrained import smollm2_dir

    return [f"model.name_or_path={smollm2_dir()}", f"technique={technique}", f"parallel={parallel}",
            f"launcher.nproc_per_node={ranks}", "data.max_seq_len=256", "train.micro_batch_size=4",
            f"train.global_batch_size={4 * ranks}"]


CELLS = {
    **{f"smollm2-{technique}-{parallel}": smollm2(technique, parallel, ranks)
       for technique in ("lora", "full") for parallel, ranks in (("single", 1), ("ddp", 2), ("fsdp", 2), ("zero2", 2))},
    "smollm2-dora-single": smollm2("dora", "single", 1),
    "smollm2-lora-zero3": smollm2("lora", "zero3", 2),
    # the case: a Llama-3 vocabulary under tiny layers, one 2048-token row (the loss is the step)
    "vocab128k-full-single": ["+experiment=tiny_full", "model.vocab_size=128256", "data.max_seq_len=2048",
                              "model.max_position_embeddings=2048", "train.micro_batch_size=1",
                              "train.global_batch_size=1"],
}


def measure(name: str, args: list[str], root: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "distft", *args, *PROFILED, f"run.dir={os.path.join(root, name)}"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(root, name, "summary.json")) as f:
        memory = json.load(f)["memory"]
    measured = max(memory["training_gb_per_rank"])
    return {"measured": measured, "planned": memory["planned_gb"], "terms": memory["planned"],
            "error": memory["planned_gb"] / measured - 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.cells.split(","):
            result = measure(name, CELLS[name], root)
            terms = " + ".join(f"{k} {v:.3f}" for k, v in result["terms"].items() if v)
            rows.append(f"| {name} | {result['measured']:.3f} | {result['planned']:.3f} | {result['error']:+.1%} | {terms} |")
            print(rows[-1], flush=True)
    table = "\n".join(["| cell | measured GiB (busiest rank) | planned GiB | plan error | planned terms (GiB) |",
                       "|---|---|---|---|---|", *rows])
    worst = max(abs(float(row.split("|")[4].strip().rstrip("%")) / 100) for row in rows)
    report("plan accuracy (real model)", command_line(),
           "2 optimizer steps per cell, tracking.cpu_memory_steps=2 (torch profiler, tensors only); SmolLM2 cells 4 x 256 "
           "tokens per rank", table, f"worst plan error: {worst:.1%}", args.record)


if __name__ == "__main__":
    main()
