"""Several processes joined by jax.distributed on this machine (scripts/launch_local.sh): the same losses as one
process, checkpoints that cross process counts, the assignment's processes, a killed peer, and bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli

from moe_jax.load import load_config
from moe_jax.mesh import make_mesh
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.data import SyntheticTask
from moe_jax.train.loop import train
from moe_jax.train.step import init_train_state, make_optimizer

LAUNCH = os.path.join(ROOT, "scripts", "launch_local.sh")
TRAIN = ["moe-jax", "train", "--config", "configs/tiny.yaml", "--layout", "meshes/cpu8-pp2-ep2-tp2.yaml"]
CLI = [sys.executable, "-m", "moe_jax.cli"]


def launch(nproc, per, *args, timeout=300, logs=None):
    env = dict(os.environ, LOG_DIR=str(logs)) if logs else None
    return subprocess.run([LAUNCH, str(nproc), str(per), "--", *CLI, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_two_processes_equal_one_and_their_checkpoint_restores_in_one(tmp_path):
    m2, ck = tmp_path / "m2.jsonl", tmp_path / "ck"
    proc = launch(2, 4, *TRAIN[1:], "--steps", "5", "--metrics", str(m2), "--checkpoint-dir", str(ck),
                  "--checkpoint-every", "5", logs=tmp_path / "logs")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    two = [json.loads(x)["loss"] for x in m2.read_text().splitlines()]

    cfg = load_config("configs/tiny.yaml", "meshes/cpu8-pp2-ep2-tp2.yaml")
    state, records = train(cfg, make_mesh(cfg.layout), SyntheticTask(97, 12), 5)
    one = [r["loss"] for r in records]
    assert len(two) == 5
    np.testing.assert_allclose(two, one, rtol=1e-6)  # gloo and in-process sums may differ in the last bit

    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    restored = Checkpoints(str(ck)).restore(sm, init_train_state(sm, make_optimizer(cfg.run), seed=7))
    assert restored.step == 5
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_assignment_lists_where_jax_placed_each_device(tmp_path):
    out, logs = tmp_path / "a.json", tmp_path / "logs"
    proc = launch(2, 4, "mesh", "--config", "configs/tiny.yaml", "--layout", "meshes/cpu8-pp2-ep2-tp2.yaml",
                  "--json", str(out), logs=logs)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines() + (logs / "process-1.log").read_text().splitlines()
    placed = {}
    for line in lines:
        if line.startswith("process ") and " holds devices " in line:
            p = int(line.split()[1])
            for i in json.loads(line.split(" holds devices ")[1]):
                placed[i] = p
    table = json.loads(out.read_text())
    assert len(placed) == 8 and {d["id"]: d["process"] for d in table["devices"]} == placed
    assert {d["host"] for d in table["devices"]} == {0, 1}  # hosts are the real processes
    assert "placement check: 12 parameters x 8 devices" in proc.stdout


def test_a_killed_peer_ends_the_run_with_a_message(tmp_path):
    """The survivor of a SIGKILLed peer ends by itself, non-zero, saying why (the distributed runtime's heartbeat,
    10 s here, notices the lost peer). The wait is bounded only as a guard against a hang; its time is not the
    check."""
    port = free_port()
    metrics = tmp_path / "m.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    common = [*CLI, *TRAIN[1:], "--steps", "500", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
              "--local-devices", "4", "--heartbeat-timeout", "10"]  # fmt: skip
    p0 = subprocess.Popen([*common, "--process-id", "0", "--metrics", str(metrics)], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    p1 = subprocess.Popen([*common, "--process-id", "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            assert p0.poll() is None, p0.communicate()[1][-3000:]
            time.sleep(0.2)
        assert metrics.exists(), "the run never started"
        p1.send_signal(signal.SIGKILL)
        try:
            err = p0.communicate(timeout=300)[1]
        except subprocess.TimeoutExpired:
            pytest.fail("the survivor is still running 300 s after its peer was killed (heartbeat timeout 10 s)")
    finally:
        for p in (p0, p1):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p0.returncode not in (0, None)
    assert "another task died" in err or "lost contact with the other processes" in err, err[-3000:]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--coordinator", "127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1", "--init-timeout", "5"],
         "--coordinator=127.0.0.1:{port}: could not join the job within 5 s"),
        (["--coordinator", "127.0.0.1:{port}", "--num-processes", "2", "--process-id", "2"],
         "--process-id=2: valid 0..1 for --num-processes=2"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
         "--coordinator='localhost': expected HOST:PORT"),
    ],
)  # fmt: skip
def test_bad_distributed_input_is_one_line(extra, message):
    port = free_port()
    args = [*TRAIN[1:], "--steps", "1", "--local-devices", "4", *(x.format(port=port) for x in extra)]
    proc = run_cli(*args, timeout=300)  # a guard against a hang, not the check
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(port=port) in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]


def test_layout_for_another_device_count_is_one_line(tmp_path):
    proc = launch(2, 2, *TRAIN[1:], "--steps", "1", logs=tmp_path / "logs")
    assert proc.returncode != 0
    assert "devices=4: layout pp x dp x ep x tp = 2 x 1 x 2 x 2 = 8 devices" in proc.stderr
    assert "launch_local: process 0 exited with status 2" in proc.stderr
