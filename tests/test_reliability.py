"""What pods do to a run, done to real processes here: SIGTERM mid-run (one process, and one of two), a non-finite
step in bf16 and fp32, a checkpoint damaged on disk. Each ends as the README says, and resuming gives the run that was
not interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT

from moe_jax.config import ConfigError
from moe_jax.load import load_config
from moe_jax.mesh import make_mesh
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.train.checkpoint import Checkpoints, read_meta
from moe_jax.train.data import SyntheticTask
from moe_jax.train.loop import Stopped, train
from moe_jax.train.step import init_train_state, make_optimizer

LAYOUT = "meshes/cpu8-ep8.yaml"
STEPS = 60  # about 25 ms a step (40 with two processes): the signal lands after step 2, seconds before the end
CLI = [sys.executable, "-m", "moe_jax.cli"]
TRAIN = ["train", "--config", "configs/tiny.yaml", "--layout", LAYOUT, "--steps", str(STEPS)]


def cfg_for(*extra):
    return load_config("configs/tiny.yaml", LAYOUT, [f"run.steps={STEPS}", *extra])


def run(cfg, steps, **kw):
    return train(cfg, make_mesh(cfg.layout), SyntheticTask(cfg.model.vocab, cfg.run.seq_len, cfg.run.seed), steps, **kw)


@pytest.fixture(scope="module")
def straight():
    """The run nobody interrupts: its losses and final parameters."""
    state, records = run(cfg_for(), STEPS)
    return [r["loss"] for r in records], state


def _metrics(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_for_steps(path, n, procs, timeout=300):
    deadline = time.time() + timeout  # a guard against a hang, not the check
    while time.time() < deadline and len(_metrics(path)) < n:
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.01)
    assert len(_metrics(path)) >= n, "the run never started"


def _params(directory):
    cfg = cfg_for()
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    return Checkpoints(directory).restore(sm, init_train_state(sm, make_optimizer(cfg.run), seed=3))


def test_sigterm_saves_at_the_step_boundary_and_resume_is_the_straight_run(tmp_path, straight):
    ck, m1, m2 = tmp_path / "ck", tmp_path / "m1.jsonl", tmp_path / "m2.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([*CLI, *TRAIN, "--checkpoint-dir", str(ck), "--checkpoint-every", "1000", "--metrics",
                             str(m1)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        _wait_for_steps(m1, 2, [proc])
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    first = _metrics(m1)
    k = first[-1]["step"]
    assert 2 <= k < STEPS, k
    assert f"stopped by SIGTERM after step {k}: checkpoint step {k} saved in {ck}; continue with --resume" in out
    assert Checkpoints(str(ck)).latest() == k
    from moe_jax import cli

    assert cli.main(["train", "--config", f"{ROOT}/configs/tiny.yaml", "--layout", f"{ROOT}/{LAYOUT}", "--steps", str(STEPS),
                     "--checkpoint-dir", str(ck), "--resume", "--metrics", str(m2)]) == 0  # fmt: skip
    second = _metrics(m2)
    losses, state = straight
    assert [r["step"] for r in first + second] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in first + second] == losses  # exactly
    final = _params(str(ck))
    assert final.step == STEPS
    for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(state.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sigint_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """Only process 1 is signalled (SIGINT); both stop after the same step (an all-gather of the flag at every boundary),
    both exit 0, and resuming with two processes (scripts/launch_local.sh) gives the uninterrupted two-process run
    exactly: its losses, and its final parameters and optimizer state."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ck, m1, m2, m3 = (tmp_path / n for n in ("ck", "m1.jsonl", "m2.jsonl", "m3.jsonl"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    common = [*CLI, *TRAIN, "--checkpoint-dir", str(ck), "--checkpoint-every", "1000", "--coordinator",
              f"127.0.0.1:{port}", "--num-processes", "2", "--local-devices", "4"]  # fmt: skip
    procs = [subprocess.Popen([*common, "--process-id", str(i), *(["--metrics", str(m1)] if i == 0 else [])],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]  # fmt: skip
    try:
        _wait_for_steps(m1, 2, procs)
        procs[1].send_signal(signal.SIGINT)  # Ctrl-C's signal (the one-process test sends SIGTERM)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    k = _metrics(m1)[-1]["step"]
    assert 2 <= k < STEPS
    assert f"stopped by a signal to another process after step {k}: checkpoint step {k} saved" in outs[0][0]
    assert f"stopped by SIGINT after step {k}: checkpoint step {k} saved" in outs[1][0]
    assert Checkpoints(str(ck)).latest() == k

    launch = os.path.join(ROOT, "scripts", "launch_local.sh")
    ck3 = tmp_path / "ck3"
    for args in (["--checkpoint-dir", str(ck), "--resume", "--metrics", str(m2)],
                 ["--checkpoint-dir", str(ck3), "--checkpoint-every", "1000", "--metrics", str(m3)]):  # fmt: skip
        proc = subprocess.run([launch, "2", "4", "--", *CLI, *TRAIN, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, whole = _metrics(m1) + _metrics(m2), _metrics(m3)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]  # exactly
    a, b = _params(str(ck)), _params(str(ck3))
    assert a.step == b.step == STEPS
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state)), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, dtype):
    cfg = cfg_for(f"run.dtype={dtype}", "run.steps=6")
    d = str(tmp_path / "ck")
    with pytest.raises(Stopped) as e:
        run(cfg, 6, checkpoint_dir=d, checkpoint_every=1, inject_overflow_at=3)  # the 4th step's gradients: inf
    message = str(e.value)
    assert e.value.status == 1 and "\n" not in message
    assert message.startswith("step 4: the gradients of blocks/attn/wk and 11 more are not finite: stopped "
                              f"(run.nonfinite=stop in {dtype}") and message.endswith(
        f"the last good checkpoint is step 3 in {d}, left as it was")  # fmt: skip
    assert [r["skipped"] for r in e.value.records] == [False, False, False, True]
    assert Checkpoints(d).latest() == 3
    good, _ = run(cfg, 3)  # the uninterrupted run's state at step 3: the checkpoint holds it exactly
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    restored = Checkpoints(d).restore(sm, init_train_state(sm, make_optimizer(cfg.run), seed=3))
    assert restored.step == 3
    for a, b in zip(jax.tree.leaves((restored.params, restored.opt_state)), jax.tree.leaves((good.params, good.opt_state)),
                    strict=True):  # fmt: skip
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_skipped_steps_go_on_until_max_skips_in_a_row(dtype):
    """run.nonfinite=skip (fp16 skips whatever it says: its loss scaling does) skips the step and goes on; run.max_skips
    skipped steps in a row stop the run."""
    _, records = run(cfg_for(f"run.dtype={dtype}", "run.steps=6", "run.nonfinite=skip"), 6, inject_overflow_at=3)
    assert [r["skipped"] for r in records] == [False, False, False, True, False, False]
    assert records[3]["nonfinite_grads"][0] == "blocks/attn/wk"
    with pytest.raises(Stopped, match=r"^step 4: .*stopped \(1 steps in a row skipped, run.max_skips=1\); no "
                                      r"checkpoint was written \(no --checkpoint-dir\)$"):  # fmt: skip
        run(cfg_for(f"run.dtype={dtype}", "run.steps=6", "run.nonfinite=skip", "run.max_skips=1"), 6,
            inject_overflow_at=3)  # fmt: skip


def test_a_diverging_run_through_the_cli_exits_1_naming_the_step(tmp_path, capsys):
    """lr 1e30 in fp32: the loss or gradients leave the finite numbers within a few steps (before, the run skipped
    every step after and exited 0)."""
    from moe_jax import cli

    ck = tmp_path / "ck"
    rc = cli.main(["train", "--config", f"{ROOT}/configs/tiny.yaml", "--layout", f"{ROOT}/meshes/cpu8-ep8.yaml",
                   "--steps", "8", "run.dtype=fp32", "run.lr=1e30", "--checkpoint-dir", str(ck),
                   "--checkpoint-every", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    step = int(err.split("error: step ")[1].split(":")[0])
    assert f"the last good checkpoint is step {step - 1} in {ck}, left as it was" in err, err
    assert Checkpoints(str(ck)).latest() == step - 1


def test_a_damaged_checkpoint_is_named_and_resume_takes_the_one_before(tmp_path):
    cfg = cfg_for("run.steps=6")
    d = tmp_path / "ck"
    _, records = run(cfg, 6, checkpoint_dir=str(d), checkpoint_every=3)
    files = [p for p in (d / "6").rglob("*") if p.is_file() and p.name != "moe_jax_manifest.json"]
    biggest = max(files, key=lambda p: p.stat().st_size)
    size = biggest.stat().st_size
    with open(biggest, "r+b") as f:
        f.truncate(size // 2)
    rel = biggest.relative_to(d / "6")
    assert Checkpoints(str(d)).latest() == 3
    assert read_meta(str(d))["step"] == 3
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    with pytest.raises(ConfigError) as e:
        Checkpoints(str(d)).restore(sm, init_train_state(sm, make_optimizer(cfg.run)), step=6)
    assert str(e.value) == f"checkpoint {d} step 6 is damaged: {rel} is {size // 2:,} bytes, {size:,} were written"
    reader = Checkpoints(str(d))  # a reader (generate, export-hf) takes step 3 and leaves step 6 as it is
    assert reader.restore(sm, init_train_state(sm, make_optimizer(cfg.run))).step == 3
    assert reader.fallbacks == [f"checkpoint step 6 in {d} is damaged ({rel} is {size // 2:,} bytes, {size:,} were "
                                "written): passed over"] and (d / "6").is_dir()  # fmt: skip
    notes = []
    _, resumed = run(cfg, 6, checkpoint_dir=str(d), resume=True, on_note=notes.append)
    assert notes == [f"checkpoint step 6 in {d} is damaged ({rel} is {size // 2:,} bytes, {size:,} were written): "
                     "passed over, kept as 6.damaged"]  # fmt: skip
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records[3:]]
    assert Checkpoints(str(d)).latest() == 6 and (d / "6.damaged" / rel).stat().st_size == size // 2


def test_resume_on_other_data_is_refused_in_one_line(tmp_path):
    cfg = cfg_for("run.steps=4")
    d = str(tmp_path / "ck")
    run(cfg, 2, checkpoint_dir=d, checkpoint_every=2)
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.arange(500) % 97)
    from moe_jax.train.data import TokenFile

    with pytest.raises(ConfigError, match=r"^--resume: the data here is .*t.npy \(500 tokens\), but the checkpoint in "
                                          r".* was trained on the synthetic task \(seed 0\); pass "
                                          r"--allow-config-change to resume on the new data$"):  # fmt: skip
        train(cfg, make_mesh(cfg.layout), TokenFile(str(tokens), 97, 12), 4, checkpoint_dir=d, resume=True)
