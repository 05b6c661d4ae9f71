"""The compiler's side of the memory plan: the buffers XLA keeps alive at the step's peak, read from its own buffer
assignment, and named with the planner's parts.

XLA writes three files per compiled module when asked (`xla_dump_to`): the optimised HLO (every instruction with the
jax source op it came from, `metadata={op_name=...}`), the live ranges of every HLO value over the module's schedule
with the list of values alive at the peak, and the buffer assignment (which allocation and offset holds each value).
`peak_buffers` joins them: each value alive at the peak, its bytes, the allocation holding it (an argument, the
temporary arena, a constant), the instruction that defined it and the jax op behind it. Values that share bytes (a
while loop's carry and its body's parameter, an in-place update and its operand) are counted once.

`classify` names each buffer with a part of `plan.model.memory`, by what made it: the step's arguments by their
path (params / opt_state / tokens), the rest by the jax op (the pipeline scan's stacked carries, the backward's
gradient accumulators, the optimizer's elementwise update) and shape. What no rule claims is reported as
"other": a difference between plan and compiler is then a named part.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from typing import Any

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
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


def compile_with_dump(lowered, dump_dir: str | None = None):
    """Compile `lowered` asking XLA for its buffer assignment; returns (compiled, the module's dump files)."""
    own = dump_dir is None
    dump_dir = dump_dir or tempfile.mkdtemp(prefix="moe_jax_buffers_")
    before = set(os.listdir(dump_dir)) if os.path.isdir(dump_dir) else set()
    compiled = lowered.compile({"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True,
                                "xla_dump_hlo_module_re": "jit_step|jit_value_and_grad|jit_serve"})  # fmt: skip
    files = _module_files(dump_dir, before)
    texts = {k: open(v).read() for k, v in files.items()}  # noqa: SIM115  (small files, read once)
    if own:
        import shutil

        shutil.rmtree(dump_dir, ignore_errors=True)
    return compiled, texts


def _module_files(dump_dir: str, before: set[str]) -> dict[str, str]:
    new = [f for f in os.listdir(dump_dir) if f not in before]
    found: dict[str, str] = {}
    for suffix, key in (("cpu_after_optimizations.txt", "hlo"), ("cpu_after_optimizations-live-range.txt", "live"),
                        ("cpu_after_optimizations-buffer-assignment.txt", "assignment")):  # fmt: skip
        hits = sorted(f for f in new if f.endswith(suffix)) or sorted(
            os.path.basename(p) for p in glob.glob(os.path.join(dump_dir, f"*{suffix}"))
        )
        if not hits:
            raise RuntimeError(f"XLA wrote no *{suffix} under {dump_dir}")
        found[key] = os.path.join(dump_dir, hits[-1])
    return found


def _instructions(hlo: str) -> dict[str, dict[str, Any]]:
    """name -> {shape, opcode, op_name, operands} for every instruction of every computation."""
    out: dict[str, dict[str, Any]] = {}
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        rest = line[m.end() :]
        shape, rest = _split_shape(rest)
        paren = rest.find("(")
        opcode = rest[:paren].strip() if paren >= 0 else rest.split()[0]
        args = _balanced(rest[paren:]) if paren >= 0 else ""
        operands = tuple(re.findall(r"%([\w.\-]+)", args))
        op = _OP_NAME.search(line)
        out[m.group(1)] = {"shape": shape, "opcode": opcode, "op_name": op.group(1) if op else "",
                           "operands": operands}  # fmt: skip
    return out


def _split_shape(s: str) -> tuple[str, str]:
    if s.startswith("("):
        body = _balanced(s)
        return body, s[len(body) :].lstrip()
    sp = s.find(" ")
    return s[:sp], s[sp + 1 :]


def _balanced(s: str) -> str:
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return s[: i + 1]
    return s


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
    instrs = _instructions(texts["hlo"])
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
    names = _entry_parameters(texts["hlo"])
    arguments = [Buffer(f"parameter {n}", size, shape, "parameter", names.get(n, ""), "argument", ())
                 for n, size, shape in _argument_allocations(texts["assignment"])]  # fmt: skip
    return {"peak_index": best_t, "buffers": buffers, "live_bytes": best, "arguments": arguments}


def _entry_parameters(hlo: str) -> dict[int, str]:
    """parameter number -> the argument's path (op_name metadata) in the entry computation."""
    entry = hlo[hlo.index("\nENTRY") :]
    out = {}
    for line in entry.splitlines()[1:]:
        if line.startswith("}"):
            break
        m = re.search(r" parameter\((\d+)\)", line)
        if m:
            op = _OP_NAME.search(line)
            out[int(m.group(1))] = _unescape(op.group(1)) if op else ""
    return out


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
