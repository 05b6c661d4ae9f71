"""Training on 8 fake devices: the synthetic task is learned; checkpoints resume exactly, reshard onto other layouts,
and survive a kill mid-save; fp16 overflow is skipped; runs are deterministic; bad input is one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, assert_tree_close

from moe_jax.config import ConfigError
from moe_jax.load import load_config
from moe_jax.mesh import make_mesh
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.data import SyntheticTask, TokenFile
from moe_jax.train.loop import train
from moe_jax.train.step import init_train_state, make_optimizer

FP32_RTOL = 1e-5  # resuming on another layout: only the reduction order differs


def cfg_for(layout: str, *extra):
    return load_config("configs/tiny.yaml", f"meshes/{layout}.yaml", list(extra))


def run(cfg, steps, **kw):
    src = SyntheticTask(cfg.model.vocab, cfg.run.seq_len, cfg.run.seed)
    return train(cfg, make_mesh(cfg.layout), src, steps, **kw)


def losses(records):
    return [r["loss"] for r in records]


def vocab_padding(tree, vocab: int) -> list[np.ndarray]:
    """The stored vocabulary's padding (rows of the embedding, columns of the head) of every leaf under them."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "key", None) for k in path]
        if "embed" in keys or "head" in keys:
            x = np.asarray(leaf)
            out.append(x[vocab:] if "embed" in keys else x[:, vocab:])
    return out


def test_resume_same_layout_is_exact_and_other_layouts_within_fp32(tmp_path):
    """Also: the same seed and layout give identical losses (the first three steps of the checkpointed run are the
    straight run's, exactly)."""
    cfg = cfg_for("cpu8-pp2-ep2-tp2", "run.steps=6")
    straight_state, straight = run(cfg, 6)
    d = str(tmp_path / "ck")
    state3, first = run(cfg, 3, checkpoint_dir=d, checkpoint_every=3)
    assert Checkpoints(d).latest() == 3
    shutil.copytree(d, tmp_path / "at3")

    # The restored parameters equal the saved ones exactly.
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    tx = make_optimizer(cfg.run)
    restored = Checkpoints(d).restore(sm, init_train_state(sm, tx, seed=1))
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state3.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert restored.step == 3

    _, second = run(cfg, 6, checkpoint_dir=d, checkpoint_every=3, resume=True)
    assert losses(first) + losses(second) == losses(straight)
    # The vocabulary of 97 split over tp 2 is stored as 98: the padding row of the embedding, the padding column of
    # the head and their AdamW moments stay exactly zero through training (no lookup, no probability, no gradient).
    padding = vocab_padding(straight_state.params, 97) + vocab_padding(straight_state.opt_state, 97)
    assert len(padding) == 2 + 4 and not any(np.any(p) for p in padding)

    # Onto other layouts (same microbatches, so the same router-loss definition): equal within fp32. The circular
    # one (v = 2) stores its layer stack permuted: it reads the global-order checkpoint into its order, and the
    # checkpoint it writes at step 6 is back in global order, which the contiguous layout restores. It runs
    # interleaved 1F1B, which computes the step's gradients by its own schedule: the optimizer, clipping and
    # checkpoints take them as GPipe's (GPipe's circular schedule is the same storage, tests/test_pipeline.py), with
    # its experts folded over (ep, tp) (layout.expert_tp=1: each whole on one device).
    # The ep8 one runs ZeRO-1 (its AdamW moments split over ep), from the ZeRO-0 checkpoint. Each one's own
    # checkpoint then restores onto the plain layout exactly, moments included.
    circular = ["layout.repeats=2", "layout.schedule=1f1b", "layout.expert_tp=1"]
    zero = ["layout.microbatches=2", "layout.zero=1"]
    finals, other_cfgs = {}, {}
    for layout, extra in (("cpu8-pp2-ep2-tp2", circular), ("cpu8-ep8", zero)):
        other = other_cfgs[layout] = cfg_for(layout, "run.steps=6", *extra)
        at3 = tmp_path / f"at3-{layout}-{'-'.join(extra)}"
        shutil.copytree(tmp_path / "at3", at3)
        finals[layout], resumed = run(other, 6, checkpoint_dir=str(at3), checkpoint_every=100, resume=True)
        np.testing.assert_allclose(losses(resumed), losses(straight)[3:], rtol=FP32_RTOL)
    from_circular = Checkpoints(str(tmp_path / f"at3-cpu8-pp2-ep2-tp2-{'-'.join(circular)}")).restore(
        sm, init_train_state(sm, tx, seed=1)
    )
    assert from_circular.step == 6
    # A layer in the wrong place would differ entirely; the same layers differ by the layouts' fp32 sums only.
    assert_tree_close(from_circular.params, straight_state.params, FP32_RTOL, "circular checkpoint, contiguous layout")
    from_zero = Checkpoints(str(tmp_path / f"at3-cpu8-ep8-{'-'.join(zero)}")).restore(
        sm, init_train_state(sm, tx, seed=1)
    )
    from moe_jax.compile import compile_report

    reports = {}
    for name, restored_state in (("cpu8-ep8", from_zero), ("cpu8-pp2-ep2-tp2", from_circular)):
        other_cfg = other_cfgs[name]
        other_mesh = make_mesh(other_cfg.layout)
        other_sm = ShardedModel.build(other_cfg, other_mesh)
        want = finals[name]
        for got, saved in ((restored_state.params, want.params), (restored_state.opt_state, want.opt_state)):
            got, saved = jax.tree.leaves(sm.to_global(got)), jax.tree.leaves(other_sm.to_global(saved))
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, saved, strict=True)), name
        # The train step that ran (compiled once: the report reuses it) is audited clean.
        reports[name], _, _ = compile_report(other_cfg, other_mesh, "train")
        assert reports[name]["audit_ok"], (name, reports[name]["unexpected"])
    kinds = {name: {(c["kind"], tuple(c["axes"])) for c in r["collectives"]} for name, r in reports.items()}
    # ZeRO-1: gradient sums of replicated weights are reduce-scatters over ep, the updated slices all-gathers over ep
    # (the matrix audits dp2-ep2-tp2's too: docs/layouts.md, checked by tests/test_parallel.py).
    assert {("reduce-scatter", ("ep",)), ("all-gather", ("ep",))} <= kinds["cpu8-ep8"]
    # Folded: the experts' all-to-all spans (ep, tp); none runs over ep alone.
    a2a = {axes for kind, axes in kinds["cpu8-pp2-ep2-tp2"] if kind == "all-to-all"}
    assert a2a == {("ep", "tp")}, a2a


def test_fp16_overflow_is_skipped_and_the_scale_lowered():
    cfg = cfg_for("cpu8-ep4-tp2", "run.dtype=fp16", "run.steps=5")
    _, records = run(cfg, 5, inject_overflow_at=2)
    skipped = [r["skipped"] for r in records]
    assert skipped == [False, False, True, False, False]
    scales = [r["loss_scale"] for r in records]
    assert scales[2] == scales[1] / 2 and scales[3] == scales[2]
    assert all(np.isfinite(r["loss"]) for r in records)


KILL_DURING_SAVE = textwrap.dedent(
    """
    import jax, sys
    jax.config.update("jax_num_cpu_devices", 8)
    from moe_jax.load import load_config
    from moe_jax.mesh import make_mesh
    from moe_jax.train.data import SyntheticTask
    from moe_jax.train.loop import train
    from moe_jax.parallel.sharded import ShardedModel
    from moe_jax.train.checkpoint import Checkpoints
    from moe_jax.train.step import init_train_state, make_optimizer
    cfg = load_config("configs/tiny.yaml", "meshes/cpu8-ep8.yaml", ["model.d_model=192", "model.head_dim=48"])
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    state = init_train_state(sm, make_optimizer(cfg.run))._replace(step=1)  # what is saved, not how it was trained
    ck = Checkpoints(sys.argv[1], every=1, keep=100)
    ck.save(sm, cfg, state)
    ck.finish()  # the save is asynchronous: wait for it (and its manifest)
    print("saved", flush=True)
    step = 1
    while True:  # keep saving until killed
        step += 1
        ck.save(sm, cfg, state._replace(step=step))
    """
)


def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path):
    d = tmp_path / "ck"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(d)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "saved", proc.stderr.read()
        deadline = time.time() + 120
        while time.time() < deadline:  # kill while a save is in flight (its temporary directory exists)
            if any("tmp" in name for name in os.listdir(d)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any("tmp" in name for name in os.listdir(d)), "the kill must land during a save"
    cfg = load_config("configs/tiny.yaml", "meshes/cpu8-ep8.yaml", ["model.d_model=192", "model.head_dim=48"])
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    ck = Checkpoints(str(d))
    latest = ck.latest()
    assert latest is not None and latest >= 1
    state = ck.restore(sm, init_train_state(sm, make_optimizer(cfg.run)))
    assert state.step == latest


def test_checkpoint_of_another_config_names_the_shapes(tmp_path):
    d = str(tmp_path / "ck")
    cfg = cfg_for("cpu8-ep8", "run.steps=2")
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    Checkpoints(d, every=1).save(sm, cfg, init_train_state(sm, make_optimizer(cfg.run))._replace(step=1))
    other = cfg_for("cpu8-ep8", "run.steps=2", "model.expert_hidden=80")
    # The saved config is compared first (a metadata read, before anything is built or restored) ...
    with pytest.raises(ConfigError, match=r"model.expert_hidden=80 here, but the checkpoint .* with "
                                          r"model.expert_hidden=40; pass --allow-config-change") as e:  # fmt: skip
        run(other, 2, checkpoint_dir=d, resume=True)
    assert "\n" not in str(e.value)
    # ... and a change allowed that the weights cannot take names the tensor and both shapes.
    with pytest.raises(ConfigError, match=r"was written for another model: .*w_in.* has shape \(4, 8, 48, 40\) there, "
                                          r"\(4, 8, 48, 80\) here") as e:  # fmt: skip
        run(other, 2, checkpoint_dir=d, resume=True, allow_config_change=True)
    assert "\n" not in str(e.value)


def test_resume_without_checkpoint_is_one_line(tmp_path, cli):
    proc = cli("train", "--config", "configs/tiny.yaml", "--layout", "meshes/cpu8-ep8.yaml", "--steps", "2",
                   "--checkpoint-dir", str(tmp_path / "none"), "--resume")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--resume: no checkpoint in" in proc.stderr


def test_bad_data_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"--data='.*missing.npy': no such file"):
        TokenFile(str(tmp_path / "missing.npy"), 97, 12)
    f = tmp_path / "f.npy"
    np.save(f, np.zeros(100, np.float32))
    with pytest.raises(ConfigError, match=r"dtype float32 is not an integer type"):
        TokenFile(str(f), 97, 12)
    b = tmp_path / "odd.bin"
    b.write_bytes(b"\x00" * 101)
    with pytest.raises(ConfigError, match=r"101 bytes is not a whole number of uint16 tokens"):
        TokenFile(str(b), 97, 12)
    big = tmp_path / "big.npy"
    np.save(big, np.arange(200, dtype=np.int32))
    with pytest.raises(ConfigError, match=r"token id 199 is outside the vocabulary; valid ids: 0..96"):
        TokenFile(str(big), 97, 12)
    with pytest.raises(ConfigError, match=r"--data-dtype='int8': valid for .bin files: uint16, uint32"):
        TokenFile(str(b), 97, 12, dtype="int8")


def test_train_cli_on_a_token_file(tmp_path, cli):
    tokens = np.random.default_rng(0).integers(0, 97, 5000).astype(np.uint16)
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    m = tmp_path / "m.jsonl"
    proc = cli("train", "--config", "configs/tiny.yaml", "--layout", "meshes/cpu8-ep8.yaml", "--steps", "3",
                   "--data", str(path), "--metrics", str(m))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "router_loss", "tokens_per_s", "dropped_share", "max_over_mean_load"} <= set(rows[0])
    npy, m2 = tmp_path / "t.npy", tmp_path / "m2.jsonl"  # the same tokens as a .npy file: the same run
    np.save(npy, tokens.astype(np.int32))
    proc = cli("train", "--config", "configs/tiny.yaml", "--layout", "meshes/cpu8-ep8.yaml", "--steps", "3",
                   "--data", str(npy), "--metrics", str(m2))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["loss"] for x in m2.read_text().splitlines()] == [r["loss"] for r in rows]
    bad = cli("train", "--config", "configs/tiny.yaml", "--layout", "meshes/cpu8-ep8.yaml", "--data",
                  str(tmp_path / "nope.bin"))  # fmt: skip
    assert bad.returncode == 2 and "no such file" in bad.stderr and bad.stderr.count("\n") == 1


def _metrics(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_stop_at_then_resume_follows_the_one_run_and_a_profile_is_written(tmp_path, monkeypatch, capsys):
    """`train --steps 20 --stop-at 10` then `train --steps 20 --resume` gives the losses of one `train --steps 20`,
    step for step (the learning-rate schedule is run.steps long in all three). Run in-process through the CLI, so the
    three share one compiled step; the straight run also writes a profiler trace."""
    from moe_jax import cli

    monkeypatch.chdir(tmp_path)
    base = ["train", "--config", f"{ROOT}/configs/tiny.yaml", "--layout", f"{ROOT}/meshes/cpu8-ep4-tp2.yaml",
            "--steps", "20"]  # fmt: skip
    assert cli.main([*base, "--metrics", "straight.jsonl", "--profile", "trace"]) == 0
    assert cli.main([*base, "--stop-at", "10", "--checkpoint-dir", "ck", "--metrics", "first.jsonl"]) == 0
    assert Checkpoints("ck").latest() == 10
    assert cli.main([*base, "--resume", "--checkpoint-dir", "ck", "--metrics", "second.jsonl"]) == 0
    straight = _metrics(tmp_path / "straight.jsonl")
    first, second = _metrics(tmp_path / "first.jsonl"), _metrics(tmp_path / "second.jsonl")
    assert [r["step"] for r in first] == list(range(1, 11)) and [r["step"] for r in second] == list(range(11, 21))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    assert straight[-1]["loss"] < straight[0]["loss"]  # the 20 steps learned something, or the check shows little
    traces = [f for f in (tmp_path / "trace").rglob("*") if f.is_file()]
    assert traces and all(f.stat().st_size > 0 for f in traces), traces
    assert any(f.name.endswith((".xplane.pb", ".trace.json.gz")) for f in traces), traces
    assert "wrote a jax.profiler trace to trace" in capsys.readouterr().out


def test_resume_with_another_schedule_or_model_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from moe_jax import cli

    monkeypatch.chdir(tmp_path)
    base = ["train", "--config", f"{ROOT}/configs/tiny.yaml", "--layout", f"{ROOT}/meshes/cpu8-ep8.yaml"]
    assert cli.main([*base, "--steps", "4", "--stop-at", "2", "--checkpoint-dir", "ck"]) == 0
    capsys.readouterr()
    for extra, message in (
        (["--steps", "8"], "--resume: run.steps=8 here, but the checkpoint in {ck} was written with run.steps=4 (it "
                           "sets the learning-rate schedule's length"),
        (["--steps", "4", "model.top_k=1"], "--resume: model.top_k=1 here, but the checkpoint in {ck} was written "
                                            "with model.top_k=2"),
        (["--steps", "4", "run.lr=0.5"], "run.lr=0.5 here, but the checkpoint in {ck} was written with run.lr=0.01"),
    ):  # fmt: skip
        assert cli.main([*base, *extra, "--resume", "--checkpoint-dir", "ck"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message.format(ck=tmp_path / "ck") in err, err
        assert "pass --allow-config-change" in err
    # Asked for, the change is taken, and the run continues from step 2.
    assert cli.main([*base, "--steps", "3", "--resume", "--checkpoint-dir", "ck", "--allow-config-change"]) == 0
    assert Checkpoints("ck").latest() == 3
    assert cli.main([*base, "--steps", "4", "--stop-at", "9", "--resume", "--checkpoint-dir", "ck"]) == 2
    assert "--stop-at=9: must be in 1..4" in capsys.readouterr().err


def test_adam_moments_stored_in_bf16_stay_within_their_rounding():
    """run.exp_avg_dtype / run.exp_avg_sq_dtype (the precision-aware optimizer). With both fp32, the optimizer is
    optax.adamw bit for bit. With both bf16, on the same five fixed gradients (no feedback through the parameters;
    weight decay 0, so every difference comes from the moments): each moment is rounded once per step when stored,
    a relative error of at most u = 2^-8 (bf16 keeps 8 significant bits), so after k stores at most k u; the update
    m / sqrt(v) then errs by at most k u + k u / 2 = 1.5 k u relative. Over the steps, each parameter stays within
    sum_k 1.5 k u |update_k| of the fp32 run, |update_k| the fp32 run's own step-k change of it (plus 1e-9 for fp32's
    own rounding of the sums)."""
    import dataclasses

    import jax.numpy as jnp
    import optax

    run = dataclasses.replace(load_config("configs/tiny.yaml").run, weight_decay=0.0, warmup_steps=1, steps=5)
    r = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(r.normal(size=(64, 48)), jnp.float32),
        "b": jnp.asarray(r.normal(size=(48,)), jnp.float32),
    }
    grads = [jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape) * 10.0 ** r.uniform(-3, 1), jnp.float32), params)
             for _ in range(5)]  # fmt: skip

    def steps(tx):
        p, state, history = params, tx.init(params), []
        for g in grads:
            updates, state = tx.update(g, state, p)
            new = optax.apply_updates(p, updates)
            history.append(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)), new, p))
            p = new
        return p, state, history

    fp32 = steps(make_optimizer(run))
    schedule = optax.warmup_cosine_decay_schedule(0.0, run.lr, 1, 5, run.lr * 0.1)
    plain = steps(optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))
    for a, b in zip(jax.tree.leaves(fp32[:2]), jax.tree.leaves(plain[:2]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    bf16 = steps(make_optimizer(dataclasses.replace(run, exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16")))
    assert {x.dtype for x in jax.tree.leaves((bf16[1][0].mu, bf16[1][0].nu))} == {jnp.dtype(jnp.bfloat16)}
    u = 2.0**-8
    for name in params:
        bound = sum(1.5 * k * u * step[name] for k, step in enumerate(fp32[2], start=1)) + 1e-9
        err = np.abs(np.asarray(bf16[0][name]) - np.asarray(fp32[0][name]))
        assert np.all(err <= bound), (name, float(np.max(err / bound)))
        assert np.max(err) > 0  # the moments were rounded: the test can tell bf16 from fp32
