"""HLO text -> every collective with its kind, the mesh axes its replica groups span, bytes per device and how many
times it runs per step (while-loop trip counts included); then the audit against the set a layout should produce.

Two texts are read: the lowered HLO (before XLA's optimisations: exact dtypes, one instruction per collective the
code names) and the compiled HLO (the final program: collectives after XLA merged and scheduled them; on CPU its
fp16/bf16 show as f32). Counts per step come from each text's own loops.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from itertools import combinations
from typing import Any

import numpy as np

from moe_jax.collectives import aggregate, expected_collectives
from moe_jax.sharding import MESH_AXES

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\)\s*->.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    rest: str  # operands and attributes


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instr]]
    entry: str


def parse_module(text: str) -> Module:
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(3)
        if body.startswith("("):  # tuple shape: up to the matching parenthesis
            depth, end = 0, len(body) - 1
            for end, ch in enumerate(body):  # noqa: B007 (end is read after the loop)
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    break
            shape, tail = body[: end + 1], body[end + 1 :].lstrip()
        else:
            shape, _, tail = body.partition(" ")
        opcode, _, rest = tail.partition("(")
        comps[current].append(Instr(m.group(2), shape, opcode.strip(), rest))
    return Module(comps, entry)


def array_dims(shape: str) -> tuple[str, tuple[int, ...]]:
    """An array shape's dtype and dimensions ("f32[4,1024]{1,0}" -> ("f32", (4, 1024))); ("", ()) for a tuple."""
    m = None if shape.startswith("(") else _ARRAY.search(shape)
    return (m.group(1), tuple(int(x) for x in m.group(2).split(",") if x)) if m else ("", ())


def shape_bytes(shape: str) -> int:
    return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _ARRAY.findall(shape))


def _trip_count(module: Module, instr: Instr) -> int:
    m = re.search(r'known_trip_count"?\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', instr.rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", instr.rest)
    if cond and cond.group(1) in module.computations:
        # A scan's condition: compare(counter, constant(N)), direction=LT
        consts = {}
        for ins in module.computations[cond.group(1)]:
            c = re.match(r"([\-\d]+)\)", ins.rest) if ins.opcode == "constant" else None
            if c:
                consts[ins.name] = int(c.group(1))
        for ins in module.computations[cond.group(1)]:
            if ins.opcode == "compare" and "direction=LT" in ins.rest:
                for name, value in consts.items():
                    if re.search(rf"%?{re.escape(name)}\b", ins.rest):
                        return value
    raise ValueError(f"cannot read the trip count of {instr.name}")


def execution_counts(module: Module) -> dict[str, int]:
    """How many times each computation runs per call of the entry: while bodies multiply by their trip counts."""
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for comp, instrs in module.computations.items():
        for ins in instrs:
            if ins.opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", ins.rest).group(1)
                edges[comp].append((body, _trip_count(module, ins)))
            else:
                for callee in re.findall(
                    r"(?:to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)", ins.rest
                ):
                    edges[comp].append((callee, 1))
                for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.rest):
                    for callee in re.findall(r"%?([\w.\-]+)", group):
                        edges[comp].append((callee, 1))
    counts: dict[str, int] = defaultdict(int)

    def visit(comp: str, times: int, depth: int = 0) -> None:
        counts[comp] += times
        for callee, mult in edges.get(comp, ()):
            if callee in module.computations and depth < 64:
                visit(callee, times * mult, depth + 1)

    visit(module.entry, 1)
    return counts


# ----------------------------------------------------------------------------------------------------- groups


def _iota_groups(text: str) -> list[list[int]] | None:
    """[G,S]<=[dims]T(perm) -> explicit groups."""
    m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        return None
    g, s = int(m.group(1)), int(m.group(2))
    dims = [int(x) for x in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
        ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return ids.reshape(g, s).tolist()


def _mesh_groups(axes_text: str, between: str, selected_text: str) -> list[list[int]]:
    """mesh['axis_0'=4,'axis_1'=16,...] [device_ids=([dims]T(perm))] {'axis_1'}: devices laid out on that mesh (iota,
    or the given permutation of it); a group varies over the selected axes with the others fixed."""
    axes = [(n, int(s)) for n, s in re.findall(r"'([^']+)'\s*=\s*(\d+)", axes_text)]
    sizes = [s for _, s in axes]
    ids = np.arange(math.prod(sizes))
    d = re.search(r"device_ids=\(?\[([\d,]+)\](?:T\(([\d,]+)\))?", between)
    if d:
        ids = ids.reshape([int(x) for x in d.group(1).split(",")])
        if d.group(2):
            ids = ids.transpose([int(x) for x in d.group(2).split(",")])
    ids = ids.reshape(sizes)
    chosen = [i for i, (n, _) in enumerate(axes) if f"'{n}'" in selected_text]
    rest = [i for i in range(len(axes)) if i not in chosen]
    return ids.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen)).tolist()


def replica_groups(rest: str, n_devices: int) -> list[list[int]]:
    """Every spelling: explicit {{0,1},{2,3}}; the compact iota [G,S]<=[dims]T(perm); the mesh form
    mesh['axis_0'=4,...] {'axis_2'}; {} (all devices); and source_target_pairs for collective-permute."""
    m = re.search(r"replica_groups=(\{\{[\d,{}\s]*\}\}|\{\})", rest)
    if m:
        if m.group(1) == "{}":
            return [list(range(n_devices))]
        return [
            [int(x) for x in grp.split(",") if x.strip()] for grp in re.findall(r"\{([\d,\s]*)\}", m.group(1)[1:-1])
        ]
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", rest)
    if m:
        return _iota_groups(m.group(1))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](.*?)\{([^}]*)\}", rest)
    if m:
        return _mesh_groups(m.group(1), m.group(2), m.group(3))
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", rest)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    raise ValueError(f"no replica groups in: {rest[:200]}")


def group_axes(groups: list[list[int]], mesh_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The mesh axes whose coordinate varies inside the groups (device ids are positions in the mesh, row-major)."""
    varying: set[str] = set()
    for grp in groups:
        coords = np.array([np.unravel_index(i, mesh_shape) for i in grp])
        for k, axis in enumerate(MESH_AXES):
            if len(set(coords[:, k])) > 1:
                varying.add(axis)
    return tuple(a for a in MESH_AXES if a in varying)


@dataclasses.dataclass
class Collective:
    kind: str
    axes: tuple[str, ...]
    bytes_per_device: int  # what one device puts into the collective (its operand)
    count_per_step: int
    groups: list[list[int]]
    computation: str
    name: str
    shape: str


def collectives(text: str, mesh_shape: tuple[int, ...]) -> list[Collective]:
    module = parse_module(text)
    counts = execution_counts(module)
    n = math.prod(mesh_shape)
    out = []
    for comp, instrs in module.computations.items():
        for ins in instrs:
            kind = ins.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or ins.opcode.endswith("-done"):
                continue
            groups = replica_groups(ins.rest, n)
            size = len(groups[0])
            result = shape_bytes(ins.shape.split("{")[0] if not ins.shape.startswith("(") else ins.shape)
            if ins.opcode.endswith("-start") and ins.shape.startswith("("):
                result //= 2  # async start returns (operand, result)
            operand = {"all-gather": result // size, "reduce-scatter": result * size}.get(kind, result)
            out.append(
                Collective(
                    kind,
                    group_axes(groups, mesh_shape),
                    operand,
                    counts.get(comp, 0),
                    groups,
                    comp,
                    ins.name,
                    ins.shape,
                )
            )
    return out


def summarize(colls: list[Collective]) -> list[dict[str, Any]]:
    """One row per (kind, axes, bytes per device): how many run per step."""
    rows: dict[tuple, int] = defaultdict(int)
    for c in colls:
        rows[(c.kind, c.axes, c.bytes_per_device)] += c.count_per_step
    return [
        {"kind": k, "axes": list(a), "bytes_per_device": b, "count_per_step": n}
        for (k, a, b), n in sorted(rows.items(), key=lambda r: (r[0][0], r[0][1], -r[0][2]))
    ]


def totals(colls: list[Collective]) -> dict[tuple[str, tuple[str, ...]], dict[str, int]]:
    """Per (kind, axes): collectives run per step and bytes per device per step."""
    out: dict[tuple[str, tuple[str, ...]], dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for c in colls:
        out[(c.kind, c.axes)]["count"] += c.count_per_step
        out[(c.kind, c.axes)]["bytes"] += c.count_per_step * c.bytes_per_device
    return dict(out)


# ------------------------------------------------------------------------------------------------------ the audit


def assignment_groups(table: dict[str, Any]) -> set[frozenset[int]]:
    """Every group the assignment defines: for each set of mesh axes, the devices that agree on all other
    coordinates (the table's tp, ep, pp, dp and gradient groups are among them), as positions in the mesh (what
    the HLO's replica groups name: on a TPU topology the mesh follows the torus, so positions are not device ids)."""
    out: set[frozenset[int]] = set()
    for n in range(1, len(MESH_AXES) + 1):
        for axes in combinations(MESH_AXES, n):
            buckets: dict[tuple, set[int]] = defaultdict(set)
            for d in table["devices"]:
                buckets[tuple(d["coords"][a] for a in MESH_AXES if a not in axes)].add(d["position"])
            out |= {frozenset(b) for b in buckets.values()}
    return out


# What the TPU compiler rewrites into an all-reduce over the same devices (seen with libtpu 0.0.42.1): a
# reduce-scatter (an all-reduce, then each device's slice), an all-gather (an all-reduce of a zero-padded buffer,
# as u32); it also combines neighbours of a kind. So on a TPU an all-reduce may run over the axes of an expected
# reduce-scatter or all-gather, and these three kinds are not counted in the compiled text; the lowered text (the
# program as the code names it) is checked exactly as on CPU.
_REWRITTEN_ON_TPU = frozenset({"all-gather", "all-reduce", "reduce-scatter"})


def audit(lowered_text: str, compiled_text: str, cfg, table: dict[str, Any], step: str = "grad",
          platform: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Compares a step's collectives with `expected_collectives(cfg)`.

    Lowered HLO: every (kind, axes, bytes per device) with its count per step must equal the expected list exactly.
    Compiled HLO: every collective's (kind, axes) must be expected, all-gathers, reduce-scatters and all-to-alls must
    run as often as expected (XLA may merge all-reduces, so those are checked on the lowered text), no replica group
    may be a single device, and every replica group must be a group of the assignment table. `platform` 'tpu' (a
    TPU target): an all-reduce may stand for an all-gather or a reduce-scatter in the compiled text, those three are
    not counted there (`_REWRITTEN_ON_TPU`), and the other kinds run between once and the expected count
    (identical ones merged).
    """
    shape = cfg.layout.shape
    tpu = platform == "tpu"
    low, comp = collectives(lowered_text, shape), collectives(compiled_text, shape)
    expected_rows = expected_collectives(cfg, step, platform=platform)
    expected = aggregate(expected_collectives(cfg, step, lowered=True, platform=platform))
    found = aggregate(summarize(low))
    unexpected: list[dict[str, Any]] = []
    for key in sorted(set(found) | set(expected)):
        if found.get(key, 0) != expected.get(key, 0):
            kind, axes, nbytes = key
            unexpected.append(
                {"kind": kind, "axes": list(axes), "bytes_per_device": nbytes, "found": found.get(key, 0),
                 "expected": expected.get(key, 0), "where": "lowered"}
            )  # fmt: skip

    allowed = {(k, a) for k, a, _ in expected}  # the same kinds and axes either way
    if tpu:
        allowed |= {("all-reduce", a) for k, a in allowed if k in ("all-gather", "reduce-scatter")}
    known_groups = assignment_groups(table)
    # Stage-to-stage pairs along each pp group of the assignment: a chain, closed into a ring when circular.
    ring = cfg.layout.repeats > 1
    at = {d["id"]: d["position"] for d in table["devices"]}
    forward_pairs = {
        (at[g[s]], at[g[(s + 1) % len(g)]])
        for g in table["groups"]["pp"]
        for s in range(len(g) if ring else len(g) - 1)
    }
    backward_pairs = {(b, a) for a, b in forward_pairs}
    counts: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)
    for c in comp:
        counts[(c.kind, c.axes)] += c.count_per_step
        why = None
        if any(len(g) < 2 for g in c.groups):
            why = "a replica group of a single device"
        elif (c.kind, c.axes) not in allowed:
            why = "not in the expected set"
        elif c.kind == "collective-permute":
            if {tuple(p) for p in c.groups} not in (forward_pairs, backward_pairs):
                why = "source-target pairs that are not the pp chain or ring of the assignment"
        elif any(frozenset(g) not in known_groups for g in c.groups):
            why = "a replica group that is no group of the assignment"
        if why:
            unexpected.append({"kind": c.kind, "axes": list(c.axes), "name": c.name, "shape": c.shape,
                               "count_per_step": c.count_per_step, "why": why, "where": "compiled"})  # fmt: skip
    want_counts: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)
    for (k, a, _), n in aggregate(expected_rows).items():
        want_counts[(k, a)] += n
    for key, n in sorted(want_counts.items()):
        got = counts.get(key, 0)
        if tpu:  # the TPU compiler may also merge identical ones (the ragged exchange's offsets, fwd and bwd)
            if key[0] not in _REWRITTEN_ON_TPU and not 0 < got <= n:
                unexpected.append({"kind": key[0], "axes": list(key[1]), "found": got, "expected": n,
                                   "why": "count per step not in 1..expected", "where": "compiled"})  # fmt: skip
        elif key[0] != "all-reduce" and got != n:
            unexpected.append({"kind": key[0], "axes": list(key[1]), "found": got, "expected": n,
                               "why": "count per step differs", "where": "compiled"})  # fmt: skip
    return {
        "collectives": summarize(low),
        "compiled_collectives": summarize(comp),
        "expected": expected_rows,
        "unexpected": unexpected,
        "ok": not unexpected,
    }


def while_trip_counts(text: str) -> list[int]:
    """The trip count of every while loop in an HLO text (scans become while loops)."""
    module = parse_module(text)
    return [
        _trip_count(module, ins) for instrs in module.computations.values() for ins in instrs if ins.opcode == "while"
    ]


def dot_flops(text: str) -> float:
    """Matmul FLOPs of an HLO text with every loop counted its trip count times: 2 x |result| x |contracted| per dot.
    (XLA's cost_analysis counts a while body once.) Read from the lowered text, where dots are not yet fused."""
    module = parse_module(text)
    counts = execution_counts(module)
    total = 0.0
    for comp, instrs in module.computations.items():
        shapes = {ins.name: ins.shape for ins in instrs}
        for ins in instrs:
            if ins.opcode not in ("dot", "ragged-dot"):  # a grouped matmul: each row in one group
                continue
            lhs = re.match(r"\s*%?([\w.\-]+)", ins.rest).group(1)
            lhs_dims = array_dims(shapes[lhs])[1]
            contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
            k = math.prod(lhs_dims[int(i)] for i in contract.group(1).split(",") if i) if contract else 1
            out = math.prod(array_dims(ins.shape)[1])
            total += 2.0 * out * k * counts.get(comp, 0)
    return total
