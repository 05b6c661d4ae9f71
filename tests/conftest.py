"""Every test process gets 8 fake CPU devices, set before anything touches JAX. The full-size checks on 32, 128 and
512 devices run in one subprocess per device count (test_full_size.py, `run_script_with_devices`).

XLA:CPU compiles with LLVM's optimisation level 0 here (inherited by every subprocess): the suite's time is mostly
compilation of programs that then run once on tiny shapes. It leaves the HLO, its buffer assignment and so every
memory figure and collective unchanged (measured: the compiled seed-128 train step's text is identical, byte for
byte; test_plan.py checks the same on a pipelined tiny layout) and halves compile times; results agree within the
written tolerances. Benchmarks and users keep the default.

XLA:CPU's Eigen thread pool is off too (`--xla_cpu_multi_thread_eigen=false`): the suite runs two workers on two
cores, and each worker's intra-op threads spinning against the other's cost more than they gave (test_parallel.py
under `-n 2`: 100 s -> 86 s). The 8 fake devices still run in parallel; only one op's inner loops stay on one thread."""

import os
import subprocess
import sys

os.environ["XLA_FLAGS"] = " ".join(
    filter(
        None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0", "--xla_cpu_multi_thread_eigen=false"]
    )
)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script_with_devices(n: int, *argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs `python ARGV` (a script of tests/ and its arguments) in a fresh process with n fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n))
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} with {n} devices failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cli(capsys):
    """cli(*args): `moe-jax ARGS` run in this test process (its 8 fake devices; compiled programs shared with the
    other tests here), returned like subprocess.run's result. Commands that need another device count, or that join
    a multi-process job, use `run_cli`; tests/test_cli.py runs the README's commands as real processes."""
    from moe_jax import cli as moe_jax_cli

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = moe_jax_cli.main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["moe-jax", *args], code, out.out, out.err)

    return run


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
