"""The planner's figures as golden hashes: `plan --json` for every full-size committed layout (the seed on 32, 128 and
512 devices, the four 64-device presets, DeepSeek-V2-Lite on 16 and V3 on 2048), each hardware profile and each step
(train, prefill, decode), the ranked `--search` of 128 devices for the seed, and the seed audit.

Each case is the SHA-256 of the exact bytes `moe-jax plan --json` writes, so a refactor that keeps them keeps the
planner byte-identical. tests/test_plan.py recomputes every case and compares; when a change to the figures is meant,
rerun this script and say why in the commit.

    python scripts/plan_golden.py            # writes tests/fixtures/plan_golden.json
    python scripts/plan_golden.py --check    # lists the cases that differ, exit 1 if any
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax.layouts import committed_layouts, load_pair  # noqa: E402
from moe_jax.load import load_config  # noqa: E402
from moe_jax.plan.audit import claims, markdown  # noqa: E402
from moe_jax.plan.hardware import PROFILES, get_hardware  # noqa: E402
from moe_jax.plan.model import plan, serve_plan  # noqa: E402
from moe_jax.plan.search import search  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "fixtures", "plan_golden.json")
STEPS = ("train", "prefill", "decode")


def _digest(data) -> str:
    """The bytes `moe-jax plan --json` writes for `data`, hashed."""
    return hashlib.sha256((json.dumps(data, indent=1) + "\n").encode()).hexdigest()


def cases() -> dict[str, str]:
    out = {}
    for name in committed_layouts():
        if name.startswith("cpu8-"):
            continue
        cfg = load_pair(name)
        for hw_name in PROFILES:
            hw = get_hardware(hw_name)
            for step in STEPS:
                out[f"{name}/{hw_name}/{step}"] = _digest(
                    plan(cfg, hw) if step == "train" else serve_plan(cfg, hw, step)
                )
    seed = load_config(None, None, [], check=False)
    out["search/seed/128/seed"] = _digest(search(seed, 128, get_hardware("seed")))
    out["audit"] = hashlib.sha256(markdown(claims()).encode()).hexdigest()
    return out


def main(argv: list[str]) -> int:
    live = cases()
    if "--check" in argv:
        with open(GOLDEN) as f:
            golden = json.load(f)["cases"]
        differ = sorted(k for k in golden.keys() | live.keys() if golden.get(k) != live.get(k))
        for k in differ:
            print(f"differs: {k}")
        print(f"{len(live) - len(differ)} of {len(live)} cases equal")
        return 1 if differ else 0
    tmp = GOLDEN + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"made_by": "python scripts/plan_golden.py", "cases": live}, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, GOLDEN)
    print(f"wrote {len(live)} cases to {os.path.relpath(GOLDEN, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
