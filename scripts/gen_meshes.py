"""Regenerates meshes/<layout>.json, the committed device assignment of every layout (tests/test_mesh.py compares)."""

import json

from moe_jax.layouts import golden_layouts, golden_path, load_pair
from moe_jax.mesh import assignment

for name in golden_layouts():
    table = assignment(load_pair(name))
    with open(golden_path(name), "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"wrote {golden_path(name)}: {table['layout']['devices']} devices")
