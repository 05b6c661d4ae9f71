"""What the result-writing scripts share: the header of a results file (JAX, the machine, the commit) and writing it
atomically (a file that is there is whole)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def header() -> dict[str, Any]:
    import jax

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"jax": jax.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "commit": commit.stdout.strip()}  # fmt: skip


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
