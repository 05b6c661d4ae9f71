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
