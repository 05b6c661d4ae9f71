"""Hardware profiles. Each states its compute, memory and one bandwidth per link kind (within a host, across hosts).

Figures are per device, dense (no sparsity). Where a source gives none, the profile says what is assumed.
"""

from __future__ import annotations

import dataclasses

from moe_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # FLOP/s at the training dtype (fp16 / bf16), dense
    mfu: float  # the share of peak the planner assumes matmuls reach
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    hbm_efficiency: float
    intra_host_bandwidth: float  # bytes/s per device, one direction, inside a host (NVLink / ICI)
    inter_host_bandwidth: float  # bytes/s per device, one direction, across hosts (InfiniBand / DCN)
    devices_per_host: int
    notes: str


PROFILES: dict[str, Hardware] = {
    "seed": Hardware(
        "seed",
        400e12,
        0.60,
        64e9,
        1.8e12,
        0.80,
        300e9,
        50e9,
        8,
        "the seed's card: 400 TFLOP/s at 60% MFU, 1.8 TB/s at 80%, 64 GB. The seed states no interconnect: assumed "
        "300 GB/s per device inside a host of 8 (NVLink class) and 50 GB/s across hosts (400 Gb/s InfiniBand per device)",
    ),
    "h100": Hardware(
        "h100",
        989e12,
        0.50,
        80e9,
        3.35e12,
        0.80,
        450e9,
        50e9,
        8,
        "H100 SXM: 989 TFLOP/s bf16 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 4 450 GB/s per direction, "
        "400 Gb/s InfiniBand per GPU; 50% MFU assumed",
    ),
    "h200": Hardware(
        "h200",
        989e12,
        0.50,
        141e9,
        4.8e12,
        0.80,
        450e9,
        50e9,
        8,
        "H200 SXM: 989 TFLOP/s bf16 dense, 141 GB HBM3e at 4.8 TB/s, NVLink 4 450 GB/s per direction, "
        "400 Gb/s InfiniBand per GPU; 50% MFU assumed",
    ),
    "h800": Hardware(
        "h800",
        989e12,
        0.50,
        80e9,
        3.35e12,
        0.80,
        160e9,
        50e9,
        8,
        "H800 SXM (DeepSeek-V3's cluster): 989 TFLOP/s bf16 dense, 80 GB HBM3 at 3.35 TB/s; links as the DeepSeek-V3 "
        "report measures them: NVLink about 160 GB/s per GPU inside a node of 8, InfiniBand 50 GB/s per GPU across "
        "nodes; 50% MFU assumed",
    ),
    "tpu-v5p": Hardware(
        "tpu-v5p",
        459e12,
        0.50,
        95.74 * 2**30,
        2.76e12,
        0.80,
        270e9,
        25e9,
        4,
        "TPU v5p: 459 TFLOP/s bf16, 95 GB HBM at 2.76 TB/s (95.74 GiB of it allowed per chip by the TPU compiler, "
        "libtpu 0.0.42.1: the fit is against that, docs/tpu.md); ICI taken as 270 GB/s per chip for a collective "
        "inside the slice (host of 4 chips here), DCN 25 GB/s per chip across slices; 50% MFU assumed",
    ),
}


def get_hardware(name: str) -> Hardware:
    if name not in PROFILES:
        raise ConfigError(f"--hardware={name!r}: unknown hardware; valid: {', '.join(PROFILES)}")
    return PROFILES[name]
