"""Layouts -> JAX meshes (fake CPU devices or real ones) and the exact device assignment.

Mesh axes are ('pp', 'dp', 'ep', 'tp'), row-major with tp fastest: a tp group sits on neighbouring devices (one host),
then ep, then dp; pp is outermost and crosses hosts (Megatron-Core's tp-cp-ep-dp-pp order as a JAX mesh).

The assignment is computed here from mesh coordinates alone (`assignment`), and checked two independent ways: against
the shards JAX places for every parameter (`check_placement`) and, in the HLO audit, against the replica groups of the
compiled collectives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from moe_jax.config import Config, ConfigError, LayoutConfig, check_devices, padded_vocab, uneven_units
from moe_jax.distributed import initialize
from moe_jax.sharding import MESH_AXES, expert_axes, logical_to_mesh, rules_for
from moe_jax.target import Target, check_cpu_devices, target_devices

# ------------------------------------------------------------------------------------------------------- devices


def use_fake_devices(n: int) -> None:
    """Asks JAX for n fake CPU devices. Must run before JAX starts its backends (any JAX operation does that)."""
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        have = len(jax.devices())
        if have != n:
            raise ConfigError(
                f"--devices={n}: JAX has already started with {have} devices in this process; "
                f"ask for the count before the first JAX operation"
            ) from None


def setup_devices(
    cfg: Config,
    real: bool = False,
    devices: int | None = None,
    compile_only: bool = False,
    distributed: dict[str, Any] | None = None,
    target: Target | None = None,
):
    """The mesh of cfg's layout on the devices a command asked for: fake CPU devices (`devices` of them, default the
    layout's count), this machine's accelerators (`real`), every process's (`distributed`: the keyword arguments
    of `distributed.initialize`), or a TPU topology's compile-only devices (`target`, see target.py). `compile_only`
    (the program is compiled, never run, on fake devices) asks XLA:CPU for LLVM -O0 code: the HLO, memory and
    collectives are the same (tests/test_plan.py checks the compiled text on a pipelined tiny layout), and compiling
    takes about a third less time."""
    if target is not None:
        if real or distributed:
            raise ConfigError(f"--target={target.name}: compiles only; leave out --real and the distributed options")
        if devices is not None and devices != target.devices:
            raise ConfigError(f"--devices={devices}: --target={target.name} has {target.devices} devices")
        if cfg.layout.devices != target.devices:
            raise ConfigError(
                f"--target={target.name}: {target.devices} devices, but layout pp x dp x ep x tp = "
                f"{' x '.join(map(str, cfg.layout.shape))} = {cfg.layout.devices}; pick a topology of "
                f"{cfg.layout.devices} chips or a layout of {target.devices} devices"
            )
        return make_mesh(cfg.layout, target_devices(target))
    flags = os.environ.get("XLA_FLAGS", "")
    if compile_only and not real and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()  # read when JAX starts XLA
    if distributed:
        initialize(**distributed)
        return make_mesh(cfg.layout)
    if not real:
        if devices is not None:
            if devices < 1:
                raise ConfigError(f"--devices={devices}: must be a positive integer")
            check_devices(cfg.layout, devices)  # before JAX makes them: 100000 fake devices take minutes
        check_cpu_devices(devices if devices is not None else cfg.layout.devices)
        use_fake_devices(devices if devices is not None else cfg.layout.devices)
    return make_mesh(cfg.layout)


def make_mesh(layout: LayoutConfig, devices: Sequence[Any] | None = None, explicit: bool = True):
    """The (pp, dp, ep, tp) mesh of a layout.

    Fake CPU devices, or one process: devices in id order, row-major (mesh_utils's order for CPU; for GPU/TPU in one
    process, `create_device_mesh` may reorder to follow the physical topology). Several processes: a hybrid mesh whose
    in-host (ICI) part takes tp, then ep, then dp, then pp, and whose cross-host (DCN) part takes what is left.
    """
    devices = list(jax.devices() if devices is None else devices)
    check_devices(layout, len(devices))
    shape = layout.shape
    processes = sorted({d.process_index for d in devices})
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if devices[0].platform == "cpu":
        grid = _row_major(devices, shape)  # fake devices: process by process, ids in order
    elif len(slices) > 1:  # multi-slice TPU: tp, ep, dp, pp fill a slice (its torus), the rest crosses slices
        grid = _hybrid(devices, shape, len(devices) // len(slices), process_is_granule=False)
    elif len(processes) > 1:
        grid = _hybrid(devices, shape, len(devices) // len(processes), process_is_granule=True)
    else:
        grid = _physical(devices, shape)
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return Mesh(grid, MESH_AXES, axis_types=(kind,) * len(MESH_AXES))


def _physical(devices, shape):
    """One host or one TPU slice: `create_device_mesh`'s order, which follows the physical torus of a TPU (its
    rings along the fastest axes); where it finds none for this shape, it may split a physical axis; else row-major."""
    for split in (False, True):
        try:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
        except (ValueError, AssertionError, NotImplementedError):
            continue
    return _row_major(devices, shape)


def _hybrid(devices, shape, per_granule: int, process_is_granule: bool):
    """Several hosts or slices: the in-granule part (ICI) takes tp, then ep, dp, pp; the data-center network (DCN)
    part what is left; row-major where the axes do not tile a granule."""
    ici = _in_host_shape(shape, per_granule)
    if ici is None:
        return _row_major(devices, shape)
    dcn = tuple(a // i for a, i in zip(shape, ici, strict=True))
    try:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_is_granule)
    except (ValueError, AssertionError, NotImplementedError):
        return _row_major(devices, shape)


def _chip(device) -> dict[str, Any]:
    """A TPU device's place: its chip's coordinates on the torus, its core on the chip, its slice."""
    return {"coords": [int(c) for c in device.coords], "core": int(getattr(device, "core_on_chip", 0)),
            "slice": int(getattr(device, "slice_index", 0) or 0), "kind": device.device_kind}  # fmt: skip


def _row_major(devices, shape):
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return np.array(ordered, dtype=object).reshape(shape)


def _in_host_shape(shape: tuple[int, ...], per_host: int) -> tuple[int, ...] | None:
    """Fills a host from the fastest axis outward (tp, then ep, dp, pp); None if the axes do not tile a host."""
    ici = [1] * len(shape)
    left = per_host
    for i in reversed(range(len(shape))):
        take = math.gcd(shape[i], left)
        ici[i] = take
        left //= take
    return tuple(ici) if left == 1 else None


# ---------------------------------------------------------------------------------------------------- assignment


def stage_layers(layers: int, pp: int, repeats: int, stage: int, counts: Sequence[int] = ()) -> list[int]:
    """The unit ids (stack positions: one per layer when every layer is MoE) a stage holds: pp x v chunks of
    U / (pp v) units, chunk c on stage c mod pp; or, uneven (`counts`: units per stage, v = 1), stage s the next
    counts[s] units."""
    if counts:
        start = sum(counts[:stage])
        return list(range(start, start + counts[stage]))
    per_chunk = layers // (pp * repeats)
    return [c * per_chunk + j for c in range(stage, pp * repeats, pp) for j in range(per_chunk)]


def stage_model_layers(m, pp: int, repeats: int, stage: int, counts: Sequence[int] = ()) -> list[int]:
    """The global layer ids (0 .. model.layers - 1) a stage computes: the dense first layers on stage 0 (they are
    held by every stage, see docs/design-notes.md), then each unit's moe_every layers."""
    first = list(range(m.dense_layers)) if stage == 0 else []
    units = stage_layers(m.units, pp, repeats, stage, counts)
    return first + [m.dense_layers + u * m.moe_every + j for u in units for j in range(m.moe_every)]


def kv_heads_held(m, tp: int, rank: int) -> tuple[list[int], list[int], str]:
    """(K/V heads a tp rank holds, the ones it computes, how): split over tp when tp divides kv_heads; else whole on
    every rank, each computing the one head its query heads read."""
    kv = m.n_kv_heads
    if kv % tp == 0:
        held = list(range(rank * kv // tp, (rank + 1) * kv // tp))
        return held, held, "split over tp"
    group = m.heads // kv
    return list(range(kv)), [(rank * (m.heads // tp)) // group], "replicated over tp (each rank computes its own)"


def layer_storage_order(layers: int, pp: int, repeats: int, counts: Sequence[int] = ()) -> list[int]:
    """Global layer id at each position of the stacked layer axis: stage s's contiguous block is its chunks in order.

    With one repeat this is the identity; with v > 1 the stack is stored permuted so that a plain split of the
    'layers' axis over pp gives every stage its circular chunks. Uneven stages (`counts`): every stage's block is
    max(counts) long, its units first, then -1 for each padding position (a unit never applied).
    """
    width = max(counts) if counts else 0
    out = []
    for s in range(pp):
        ids = stage_layers(layers, pp, repeats, s, counts)
        out += ids + [-1] * (width - len(ids) if counts else 0)
    return out


def _ranges(ids: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 3], [5, 7]]: half-open runs."""
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def ranges_text(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    return ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in _ranges(ids))


def _groups(ids: np.ndarray, axes: Sequence[str]) -> list[list[int]]:
    """Device groups that vary along `axes` (others fixed), from the [pp, dp, ep, tp] array of device ids."""
    along = [MESH_AXES.index(a) for a in axes]
    rest = [i for i in range(len(MESH_AXES)) if i not in along]
    moved = np.transpose(ids, rest + along).reshape(-1, math.prod(ids.shape[i] for i in along))
    return [sorted(int(x) for x in row) for row in moved]


# Which axes each parameter kind's gradient is summed over (the axes it is replicated over that split its inputs).
GRAD_REDUCE_AXES: dict[str, tuple[str, ...]] = {
    "experts": ("dp",),  # expert weights: split over ep (experts) and tp; replicas differ only along dp
    "attention": ("dp", "ep"),  # q, k, v, o: split over tp (heads); the batch is split over (dp, ep)
    "replicated": ("dp", "ep", "tp"),  # norms and router inside the layers: tokens split over (dp, ep, tp)
    "embedding": ("pp", "dp", "ep", "tp"),  # embedding and head: replicated on every device, used on one stage
}


def assignment(cfg: Config, mesh=None) -> dict[str, Any]:
    """The exact device assignment of design.md section 2, as the JSON document `moe-jax mesh` writes.

    Without a mesh the devices are the planned ones (ids in row-major order, process 0, hosts of
    `layout.devices_per_host`); with one, ids, processes and hosts are read from the mesh's devices.
    """
    m, lay, run = cfg.model, cfg.layout, cfg.run
    shape = lay.shape
    n = lay.devices
    if mesh is not None:
        flat = list(mesh.devices.flat)
        ids = np.array([d.id for d in flat]).reshape(shape)
        procs = np.array([d.process_index for d in flat]).reshape(shape)
        multi = len(set(procs.flat)) > 1
        # TPU devices (real or a compile-only topology's): where each sits on the torus
        chips = [_chip(d) for d in flat] if hasattr(flat[0], "coords") else None
    else:
        ids = np.arange(n).reshape(shape)
        procs = np.zeros(shape, dtype=int)
        multi = False
        chips = None

    # Folded experts (layout.expert_tp=1): device (ep, tp) holds the ep * tp + tp-th block of E / (ep tp) whole experts.
    fold = lay.tp if lay.folded else 1
    e_local, h_local, f_local = m.experts // (lay.ep * fold), m.heads // lay.tp, m.expert_hidden * fold // lay.tp
    counts = uneven_units(cfg)
    shards = lay.dp * lay.ep
    rows_mb = run.batch // lay.microbatches
    rows_shard = rows_mb // shards
    s_local = run.seq_len // lay.tp
    # The vocabulary split (layout.vocab_split): V / tp (or V / (tp pp), rank (t, p) holding block t pp + p)
    # embedding rows and head columns of the padded vocabulary each; the last block's last ids are padding (never
    # looked up, masked out of the loss).
    v_stored = padded_vocab(cfg)
    v_local = v_stored // lay.vocab_shards
    over_pp = "pp" in lay.vocab_axes

    devices = []
    for pos in range(n):
        pp, dp, ep, tp = (int(c) for c in np.unravel_index(pos, shape))
        shard = dp * lay.ep + ep
        rows = [
            r
            for j in range(lay.microbatches)
            for r in range(j * rows_mb + shard * rows_shard, j * rows_mb + (shard + 1) * rows_shard)
        ]
        host = int(procs[pp, dp, ep, tp]) if multi else pos // lay.devices_per_host
        block = (tp * lay.pp + pp if over_pp else tp) if "tp" in lay.vocab_axes else (pp if over_pp else 0)
        kv_held, kv_used, kv_how = kv_heads_held(m, lay.tp, tp)
        devices.append(
            {
                "id": int(ids[pp, dp, ep, tp]),
                "position": pos,
                "process": int(procs[pp, dp, ep, tp]),
                "host": host,
                "coords": {"pp": pp, "dp": dp, "ep": ep, "tp": tp},
                "layers": stage_model_layers(m, lay.pp, lay.repeats, pp, counts),
                "units": stage_layers(m.units, lay.pp, lay.repeats, pp, counts),
                # uneven stages: the stage's stack is padded to the largest stage's with units never applied
                "padding_units": (max(counts) - counts[pp]) if counts else 0,
                "prologue_layers": list(range(m.dense_layers)),  # held by every stage, computed on stage 0
                "experts": list(range((ep * fold + tp % fold) * e_local, (ep * fold + tp % fold + 1) * e_local)),
                "heads": list(range(tp * h_local, (tp + 1) * h_local)),
                "kv_heads": kv_held,
                "kv_heads_computed": kv_used,
                "expert_hidden": [0, f_local] if lay.folded else [tp * f_local, (tp + 1) * f_local],
                "shared_hidden": [tp * m.shared_hidden // lay.tp, (tp + 1) * m.shared_hidden // lay.tp],
                "dense_hidden": [tp * m.dense_hidden // lay.tp, (tp + 1) * m.dense_hidden // lay.tp],
                "vocab": [block * v_local, (block + 1) * v_local],
                "vocab_padding": max(0, (block + 1) * v_local - max(m.vocab, block * v_local)),
                "batch_rows": _ranges(rows),
                "seq": [tp * s_local, (tp + 1) * s_local],
            }
        )
        if chips is not None:
            devices[-1]["chip"] = chips[pos]

    groups = {axis: _groups(ids, (axis,)) for axis in MESH_AXES}
    groups["grad_reduce"] = _groups(ids, GRAD_REDUCE_AXES["attention"])
    groups["expert_all_to_all"] = _groups(ids, expert_axes(lay))
    return {
        "layout": {
            "name": lay.name,
            "pp": lay.pp,
            "dp": lay.dp,
            "ep": lay.ep,
            "tp": lay.tp,
            "repeats": lay.repeats,
            "stage_layers": list(lay.stage_layers),
            "microbatches": lay.microbatches,
            "expert_tp": lay.expert_tp,
            "vocab_split": lay.vocab_split if lay.vocab_parallel else "none",
            "vocab_axes": list(lay.vocab_axes),
            "devices_per_host": lay.devices_per_host,
            "devices": n,
            "hosts": len({d["host"] for d in devices}),
        },
        "model": {
            "layers": m.layers,
            "dense_layers": m.dense_layers,
            "moe_every": m.moe_every,
            "units": m.units,
            "experts": m.experts,
            "heads": m.heads,
            "kv_heads": m.n_kv_heads,
            "kv_heads_placement": kv_heads_held(m, lay.tp, 0)[2],
            "expert_hidden": m.expert_hidden,
            "shared_hidden": m.shared_hidden,
            "dense_hidden": m.dense_hidden,
            "vocab": m.vocab,
            "vocab_stored": v_stored,
            "batch": run.batch,
            "seq_len": run.seq_len,
        },
        "rules": dict(rules_for(lay)),
        "devices": devices,
        "groups": groups,
        "grad_reduce_by_kind": {
            kind: {"axes": list(axes), "groups": _groups(ids, axes)} for kind, axes in GRAD_REDUCE_AXES.items()
        },
    }


# ------------------------------------------------------------------------------ the check against JAX's placement


# What each logical axis of a parameter must hold on a device, read from its assignment row (half-open ranges).
def _expected_range(name: str | None, row: dict[str, Any], size: int, storage: list[int], tp: int) -> list[int] | None:
    if name == "layers":
        if not set(row["units"]) <= set(storage):
            return None
        if -1 in storage:  # uneven stages: each stage's block is as wide as the largest stage, pads included
            block = [storage.index(u) for u in row["units"]]
            width = block[-1] - block[0] + 1 + row.get("padding_units", 0)
            return [block[0], block[0] + width] if block == list(range(block[0], block[-1] + 1)) else None
        held = sorted(storage.index(unit) for unit in row["units"])
        return [held[0], held[-1] + 1] if held == list(range(held[0], held[-1] + 1)) else None
    if name == "experts":
        return [row["experts"][0], row["experts"][-1] + 1]
    if name == "heads":
        return [row["heads"][0], row["heads"][-1] + 1]
    if name == "kv_heads":
        return [row["kv_heads"][0], row["kv_heads"][-1] + 1]
    if name == "expert_mlp":
        return row["expert_hidden"]
    if name == "vocab":
        return row["vocab"]
    if name == "mlp":  # the shared expert's or a dense layer's hidden dimension
        for key in ("shared_hidden", "dense_hidden"):
            lo, hi = row[key]
            if (hi - lo) * tp == size:
                return [lo, hi]
        return None
    return [0, size]


def check_placement(
    cfg: Config,
    mesh,
    param_names: dict[str, tuple[str, ...]],
    param_shapes: dict[str, tuple],
    table: dict[str, Any] | None = None,
) -> int:
    """For every parameter, the slice JAX places on each device (`devices_indices_map`) equals what the assignment
    says that device holds. Returns the number of (parameter, device) pairs checked; raises AssertionError naming the
    first parameter and device that disagree."""
    table = assignment(cfg, mesh) if table is None else table
    rows = {d["id"]: d for d in table["devices"]}
    storage = layer_storage_order(cfg.model.units, cfg.layout.pp, cfg.layout.repeats, uneven_units(cfg))
    sizes = dict(mesh.shape)
    checked = 0
    for path, names in param_names.items():
        shape = param_shapes[path]
        sharding = NamedSharding(mesh, logical_to_mesh(names, sizes, shape, rules_for(cfg.layout)))
        for device, index in sharding.devices_indices_map(shape).items():
            row = rows[device.id]
            for dim, (name, sl) in enumerate(zip(names, index, strict=True)):
                got = [sl.start or 0, shape[dim] if sl.stop is None else sl.stop]
                want = _expected_range(name, row, shape[dim], storage, cfg.layout.tp)
                if got != want:
                    raise AssertionError(
                        f"{path} dim {dim} ({name}) on device {device.id} {row['coords']}: JAX places {got}, "
                        f"the assignment says {want}"
                    )
            checked += 1
    return checked
