"""The code's shape, as docs/architecture.md states it: the import graph of moe_jax/ in layers, no cycle, no upward
import, no function-local import of a moe_jax module (but cli's of the commands, `LAZY`); the table names every
module and nothing else; no function in parallel/, serve/ or train/ over 80 lines; cli.py and commands.py each under
450 lines. Static: nothing here imports the package."""

import ast
import os
import re

import pytest
from conftest import ROOT

PACKAGE = os.path.join(ROOT, "moe_jax")
MAX_FUNCTION_LINES = 80  # in parallel/, serve/ and train/
MAX_CLI_LINES = 450
# The one function-local import of the package, on purpose: cli.main imports the commands (JAX and the whole package,
# 2 s) only once the arguments are read, so `--help` and a mistyped option answer at once.
LAZY = {("cli", "commands")}


def modules() -> dict[str, str]:
    """Dotted name relative to moe_jax ('parallel.step', 'hf' for hf/__init__.py, '' for the package) -> path."""
    out = {}
    for d, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                out[name.removesuffix("__init__").rstrip(".")] = path
    return out


def layer_table(text: str) -> list[list[str]]:
    """docs/architecture.md's table: per layer, its entries ('config', 'model/') in the order listed."""
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M)
    assert [int(n) for n, _ in rows] == list(range(len(rows))), "layers numbered 0, 1, 2, ... in order"
    return [re.findall(r"`([\w/]+)`", entries) for _, entries in rows]


def rank_of(table: list[list[str]], mods) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """module -> (layer, position in its layer); and the problems: a module no entry covers, one covered twice, an
    entry that covers nothing."""
    rank, problems = {}, []
    for layer, entries in enumerate(table):
        for pos, entry in enumerate(entries):
            pkg = entry.rstrip("/")
            covered = [m for m in mods if (m == pkg or m.startswith(pkg + ".")) if entry.endswith("/") or m == pkg]
            if not covered:
                problems.append(f"docs/architecture.md names {entry}, which is not in moe_jax/")
            for m in covered:
                if m in rank:
                    problems.append(f"{m} is in two entries")
                rank[m] = (layer, pos)
    problems += [
        f"moe_jax/{m or '__init__'} is in no layer of docs/architecture.md" for m in mods if m and m not in rank
    ]
    return rank, problems


def imports(mods: dict[str, str]) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported moe_jax module, line, at the top of the file)]."""

    def resolve(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    out = {}
    for m, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        top = {id(n) for n in tree.body}
        found = []
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moe_jax":
                base = node.module.removeprefix("moe_jax").lstrip(".")
                targets = [resolve(f"{base}.{a.name}".lstrip(".")) or resolve(base) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name.removeprefix("moe_jax").lstrip(".")) for a in node.names
                           if a.name.split(".")[0] == "moe_jax"]  # fmt: skip
            found += [(t, node.lineno, id(node) in top) for t in targets if t is not None and t != m]
        out[m] = found
    return out


def violations(graph: dict[str, list[tuple[str, int, bool]]], rank: dict[str, tuple[int, int]],
               paths: dict[str, str]) -> list[str]:  # fmt: skip
    """Upward imports (to a higher layer, or to a module listed after this one in its own layer, outside its
    package), function-local imports of moe_jax modules, and cycles."""
    out = []
    for m, edges in sorted(graph.items()):
        where = os.path.relpath(paths[m], ROOT)
        for t, line, at_top in edges:
            if not at_top and (m, t) not in LAZY:
                out.append(f"{where}:{line} imports {t} inside a function (imports of moe_jax go at the top)")
            if m not in rank or t not in rank:
                continue
            same_package = m.split(".")[0] == t.split(".")[0]
            if rank[t][0] > rank[m][0] or (rank[t][0] == rank[m][0] and rank[t][1] > rank[m][1] and not same_package):
                out.append(
                    f"{where}:{line} imports {t}, which is above it (layer {rank[t][0]}, not {rank[m][0]} or lower)"
                )
    out += [f"import cycle among {', '.join(c)}" for c in cycles({m: [t for t, _, _ in e] for m, e in graph.items()})]
    return out


def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def code():
    mods = modules()
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        table = layer_table(f.read())
    rank, problems = rank_of(table, mods)
    return mods, rank, problems, imports(mods)


def test_architecture_md_names_every_module_and_nothing_else(code):
    mods, rank, problems, _ = code
    assert not problems, problems
    assert len(rank) == len(mods) - 1  # every module but moe_jax/__init__.py, which imports nothing of the package


def test_imports_go_down_the_layers_without_cycles(code):
    mods, rank, _, graph = code
    found = violations(graph, rank, mods)
    assert not found, "\n".join(found)


def test_the_check_fails_on_a_cycle_an_upward_import_and_a_local_import(code):
    """The same check on the real graph with one edge added: model.layers importing parallel.step (upward, and a
    cycle through parallel.step's imports of the model), and config importing sharding inside a function."""
    mods, rank, _, graph = code
    broken = {m: list(e) for m, e in graph.items()}
    broken["model.layers"].append(("parallel.step", 1, True))
    broken["config"].append(("sharding", 2, False))
    found = violations(broken, rank, mods)
    assert any(f.startswith("moe_jax/model/layers.py:1 imports parallel.step, which is above it") for f in found), found
    assert any(f.startswith("import cycle among") and "model.layers" in f and "parallel.step" in f for f in found), (
        found
    )
    assert any(f.startswith("moe_jax/config.py:2 imports sharding inside a function") for f in found), found


def test_functions_in_parallel_serve_train_are_at_most_80_lines_and_cli_under_450(code):
    mods, _, _, _ = code
    long = []
    for m, path in mods.items():
        if m.split(".")[0] not in ("parallel", "serve", "train"):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"moe_jax/{m.replace('.', '/')}.py:{node.lineno} {node.name}: {n} lines")
    assert not long, long
    for m in ("cli", "commands"):  # the shell of `moe-jax`: its entry point and its commands
        with open(mods[m]) as f:
            assert len(f.read().splitlines()) < MAX_CLI_LINES, m
