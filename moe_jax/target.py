"""What a step is compiled for: XLA:CPU's fake devices (the default), or a TPU topology compiled by libtpu on this
machine, without a TPU (`jax.experimental.topologies`: compile-only devices that run nothing), as MaxText's
train_compile.py does.

A TPU target is written `v5p:4x4x8` (generation, then the chips along each torus axis: three for v4 and v5p, two for
v5e and v6e); `slices` > 1 is a multi-slice target (that many copies of the topology joined over the data-center
network). The generations' chips are listed in `TPU_CHIPS` with their HBM and sources.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax
from jax.experimental import topologies

from moe_jax.config import ConfigError

# XLA:CPU compiles a program over at most this many fake devices: beyond, even a trivial jit fails with
# "Multiprocess computations aren't implemented on the CPU backend" (checked with jax 0.10.2 at 4096 and 8192).
CPU_MAX_DEVICES = 2048


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # JAX's device_kind
    dims: int  # torus axes of its topology names
    hbm_bytes: int  # what the TPU compiler allows one device: the figure it fails against
    devices_per_chip: int  # v4's compile-only topologies have a device per TensorCore
    nominal: str  # the chip's HBM as Google Cloud's system architecture pages state it


_GIB = 2**30
# `hbm_bytes`: the "available HBM" of the TPU compiler's out-of-memory message (libtpu 0.0.42.1), per device; read by
# compiling a program too large for each generation (the reading is in docs/tpu.md).
TPU_CHIPS = {
    "v4": Chip("TPU v4", 3, int(15.25 * _GIB), 2, "32 GiB HBM2 per chip, 2 TensorCores (cloud.google.com/tpu/docs/v4)"),
    "v5e": Chip("TPU v5 lite", 2, int(15.75 * _GIB), 1, "16 GiB HBM2 per chip (cloud.google.com/tpu/docs/v5e)"),
    "v5p": Chip("TPU v5", 3, int(95.74 * _GIB), 1, "95 GB HBM2e per chip (cloud.google.com/tpu/docs/v5p)"),
    "v6e": Chip("TPU v6 lite", 2, int(31.25 * _GIB), 1, "32 GiB HBM per chip (cloud.google.com/tpu/docs/v6e)"),
}
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)$")
VALID = "cpu, or a TPU topology: v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB (e.g. v5p:4x4x8)"


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU topology (`generation:AxBxC`, `slices` copies of it). The CPU target is None, not a Target."""

    generation: str
    shape: tuple[int, ...]
    slices: int = 1

    @property
    def name(self) -> str:
        topo = f"{self.generation}:{'x'.join(map(str, self.shape))}"
        return topo if self.slices == 1 else f"{topo} x {self.slices} slices"

    @property
    def chip(self) -> Chip:
        return TPU_CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.slices

    @property
    def devices(self) -> int:
        """JAX devices: one per chip, except v4's compile-only topologies, which give one per TensorCore."""
        return self.chips * self.chip.devices_per_chip

    def describe(self) -> dict:
        return {"target": self.name, "generation": self.generation, "topology": list(self.shape),
                "slices": self.slices, "chips": self.chips, "devices": self.devices,
                "hbm_bytes_per_device": self.chip.hbm_bytes, "hbm_nominal": self.chip.nominal}  # fmt: skip


def compiler_options(platform: str) -> dict[str, object]:
    """What a compile for `platform` asks of XLA. A TPU compile that does not fit the chip's HBM stops with
    RESOURCE_EXHAUSTED and no figures; `xla_tpu_no_crash_on_oom` lets it finish, so the memory it would need is read
    and set against `Chip.hbm_bytes` (nothing changes for a program that fits)."""
    return {"xla_tpu_no_crash_on_oom": True} if platform == "tpu" else {}


def parse_target(text: str | None, slices: int = 1) -> Target | None:
    """`--target`'s value -> a Target, or None for XLA:CPU (`cpu` or nothing). Checks the spelling only."""
    if slices < 1:
        raise ConfigError(f"--slices={slices}: must be a positive integer")
    if text in (None, "", "cpu"):
        if slices != 1:
            raise ConfigError(f"--slices={slices}: only with a TPU --target ({VALID})")
        return None
    m = _NAME.match(text.strip().lower())
    if not m:
        raise ConfigError(f"--target={text!r}: valid: {VALID}")
    gen, shape = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
    if len(shape) != TPU_CHIPS[gen].dims:
        want = "x".join("ABC"[: TPU_CHIPS[gen].dims])
        raise ConfigError(f"--target={text!r}: a {gen} topology has {TPU_CHIPS[gen].dims} axes ({gen}:{want})")
    if min(shape) < 1:
        raise ConfigError(f"--target={text!r}: every axis needs at least one chip")
    return Target(gen, shape, slices)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def target_devices(target: Target) -> list:
    """The compile-only devices of a TPU topology (libtpu, on this machine: nothing runs on them)."""
    if not libtpu_installed():
        raise ConfigError(
            f"--target={target.name}: needs libtpu, the TPU compiler: pip install -e '.[tpu]' (jax[tpu] at the "
            "pinned jax version)"
        )
    # libtpu looks for the TPU VM it runs on and prints warnings when it finds none; it only compiles here. JAX's own
    # backend stays XLA:CPU (nothing is run), so no TPU that this machine may have is opened either.
    try:
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # JAX has started already: its backends are whatever they are
        pass
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip is opened, so no lock is needed
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{target.generation}-{target.devices}")
    topology = "x".join(map(str, target.shape))
    kwargs = {"num_slices": target.slices} if target.slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{target.generation}:{topology}", **kwargs)
    except Exception as e:  # libtpu's own message, on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--target={target.name}: libtpu refuses this topology: {first}") from None
    return list(desc.devices)


def check_cpu_devices(n: int) -> None:
    """XLA:CPU's limit, before JAX makes the devices."""
    if n > CPU_MAX_DEVICES:
        raise ConfigError(
            f"--devices={n}: XLA:CPU compiles for at most {CPU_MAX_DEVICES} fake devices; compile for a TPU topology "
            f"instead: --target v5p:AxBxC (or v6e:AxB, ...) with the layout's device count in chips"
        )
