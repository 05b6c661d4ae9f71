"""Every test process gets 8 fake CPU devices, set before anything touches JAX. Tests that need 128 or 512 devices
run in a subprocess (`run_with_devices`)."""

import os
import subprocess
import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(n: int, code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs Python `code` in a fresh process with n fake CPU devices; raises with its output if it fails."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess with {n} devices failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `moe-jax ARGS` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "moe_jax.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def assert_tree_close(got, want, rtol: float, what: str = "") -> float:
    """|got - want| <= rtol * (|want| + max|want|) leaf by leaf (the max term keeps near-zero elements from failing on
    rounding noise, see jax-notes.md). Returns the largest relative error, normalised by each leaf's max."""
    import jax
    import numpy as np

    worst = 0.0
    flat_g = jax.tree_util.tree_leaves_with_path(got)
    flat_w = jax.tree.leaves(want)
    assert len(flat_g) == len(flat_w), f"{what}: {len(flat_g)} leaves vs {len(flat_w)}"
    for (path, g), w in zip(flat_g, flat_w, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, f"{what}{jax.tree_util.keystr(path)}: shape {g.shape} vs {w.shape}"
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        err = np.abs(g - w)
        ok = err <= rtol * (np.abs(w) + scale)
        rel = float(np.max(err) / scale) if scale > 0 and w.size else float(np.max(err, initial=0.0))
        worst = max(worst, rel)
        assert ok.all(), f"{what}{jax.tree_util.keystr(path)}: max error {np.max(err):.3e}, rel {rel:.3e} > {rtol}"
    return worst
