"""The committed layouts of meshes/ and the config each is paired with; their assignment JSON is generated from here."""

from __future__ import annotations

import os

from moe_jax.config import Config
from moe_jax.load import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = os.path.join(ROOT, "meshes")
CONFIGS = os.path.join(ROOT, "configs")


def config_for(layout_name: str) -> str:
    """seed-* layouts carry the seed's model; <preset>-<devices> layouts the preset of configs/models/; cpu8-*
    layouts the tiny one."""
    if layout_name.startswith("seed"):
        return os.path.join(CONFIGS, "seed.yaml")
    preset = layout_name.rsplit("-", 1)[0]
    if os.path.isfile(os.path.join(CONFIGS, "models", f"{preset}.yaml")):
        return os.path.join(CONFIGS, "models", f"{preset}.yaml")
    return os.path.join(CONFIGS, "tiny.yaml")


def committed_layouts() -> list[str]:
    return sorted(f[: -len(".yaml")] for f in os.listdir(MESHES) if f.endswith(".yaml"))


# A golden assignment JSON lists every device's rows, ranges and groups: 0.5 MB at 512 devices, 10.7 MB for
# DeepSeek-V3's 2048 (40 microbatches of row ranges each). Layouts above this size have none committed: `moe-jax mesh
# --json` writes it on demand, and scripts/compile_deepseek.py checks every shard JAX places against it.
GOLDEN_MAX_DEVICES = 512


def golden_layouts() -> list[str]:
    """The committed layouts whose assignment is committed as meshes/<name>.json."""
    return [n for n in committed_layouts() if load_pair(n).layout.devices <= GOLDEN_MAX_DEVICES]


def load_pair(name: str) -> Config:
    return load_config(config_for(name), os.path.join(MESHES, f"{name}.yaml"))


def golden_path(name: str) -> str:
    return os.path.join(MESHES, f"{name}.json")


# The demo's layout and where it leaves its trained model: `moe-jax generate` uses both when given no weights.
DEMO_LAYOUT = "cpu8-pp2-ep2-tp2"
DEMO_CHECKPOINT = os.path.join("out", "demo", "checkpoint")
