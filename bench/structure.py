"""The package's shape in numbers, for a tree and a git revision side by side (issue 37's table).

    python bench/structure.py                  # this checkout
    python bench/structure.py --rev b6e72c5    # and that revision (a temporary git worktree)

Per tree: modules directly in distft/, lines in distft/, the longest files, function-local imports
of distft's own modules, and the distft frames on the stack when the engine's step runs in a real
one-step `python -m distft +experiment=tiny_full` (counted from the command's entry function, not
the `__main__` module, down to the function that calls the engine's `step()` ... the Engine's own
step() included, the shared optimizer update below it not).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile

from common import REPO, report

HOOK = r"""
import inspect, os, runpy, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook
def hook(opt, args, kwargs):
    frames = [f for f in inspect.stack() if os.sep + "distft" + os.sep in f.filename and f.function != "<module>"]
    frames = [f for f in frames if not f.filename.endswith(os.path.join("engines", "optim.py"))]
    print("FRAMES", len(frames), " -> ".join(f.function for f in reversed(frames)), flush=True)
    os._exit(0)
register_optimizer_step_pre_hook(hook)
sys.argv = ["distft", *sys.argv[1:]]
runpy.run_module("distft", run_name="__main__")
"""


def local_imports(tree: ast.AST) -> int:
    """Imports of distft modules inside functions (each import statement once)."""
    seen = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distft"):
                    seen.add(id(node))
                elif isinstance(node, ast.Import) and any(a.name.startswith("distft") for a in node.names):
                    seen.add(id(node))
    return len(seen)


def shape(tree: str) -> dict:
    package = os.path.join(tree, "distft")
    sizes, local, lines = [], 0, 0
    for directory, _, names in os.walk(package):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path) as f:
                    source = f.read()
                n = source.count("\n")
                lines += n
                sizes.append((n, os.path.relpath(path, tree)))
                local += local_imports(ast.parse(source))
    with tempfile.TemporaryDirectory() as run_dir:
        proc = subprocess.run([sys.executable, "-c", HOOK, "+experiment=tiny_full", f"run.dir={run_dir}",
                               "eval.compare_base=false"], cwd=tree, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": tree}, timeout=600)
    frames = next((line.split(" ", 2) for line in proc.stdout.splitlines() if line.startswith("FRAMES")), None)
    return {"modules directly in distft/": len([n for n in os.listdir(package) if n.endswith(".py")]),
            "lines in distft/": lines,
            "distft/train.py lines": next((n for n, p in sizes if p == os.path.join("distft", "train.py")), 0),
            "longest file": "{1} ({0})".format(*max(sizes)),
            "function-local imports of distft modules": local,
            "frames from the command to Engine.step": f"{frames[1]} ({frames[2]})" if frames else proc.stderr[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="also measure this git revision, in a temporary worktree")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    columns = {"this checkout": shape(REPO)}
    if args.rev:
        with tempfile.TemporaryDirectory() as scratch:
            worktree = os.path.join(scratch, "tree")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "-q", "--detach", worktree, args.rev], check=True)
            try:
                columns = {args.rev: shape(worktree), **columns}
            finally:
                subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", worktree], check=True)
    keys = list(next(iter(columns.values())))
    table = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    table += [f"| {key} | " + " | ".join(str(c[key]) for c in columns.values()) + " |" for key in keys]
    table_md = "\n".join(table)
    report("structure", "python bench/structure.py" + (f" --rev {args.rev}" if args.rev else ""),
           "the package's shape (bench/structure.py docstring)", table_md, "", args.record)


if __name__ == "__main__":
    main()
