"""The compiler's side of the memory plan: the buffers XLA keeps alive at the peak of the step's temporaries, read
from its own buffer assignment.

Asked to (`xla_dump_to`), XLA writes for a compiled module the optimised HLO (every instruction with the jax op it
came from, `metadata={op_name=...}`), the live range of every HLO value over the module's schedule, and the buffer
assignment (which allocation, at which offset, holds each value). `peak_buffers` joins them: the temporaries alive at
the arena's peak, each with its bytes, shape, opcode, the instruction that made it and the jax op behind it (values
that share bytes, such as a while loop's carry and its body's parameter, counted once), and the step's arguments by
their paths. `plan.check.classify` names each with a part of `plan.model.memory`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from typing import Any

from moe_jax.hlo import Module, parse_module

_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_VALUE = re.compile(r"^ value: <\d+ ([\w.\-]+)(\{[\d,]*\})?(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (.*)$")
_ALLOC = re.compile(r"^allocation (\d+): size (\d+), (.*)$")


@dataclasses.dataclass(frozen=True)
class Buffer:
    name: str  # the HLO instruction defining the value, with its tuple index ("while.3{2}")
    nbytes: int
    shape: str
    opcode: str
    op_name: str  # the jax op it came from ("jit(step)/jvp()/shard_map/while"), or the argument's path
    allocation: str  # "argument", "temp", "output", "constant"
    operands: tuple[str, ...]


def compile_with_dump(lowered, options: dict | None = None):
    """Compile `lowered` (with XLA `options`) asking XLA for its buffer assignment; returns (compiled, the module's
    dump texts)."""
    with tempfile.TemporaryDirectory(prefix="moe_jax_buffers_") as dump_dir:
        compiled = lowered.compile({**(options or {}), "xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True})
        texts = {}
        for suffix, key in (("after_optimizations.txt", "hlo"), ("after_optimizations-live-range.txt", "live"),
                            ("after_optimizations-buffer-assignment.txt", "assignment")):  # fmt: skip
            hits = sorted(glob.glob(os.path.join(dump_dir, f"*{suffix}")))
            if not hits:
                raise RuntimeError(f"XLA wrote no *{suffix} under {dump_dir}")
            with open(hits[-1]) as f:
                texts[key] = f.read()
    return compiled, texts


def _instructions(module: Module) -> dict[str, dict[str, Any]]:
    """name -> {shape, opcode, op_name, operands} for every instruction of every computation."""
    out: dict[str, dict[str, Any]] = {}
    for instrs in module.computations.values():
        for ins in instrs:
            op = _OP_NAME.search(ins.rest)
            operands = tuple(re.findall(r"%([\w.\-]+)", ins.rest.partition(")")[0]))
            out[ins.name] = {"shape": ins.shape, "opcode": ins.opcode, "op_name": op.group(1) if op else "",
                             "operands": operands}  # fmt: skip
    return out


def _assignment(text: str) -> dict[str, tuple[int, str, int, int]]:
    """value name{index} -> (allocation id, allocation kind, offset, size)."""
    out = {}
    alloc, kind = -1, ""
    for line in text.splitlines():
        a = _ALLOC.match(line)
        if a:
            alloc, desc = int(a.group(1)), a.group(3)
            kind = ("argument" if desc.startswith("parameter") else "temp" if "preallocated-temp" in desc else
                    "constant" if "constant" in desc else "thread-local" if "thread-local" in desc else "output")  # fmt: skip
            continue
        v = _VALUE.match(line)
        if v:
            key = v.group(1) + (v.group(2) or "{}")
            out[key] = (alloc, kind, int(v.group(4)), int(v.group(3)))
    return out


_RANGE = re.compile(r"^\s+([\w.\-]+)(\{[\d,]*\}):(\d+)-(\d+)$")


def peak_buffers(texts: dict[str, str]) -> dict[str, Any]:
    """The temporary arena at its peak: {"peak_index", "buffers": [Buffer] alive then, each once, "live_bytes",
    "arguments": [Buffer] (the step's inputs, which XLA counts whole whatever they hold later)}.

    XLA's memory analysis counts every argument buffer for the whole step and adds the temporary arena, whose size
    is the peak of the temporaries alive at once (plus what its packing loses). So the peak that matters is the
    temporaries' own: found here by sweeping the live ranges of the values the buffer assignment put in the arena.
    """
    module = parse_module(texts["hlo"])
    instrs = _instructions(module)
    where = _assignment(texts["assignment"])
    ranges = {}
    for line in texts["live"].splitlines():
        m = _RANGE.match(line)
        if m:
            ranges[m.group(1) + m.group(2)] = (int(m.group(3)), int(m.group(4)))
    temps = [(k, ranges[k], v[2], v[3]) for k, v in where.items() if v[1] == "temp" and k in ranges]
    best, best_t, best_set = -1, 0, []
    for t in sorted({r[0] for _, r, _, _ in temps}):
        alive = [(k, off, size) for k, (a, b), off, size in temps if a <= t <= b]
        total = _union_bytes([(off, size) for _, off, size in alive])
        if total > best:
            best, best_t, best_set = total, t, alive
    buffers = []
    kept: list[tuple[int, int]] = []
    for key, off, size in sorted(best_set, key=lambda x: -x[2]):
        if any(o <= off and off + size <= o + s for o, s in kept):
            continue  # the same bytes as a value already counted (an in-place update, a bitcast)
        kept.append((off, size))
        buffers.append(_buffer(key, size, "temp", instrs))
    names = {int(ins.rest.partition(")")[0]): _unescape(op.group(1)) if (op := _OP_NAME.search(ins.rest)) else ""
             for ins in module.computations[module.entry] if ins.opcode == "parameter"}  # fmt: skip
    arguments = [Buffer(f"parameter {n}", size, shape, "parameter", names.get(n, ""), "argument", ())
                 for n, size, shape in _argument_allocations(texts["assignment"])]  # fmt: skip
    return {"peak_index": best_t, "buffers": buffers, "live_bytes": best, "arguments": arguments}


def _argument_allocations(text: str) -> list[tuple[int, int, str]]:
    """(parameter number, bytes, shape) of every allocation holding an argument of the step."""
    out = []
    for line in text.splitlines():
        a = _ALLOC.match(line)
        if a:
            m = re.match(r"parameter (\d+), shape \|([^|]*)\|", a.group(3))
            if m:
                out.append((int(m.group(1)), int(a.group(2)), m.group(2)))
    return out


def _union_bytes(spans: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for off, size in sorted(spans):
        if off + size <= end:
            continue
        total += off + size - max(off, end)
        end = off + size
    return total


def _buffer(key: str, nbytes: int, allocation: str, instrs: dict[str, dict[str, Any]]) -> Buffer:
    name, _, index = key.partition("{")
    index = "{" + index
    ins = instrs.get(name, {"shape": "", "opcode": "", "op_name": "", "operands": ()})
    shape = ins["shape"]
    if index != "{}" and shape.startswith("("):
        shape = _tuple_element(shape, int(index.strip("{}").split(",")[0]))
    return Buffer(name + (index if index != "{}" else ""), nbytes, shape, ins["opcode"], _unescape(ins["op_name"]),
                  allocation, ins["operands"])  # fmt: skip


def _tuple_element(shape: str, i: int) -> str:
    inner = shape[1:-1]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch in "[({"
        depth -= ch in "])}"
        cur += ch
    parts.append(cur.strip())
    parts = [p.split("*/")[-1].strip() for p in parts]
    return parts[i] if i < len(parts) else shape


def _unescape(s: str) -> str:
    return s.replace("\\'", "'").replace('\\"', '"')
