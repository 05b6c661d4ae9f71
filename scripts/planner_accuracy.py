"""The planner against the compiler on a grid of the seed's model (moe_jax/plan/accuracy.py): each point's train step
compiled on fake CPU devices, its memory at the peak read part by part from XLA's buffer assignment, its FLOPs from
the program's dots and its collective bytes from the HLO, beside the plan.

    python scripts/planner_accuracy.py                      # the whole grid -> docs/planner-accuracy.md and
                                                            # docs/results/planner_accuracy.json
    python scripts/planner_accuracy.py --match "seed-512"   # the points whose id contains this (printed only)

One worker process per fake device count (JAX fixes the count when it starts), run side by side (--workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from results import write_json  # noqa: E402  (first: it records the files the run opens)


def worker(devices: int, ids: list[str]) -> None:
    """Compile and compare each point of `ids` on `devices` fake devices; one JSON line per point."""
    from moe_jax.mesh import make_mesh
    from moe_jax.plan.accuracy import evaluate, grid, point_config

    for p in grid():
        if p["id"] not in ids:
            continue
        row = evaluate(p, make_mesh(point_config(p).layout))
        print(json.dumps({**row, "devices": devices}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", help="only the points whose id contains this; results printed, docs left alone")
    ap.add_argument("--workers", type=int, default=2, help="worker processes at once (default 2)")
    ap.add_argument("--tolerance", type=float, default=5.0, help="percent (default 5)")
    ap.add_argument("--out-md", default=os.path.join(ROOT, "docs", "planner-accuracy.md"))
    ap.add_argument("--out-json", default=os.path.join(ROOT, "docs", "results", "planner_accuracy.json"))
    ap.add_argument(
        "--recompare",
        action="store_true",
        help="compare the compiled figures of --out-json again with the planner as it is now (no compile)",
    )
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.ids))
        return 0

    from moe_jax.plan.accuracy import grid, point_config

    if args.recompare:
        return recompare(args)
    points = [p for p in grid() if args.match is None or args.match in p["id"]]
    if not points:
        print(f"--match={args.match!r}: no point of the grid has it in its id", file=sys.stderr)
        return 2
    by_devices: dict[int, list[str]] = {}
    for p in points:
        by_devices.setdefault(point_config(p).layout.devices, []).append(p["id"])
    # Split each device count's points into chunks so that --workers processes stay busy.
    jobs = []
    for n, ids in sorted(by_devices.items()):
        k = max(1, min(args.workers, len(ids)))
        jobs += [(n, ids[i::k]) for i in range(k)]
    t0 = time.time()
    rows: list[dict] = []
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, threading.Thread]] = []

    def read(proc: subprocess.Popen) -> None:  # each point as its worker finishes it
        for line in proc.stdout:
            row = json.loads(line)
            rows.append(row)
            print(f"{row['point']['id']:52s} memory {row['memory']['error']:+6.1%}  FLOPs {row['flops']['error']:+6.2%}"
                  f"  {'ok' if row['ok'] else 'MISS'}  ({row['seconds']:.0f} s)", flush=True)  # fmt: skip

    while pending or running:
        while pending and len(running) < args.workers:
            n, ids = pending.pop(0)
            env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(n), JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip())  # fmt: skip
            cmd = [sys.executable, __file__, "--worker", str(n), "--ids", json.dumps(ids)]
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            reader = threading.Thread(target=read, args=(proc,))
            reader.start()
            running.append((proc, reader))
        for proc, reader in list(running):
            if proc.poll() is None:
                continue
            reader.join()
            running.remove((proc, reader))
            if proc.returncode:
                for other, _ in running:
                    other.kill()
                print(f"a worker failed (status {proc.returncode})", file=sys.stderr)
                return 1
        time.sleep(0.5)
    wall = time.time() - t0
    order = {p["id"]: i for i, p in enumerate(points)}
    rows.sort(key=lambda r: order[r["point"]["id"]])
    ok = sum(r["ok"] for r in rows)
    print(f"{ok} of {len(rows)} points within {args.tolerance:g}% ({wall / 60:.1f} min)")
    if args.match is not None:
        return 0
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    write(args, rows, wall / 60, machine, args.workers, compiled_now=True)
    return 0 if ok == len(rows) else 1


def recompare(args) -> int:
    from moe_jax.plan.accuracy import point_config
    from moe_jax.plan.check import compare, compiled_from_row

    with open(args.out_json) as f:
        saved = json.load(f)
    rows = []
    for old in saved["rows"]:
        cfg = point_config(old["point"])
        new = compare(cfg, compiled_from_row(old), args.tolerance / 100, backend="cpu")
        rows.append({**old, **new})
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} points within {args.tolerance:g}% (compiled figures of "
          f"{os.path.relpath(args.out_json, ROOT)}, planner as it is now)")  # fmt: skip
    write(args, rows, saved["minutes"], saved["machine"], saved["workers"])
    return 0


def write(args, rows: list[dict], minutes: float, machine: str, workers: int, compiled_now: bool = False) -> None:
    """The table and the JSON. A run that compiled the points records the sources it ran (scripts/results.py); a
    --recompare, whose compiled figures are an earlier run's, records none, so the file reads as needing a real run."""
    from moe_jax.plan.accuracy import markdown

    header = (
        "# The planner against the compiler\n\n"
        "Generated by `python scripts/planner_accuracy.py` (the grid is moe_jax/plan/accuracy.py; how each part is "
        "computed: docs/planner.md). Each point's train step (AdamW and loss scaling included) is compiled on fake "
        "XLA:CPU devices, nothing allocated; memory is XLA's per-device argument + output + temporaries - aliased, "
        "read part by part from its buffer assignment at the temporaries' peak; FLOPs are the dots of the program with "
        "every loop counted; collective bytes per kind come from the HLO. The plan uses the CPU compiler's dtype sizes "
        "(bf16 intermediates are kept in fp32 by XLA:CPU; `moe-jax plan` for an accelerator counts 2 bytes).\n\n"
        f"Tolerance {args.tolerance:g}% (memory parts as a share of the compiled total, the total, the FLOPs); "
        f"collective bytes must be equal. {len(rows)} points compiled in {minutes:.1f} min with {workers} workers on "
        f"{machine} (-O0 code generation; the HLO and the buffer assignment do not depend on it)."
    )
    with open(args.out_md, "w") as f:
        f.write(markdown(rows, header))
    out = {"machine": machine, "minutes": minutes, "workers": workers, "tolerance": args.tolerance / 100, "rows": rows}
    if compiled_now:
        write_json(args.out_json, out, "python scripts/planner_accuracy.py")
    else:
        with open(args.out_json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    print(f"wrote {os.path.relpath(args.out_md, ROOT)} and {os.path.relpath(args.out_json, ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
