"""Hugging Face checkpoints in and out, checked against code no one here wrote: the fixtures of tests/fixtures/hf/ are
tiny random models that transformers' own classes built and saved (scripts/make_hf_fixtures.py, which also wrote
transformers' fp32 logits and greedy continuations, and checked that transformers loads our exports as the same
model). This file needs neither torch nor transformers.

- Each family imported into the shards of three layouts (a pipeline; tp 4, more than the K/V heads of the GQA
  families; ep 8 = the experts): prefill + decode logits of every position equal transformers' within fp32 1e-4 of
  the largest logit, and the greedy tokens equal exactly. The parameter count equals the safetensors' elements.
- Export then import is bit-identical, and the exported tensors are the original file's, bit for bit (the bf16 one
  included: bf16 -> fp32 master weights -> bf16 loses nothing).
- The commands: import-hf, generate from the checkpoint and straight from the directory with a text prompt (the
  text transformers' greedy tokens decode to), train --init-from-hf; every bad input is one line, and nothing is
  written half.
"""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import ROOT

from moe_jax.config import ConfigError
from moe_jax.hf import config_from_hf
from moe_jax.hf.checkpoint import HFTensors, export, import_params, import_state, rest_shapes
from moe_jax.hf.families import FAMILIES
from moe_jax.mesh import make_mesh
from moe_jax.model.params import total_params
from moe_jax.parallel.sharded import ShardedModel

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
LAYOUTS = {  # name -> (layout file, overrides); 8 devices each
    "pp": (None, []),  # per family, below: a pipeline with the family's layer pattern on its stages
    "tp4": (None, ["layout.ep=2", "layout.tp=4"]),
    "ep8": ("cpu8-ep8", []),
}
PIPELINE = {  # Mixtral and OLMoE: 4 stages of one layer; Qwen3-MoE (dense, MoE units) and Qwen2-MoE (dense first)
    "mixtral": ["layout.pp=4", "layout.tp=2", "layout.microbatches=4"],
    "olmoe": ["layout.pp=4", "layout.tp=2", "layout.microbatches=4"],
    "qwen3_moe": ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=2"],
    "qwen2_moe": ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=2"],
    "deepseek_v2": ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=2"],
    "deepseek_v3": ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=2"],
}
# The DeepSeek families (latent attention) on two of the three: V3 (grouped sigmoid routing, its routing bias
# imported) prefills and decodes with the latent cache on the pipeline; V2 prefills on tp 4. Their other layouts are
# the MLA model's in docs/families.md (the suite's time).
CASES = [(f, lay) for f in FAMILIES for lay in LAYOUTS if not f.startswith("deepseek")] + [
    ("deepseek_v3", "pp"),
    ("deepseek_v2", "tp4"),
]
LOGITS_RTOL = 1e-5  # fp32, of the largest |logit|; measured at most about 6e-7


def fixture(family: str) -> str:
    return os.path.join(FIXTURES, family)


def hf_config(family: str, layout: str, *extra: str):
    name, overrides = LAYOUTS[layout]
    overrides = PIPELINE[family] if layout == "pp" else overrides
    path = os.path.join(ROOT, "meshes", f"{name}.yaml") if name else None
    return config_from_hf(fixture(family), None, path,
                          ["run.dtype=fp32", "run.seq_len=16", "run.batch=8", *overrides, *extra])[0]  # fmt: skip


@pytest.mark.parametrize("family,layout", CASES)
def test_logits_and_greedy_tokens_equal_transformers(family, layout):
    """On the pipeline: prefill of the prompt, then greedy decode with the KV cache. On tp 4 and ep 8: one prefill
    of transformers' whole sequence (prompt + its greedy tokens), whose argmax at each position must then be
    transformers' next token: greedy decoding from the same logits gives the same tokens, one program instead of two."""
    from moe_jax.serve.generate import generate
    from moe_jax.serve.step import ServeModel

    expected = np.load(os.path.join(fixture(family), "expected.npz"))
    cfg = hf_config(family, layout)
    prompts, want = expected["prompts"].astype(np.int32), expected["greedy"]
    srv = ServeModel.build(cfg, make_mesh(cfg.layout), max_len=16)
    params, rest, tensors = import_state(srv.sm, fixture(family))
    bias = sum(int(np.prod(s)) for s in rest_shapes(cfg).values()) if FAMILIES[family].rest else 0
    assert total_params(cfg.model) + bias == tensors.total_elements()
    if bias:  # the routing bias is the checkpoint's (random in the fixture), not a fresh zero
        assert all(np.abs(np.asarray(x)).max() > 0 for x in _leaves(rest))
    if layout == "pp":
        tokens, info = generate(srv, params, rest, prompts, want.shape[1], every_position=True)
        got = info["logits"]
    else:
        full = np.concatenate([prompts, want[:, :-1]], axis=1)
        _, info = generate(srv, params, rest, full, 1, every_position=True)
        got = info["logits"]
        tokens = got[:, prompts.shape[1] - 1 :].argmax(-1)
    ref = expected["logits"][:, : got.shape[1]]  # transformers' forward of prompt + its greedy tokens
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err <= LOGITS_RTOL, f"{family} on {layout}: logits differ from transformers' by {err:.2e} of the largest"
    np.testing.assert_array_equal(tokens, want)


def _file_tensors(directory: str) -> dict[str, np.ndarray]:
    t = HFTensors(directory)
    return {name: t.read(name, ()) for name in t.shapes}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_the_original_tensors_and_import_of_it_is_bit_identical(family, tmp_path):
    cfg = hf_config(family, "pp")
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    params, rest, _ = import_state(sm, fixture(family))
    with open(os.path.join(fixture(family), "config.json")) as f:
        original = json.load(f)
    out = str(tmp_path / "export")
    summary = export(sm, params, out, FAMILIES[family], original["dtype"], max_shard_bytes=300_000,
                     base_config=original, rest=rest)  # fmt: skip
    assert len(summary["files"]) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    got, want = _file_tensors(out), _file_tensors(fixture(family))
    assert set(got) == set(want) == set(index["weight_map"])
    for name, x in want.items():
        assert got[name].dtype == x.dtype and np.array_equal(got[name].view(np.uint8), x.view(np.uint8)), name
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["model_type"] == family and written["architectures"] == original["architectures"]
    assert config_from_hf(out, None, None, ["run.seq_len=16"])[0].model == config_from_hf(
        fixture(family), None, None, ["run.seq_len=16"])[0].model  # fmt: skip
    again, _ = import_params(sm, out)
    for a, b in zip(_leaves(again), _leaves(params), strict=True):
        assert np.array_equal(a, b)


def _leaves(params) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_import_then_generate_text_from_the_checkpoint_and_from_the_directory(cli, tmp_path):
    """import-hf writes a weights-only checkpoint; generate restores it (its own model and layout, no --config) and
    continues a text prompt as transformers did; generate --hf reads the directory straight into the shards."""
    with open(os.path.join(fixture("mixtral"), "expected.json")) as f:
        expected = json.load(f)
    out = tmp_path / "ckpt"
    layout = ["--layout", os.path.join(ROOT, "meshes", "cpu8-pp2-ep2-tp2.yaml")]
    r = cli("import-hf", fixture("mixtral"), "--out", str(out), *layout, "run.dtype=fp32")
    assert r.returncode == 0, r.stderr
    assert "import-hf: mixtral" in r.stdout and "363,712 parameters" in r.stdout
    prompt = ["--prompt", expected["text_prompt"], "--max-new", "8", "--show", "1"]
    from_ckpt = cli("generate", "--checkpoint", str(out), *prompt)
    assert from_ckpt.returncode == 0, from_ckpt.stderr
    line = f"{expected['text_prompt']} -> {expected['text_continuation']}"
    assert line in from_ckpt.stdout, from_ckpt.stdout
    direct = cli("generate", "--hf", fixture("mixtral"), *layout, "run.dtype=fp32", *prompt)
    assert direct.returncode == 0, direct.stderr
    assert line in direct.stdout, direct.stdout

    # --force replaces a checkpoint; without it an existing one is refused, and left as it was
    before = sorted(os.listdir(out))
    again = cli("import-hf", fixture("mixtral"), "--out", str(out), *layout)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr and "--force" in again.stderr
    assert sorted(os.listdir(out)) == before


def test_train_starts_from_the_imported_weights():
    """train --init-from-hf: after two AdamW steps (the first at warmup's learning rate 0, the second at 1e-6) every
    weight is within 1e-5 of the file's and some moved (a step moves each by about the learning rate; the weights
    themselves are of order 0.1, a random initialisation would be off by that much)."""
    from moe_jax.train.data import SyntheticTask
    from moe_jax.train.loop import train

    cfg = hf_config("qwen2_moe", "ep8", "run.lr=1e-6", "run.weight_decay=0", "run.steps=2", "run.warmup_steps=1")
    mesh = make_mesh(cfg.layout)
    state, records = train(cfg, mesh, SyntheticTask(cfg.model.vocab, cfg.run.seq_len), 2,
                           init_params=lambda sm: import_params(sm, fixture("qwen2_moe"))[0])  # fmt: skip
    assert all(np.isfinite(r["loss"]) for r in records) and state.step == 2
    imported, _ = import_params(ShardedModel.build(cfg, mesh), fixture("qwen2_moe"))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(_leaves(state.params), _leaves(imported), strict=True))
    assert 0 < moved <= 1e-5, moved


def _copy(family: str, tmp_path) -> str:
    d = str(tmp_path / family)
    shutil.copytree(fixture(family), d)
    return d


def _edit_config(d: str, **changes) -> None:
    path = os.path.join(d, "config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def _rewrite_tensors(d: str, edit) -> None:
    from safetensors.numpy import save_file

    tensors = _file_tensors(d)
    edit(tensors)
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})


def _bad_inputs(tmp_path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    other = _copy("olmoe", tmp_path / "t1")
    _edit_config(other, model_type="llama")
    missing = _copy("olmoe", tmp_path / "t2")
    _rewrite_tensors(missing, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    extra = _copy("olmoe", tmp_path / "t3")
    _rewrite_tensors(
        extra, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    )
    shape = _copy("olmoe", tmp_path / "t4")
    _edit_config(shape, intermediate_size=40)
    truncated = _copy("olmoe", tmp_path / "t5")
    path = os.path.join(truncated, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    window = _copy("mixtral", tmp_path / "t6")
    _edit_config(window, sliding_window=16)
    # DeepSeek configs asking for what is not built: YaRN RoPE scaling (V3's published config), V2's group-limited
    # greedy routing over a subset of groups, RoPE not interleaved
    yarn = _copy("deepseek_v3", tmp_path / "t7")
    _edit_config(yarn, rope_parameters={"rope_type": "yarn", "factor": 40, "rope_theta": 10000.0})
    limited = _copy("deepseek_v2", tmp_path / "t8")
    _edit_config(limited, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    halves = _copy("deepseek_v3", tmp_path / "t9")
    _edit_config(halves, rope_interleave=False)
    return [
        ([str(tmp_path / "nowhere")], "no such directory"),
        ([str(empty)], "no config.json"),
        ([other], "model_type='llama': not supported; supported: mixtral, qwen3_moe, olmoe, qwen2_moe"),
        ([missing], "tensor model.layers.1.mlp.experts.3.up_proj.weight missing (needed for blocks/moe/w_in"),
        ([extra], "tensor model.layers.0.self_attn.rotary_emb.inv_freq is not part of this model"),
        ([shape], "tensor model.layers.0.mlp.experts.0.gate_proj.weight has shape (32, 64), the config needs (40, 64)"),
        ([truncated], "model.safetensors: not a readable safetensors file"),
        ([window], "sliding_window=16: sliding-window attention is not supported"),
        ([yarn], "rope_parameters.rope_type='yarn': only unscaled RoPE ('default') is supported"),
        ([limited], "topk_method='group_limited_greedy' (n_group=4, topk_group=2): only 'greedy' routing is built"),
        ([halves], "rope_interleave=False: only DeepSeek's interleaved RoPE layout is built"),
        ([fixture("mixtral"), "layout.pp=8", "layout.ep=1"], "layout.pp=8: layout.pp x layout.repeats = 8 x 1 must divide"),
    ]  # fmt: skip


def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "out"
    layout = ["--layout", os.path.join(ROOT, "meshes", "cpu8-ep8.yaml")]
    for args, message in _bad_inputs(tmp_path):
        r = cli("import-hf", args[0], "--out", str(out), *layout, *args[1:])
        assert r.returncode == 2, (args, r.stdout[-500:], r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (message, r.stderr)
        assert not out.exists(), args
    for argv, message in [
        (["generate", "--hf", fixture("mixtral"), *layout], "give the prompt as text (--prompt) or as token ids"),
        (["export-hf", str(tmp_path / "none"), "--out", str(out)], "no such checkpoint directory"),
        (["export-hf", str(tmp_path), "--out", str(out), "--max-shard-size", "lots"], "--max-shard-size='lots'"),
    ]:
        r = cli(*argv)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        from moe_jax.hf import load_tokenizer

        load_tokenizer(None, "DIR")


def test_an_interrupted_export_leaves_no_directory(tmp_path, monkeypatch):
    """The export is written beside --out and renamed into place when complete: killed after its first file, there
    is no --out (and no partial directory left), and an existing --out stays as it was."""
    from moe_jax.hf import checkpoint

    cfg = hf_config("olmoe", "ep8")
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    params, _ = import_params(sm, fixture("olmoe"))
    real, calls = checkpoint.save_file, []

    def dies_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(checkpoint, "save_file", dies_on_the_second)  # as export looks it up
    out = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        export(sm, params, str(out), FAMILIES["olmoe"], max_shard_bytes=300_000)
    assert os.listdir(tmp_path) == []
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export(sm, params, str(out), FAMILIES["olmoe"], max_shard_bytes=300_000, force=True)
    assert os.listdir(tmp_path) == ["export"] and os.listdir(out) == ["keep.txt"]
