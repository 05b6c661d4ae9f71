"""Committed results that tests read in place of running them are fresh: each records the SHA-256 of every file of
this repository its run imported or opened (scripts/results.py), and none of those files has changed since. A stale
file fails here, naming itself and the command that remakes it; `python scripts/results.py` lists them all.

Why a failing test and not CI rerunning the stale scripts after the suite: the files are read by people too
(docs/families.md and its siblings are made by the same runs), so what is committed must be what the code does; a
failing test keeps it so at the cost of the rerun, and costs the suite nothing (hashing about 60 files)."""

import importlib.util
import json
import os
import shutil

import pytest
from conftest import ROOT

_spec = importlib.util.spec_from_file_location("results", os.path.join(ROOT, "scripts", "results.py"))
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)

# The results files a test reads instead of running what made them, and the test that reads each.
CHECKED = {
    "docs/results/families.json": "test_families.py: the 39 family cases against one device",
    "docs/results/pipeline_1f1b.json": "test_pipeline.py: the 20 1F1B cases against one device",
    "docs/results/layouts.json": "test_parallel.py: the vocabulary split, ZeRO-1 and folding cases",
    "docs/results/layouts_memory.json": "test_parallel.py: compiled memory against the planner",
    "docs/results/pipeline_memory.json": "test_pipeline.py: 1F1B's compiled memory against the planner",
    "docs/results/presets_64.json": "test_full_size.py: two presets' compiled figures against the planner",
    "docs/results/deepseek_v3_2048.json": "test_full_size.py: DeepSeek-V3 on 2048 devices against the planner",
    "docs/results/gpu_check_cpu_smoke.json": "test_plan.py: gpu_check.py's every part on CPU",
}


@pytest.mark.parametrize("path", sorted(CHECKED))
def test_committed_result_is_fresh(path):
    assert results.freshness_error(path) is None, results.freshness_error(path)


def test_a_one_line_change_to_the_step_makes_the_matrix_stale(tmp_path):
    """The check itself: in a copy of the files families.json was made from, a line added to
    moe_jax/parallel/step.py makes it stale, and the message names the file, what changed and the command."""
    path = "docs/results/families.json"
    with open(os.path.join(ROOT, path)) as f:
        record = json.load(f)["sources"]
    assert {"moe_jax/parallel/step.py", "moe_jax/verify/matrix.py", "scripts/verify_families.py"} <= set(
        record["files"]
    )
    assert {f"configs/tiny-{family}.yaml" for family in ("mixtral", "qwen3", "olmoe", "deepseek")} <= set(
        record["files"]
    ), "the configs the run opened"
    for rel in [path, *record["files"]]:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    assert results.freshness_error(path, str(tmp_path)) is None
    with open(tmp_path / "moe_jax/parallel/step.py", "a") as f:
        f.write("# one line\n")
    error = results.freshness_error(path, str(tmp_path))
    assert error == (
        "docs/results/families.json is stale: moe_jax/parallel/step.py changed since it was made; rerun "
        "`python scripts/verify_families.py` and commit the result"
    )
    os.remove(tmp_path / "configs/tiny-qwen3.yaml")
    assert "configs/tiny-qwen3.yaml (gone)" in results.freshness_error(path, str(tmp_path))


def test_every_checked_file_is_written_with_its_sources():
    """Each checked file's record names a script of scripts/ that writes through results.write_json, and records
    that script and the package modules it ran."""
    for path in CHECKED:
        with open(os.path.join(ROOT, path)) as f:
            record = json.load(f)["sources"]
        script = record["command"].split()[1]
        assert script.startswith("scripts/") and script in record["files"], (path, record["command"])
        assert "write_json" in open(os.path.join(ROOT, script)).read(), script
        assert any(f.startswith("moe_jax/") for f in record["files"]), path
