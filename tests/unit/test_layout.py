"""One torch-free table per axis (issue 37 §2): what a parallel strategy is lives in
distft/engines/kinds.py (`ENGINES`), what a technique is in distft/techniques/kinds.py
(`TECHNIQUES`); every other module reads a row, never a name. So a new engine is one module, one
row and one conf/parallel YAML, and a new technique one row, its builder and one conf/technique
YAML. Read from the source (AST only): nothing is imported but the two tables, no process runs.

The rule, for every .py under distft/ (except distft/engines/ and distft/techniques/, where the
names belong) and under launchers/, where a "name" is a key of ENGINES or of TECHNIQUES:

- no comparison (==, !=, in, not in, is, is not) with a name, or with a literal tuple, list or
  set holding one: `cfg.parallel.strategy == "zero3"`, `technique in ("prefix", "prompt")`;
- no `.startswith()`/`.endswith()` with a prefix (suffix) of a name: `strategy.startswith("zero")`;
- no `case "fsdp":` in a match statement;
- no literal list of names (a tuple, list or set of two or more, all names: `("lora", "qlora",
  "dora")`, an advice ladder), and no dict keyed by two or more names of one table (a lookup
  table such as `{"zero1": 1, "zero2": 2}`): both are a table kept outside the table.

It is kept strict: the comparisons are flagged whatever the other side is called, so `kind.options
== "fsdp"` counts too (read a field instead). The one exception: a name as the left operand of
`in`/`not in` over something that is not a literal collection and not named for a strategy,
technique or parallel setting, which looks up a key or a substring (`"prompt" in row`: a data
row's field, whose name only happens to be a technique's). Words that happen to be names are
otherwise free anywhere but in those comparisons (messages, overrides such as "parallel=fsdp",
dict keys of data rows such as {"prompt": ...}).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOMES = ("distft/engines/", "distft/techniques/")  # where the names belong
MEMBERSHIP_OWNER = re.compile(r"strategy|technique|parallel")


def _tables() -> tuple[set[str], set[str]]:
    from distft.engines.kinds import ENGINES
    from distft.techniques.kinds import TECHNIQUES

    return set(ENGINES), set(TECHNIQUES)


def _checked_files() -> list[str]:
    paths = []
    for folder in ("distft", "launchers"):
        for directory, _, files in os.walk(REPO / folder):
            for name in files:
                rel = os.path.relpath(os.path.join(directory, name), REPO).replace(os.sep, "/")
                if name.endswith(".py") and not rel.startswith(HOMES):
                    paths.append(rel)
    return sorted(paths)


def _strings(node: ast.AST) -> list[str]:
    """The string constants of a constant or of a literal tuple/list/set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def name_comparisons(source: str, strategies: set[str], techniques: set[str]) -> list[str]:
    """Every place `source` compares a strategy or technique name (the module docstring's rule),
    as "line N: what: the code"."""
    names = strategies | techniques
    tree = ast.parse(source)
    hits = []
    # A literal collection compared with something is reported once, as the comparison.
    compared = {id(side) for node in ast.walk(tree) if isinstance(node, ast.Compare)
                for side in (node.left, *node.comparators)}

    def hit(node: ast.AST, what: str) -> None:
        code = " ".join((ast.get_source_segment(source, node) or "").split())
        hits.append(f"line {node.lineno}: {what}: {code[:120]}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(node.ops):
                if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)):
                    continue
                left, right = operands[i], operands[i + 1]
                if isinstance(op, (ast.In, ast.NotIn)) and isinstance(left, ast.Constant) and not isinstance(
                        right, (ast.Tuple, ast.List, ast.Set)) and not MEMBERSHIP_OWNER.search(
                        ast.get_source_segment(source, right) or ""):
                    continue  # a key or substring looked up in a container (see the docstring)
                found = sorted({s for side in (left, right) for s in _strings(side) if s in names})
                if found:
                    hit(node, f"compares {', '.join(found)}")
                    break
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and node.args):
            found = sorted({s for s in _strings(node.args[0]) if s and any(
                n.startswith(s) if node.func.attr == "startswith" else n.endswith(s) for n in names)})
            if found:
                hit(node, f".{node.func.attr}() of a name's {'prefix' if node.func.attr == 'startswith' else 'suffix'} "
                          f"{', '.join(found)}")
        elif isinstance(node, ast.MatchValue):
            found = [s for s in _strings(node.value) if s in names]
            if found:
                hit(node, f"case {', '.join(found)}")
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            for table in (strategies, techniques):
                if len(keys & table) >= 2:
                    hit(node, f"a dict keyed by the names {', '.join(sorted(keys & table))}")
                    break
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in compared:
            strings = _strings(node)
            if len(strings) >= 2 and len(strings) == len(node.elts) and all(s in names for s in strings):
                hit(node, f"a literal list of the names {', '.join(strings)}")
    return sorted(set(hits), key=lambda h: (int(h.split(":")[0].split()[1]), h))


@pytest.mark.parametrize("path", _checked_files())
def test_no_strategy_or_technique_name_is_compared_outside_its_table(path):
    strategies, techniques = _tables()
    hits = name_comparisons((REPO / path).read_text(), strategies, techniques)
    assert not hits, (f"{path} branches on strategy/technique names; read their rows instead "
                      f"(distft.engines.kinds.engine_kind, distft.techniques.kinds.technique_kind):\n"
                      + "\n".join(f"  {path}: {h}" for h in hits))


def test_the_rule_catches_what_it_should_and_only_that():
    strategies, techniques = {"ddp", "zero3", "fsdp"}, {"full", "prompt", "lora"}
    caught = """
if cfg.parallel.strategy == "zero3": pass
if technique in ("prompt", "other"): pass
if "full" != name: pass
if strategy.startswith("zero"): pass
if kind.options == "fsdp": pass
if "fsdp" in cfg.parallel.name: pass
LADDER = ["ddp", "zero3"]
STAGES = {"ddp": 0, "zero3": 3}
match strategy:
    case "ddp": pass
"""
    assert [h.split(":")[0] for h in name_comparisons(caught, strategies, techniques)] == [
        f"line {n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 11)]
    free = """
if "prompt" in row: pass
row = {"prompt": text, "reference": answer}
message = f"use parallel=fsdp or technique=full"
overrides = ["parallel=zero3", "technique=lora"]
if name.startswith("paged"): pass
if mode == "fullest": pass
"""
    assert name_comparisons(free, strategies, techniques) == []


def test_the_tables_and_conf_agree_and_the_kinds_modules_import_no_torch():
    """Each table's rows are its conf/ group's options (a new one: a row and a YAML), and both
    modules import only the standard library (validation and the planner read them on login nodes)."""
    import yaml

    from distft.engines.kinds import ENGINES
    from distft.techniques.kinds import FAMILIES, TECHNIQUES

    assert all(kind.name == name and kind.family in FAMILIES for name, kind in TECHNIQUES.items())
    assert all(kind.strategy == strategy for strategy, kind in ENGINES.items())
    conf = REPO / "conf"
    assert {yaml.safe_load(p.read_text())["name"] for p in (conf / "technique").glob("*.yaml")} == set(TECHNIQUES)
    assert {yaml.safe_load(p.read_text())["strategy"] for p in (conf / "parallel").glob("*.yaml")} == set(ENGINES)
    for rel in ("distft/engines/kinds.py", "distft/techniques/kinds.py"):
        imported = set()
        for node in ast.walk(ast.parse((REPO / rel).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert imported <= {"__future__", "dataclasses", "typing", "collections"}, (rel, imported)
