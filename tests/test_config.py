"""Configs: loading, overrides, and one clear line for every kind of bad input."""

import dataclasses

import pytest

from moe_jax import cli
from moe_jax.config import ConfigError, check_devices
from moe_jax.load import load_config

SEED = "configs/seed.yaml"
TINY = "configs/tiny.yaml"


def test_seed_defaults_are_the_seeds_model():
    cfg = load_config(SEED)
    m = cfg.model
    assert (m.layers, m.experts, m.d_model, m.heads, m.head_dim, m.expert_hidden) == (16, 64, 1024, 16, 64, 2048)
    assert (cfg.run.batch, cfg.run.seq_len, cfg.run.dtype) == (128, 2048, "fp16")
    assert cfg.layout.shape == (4, 1, 16, 2)


def test_overrides_apply_in_order_and_are_typed():
    cfg = load_config(TINY, None, ["model.top_k=1", "layout.ep=4", "run.lr=0.5", "run.dtype=bf16", "layout.ep=2"])
    assert cfg.model.top_k == 1 and cfg.layout.ep == 2 and cfg.run.lr == 0.5 and cfg.run.dtype == "bf16"


def test_layout_file_is_a_whole_layout():
    # tiny.yaml's own layout says ep 8; a layout file that leaves ep out means ep 1, not 8.
    cfg = load_config(TINY, "meshes/cpu8-pp4-tp2.yaml")
    assert cfg.layout.shape == (4, 1, 1, 2)


def test_config_is_frozen():
    cfg = load_config(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.top_k = 3  # type: ignore[misc]


MLA = ["model.attention=mla", "model.kv_lora_rank=64", "model.qk_nope_head_dim=32", "model.qk_rope_head_dim=16",
       "model.v_head_dim=32"]  # fmt: skip

BAD_OVERRIDES = [
    (["layout.ep=3"], "layout.ep=3", "divide model.experts=64"),
    (["layout.pp=3"], "layout.pp=3", "must divide model.layers=16"),
    (["layout.pp=4", "layout.repeats=8"], "layout.pp=4", "layout.repeats = 4 x 8"),
    (["layout.tp=32"], "layout.tp=32", "divide model.heads=16"),
    (["model.expert_hidden=2050", "layout.tp=4"], "layout.tp=4", "divide model.expert_hidden=2050"),
    (["run.seq_len=2047"], "run.seq_len=2047", "divisible by layout.tp=2"),
    (["run.batch=100"], "run.batch=100", "layout.dp x layout.ep x layout.microbatches = 1 x 16 x 8 = 128"),
    (["model.top_k=0"], "model.top_k=0", "1..model.experts=64"),
    (["model.top_k=65"], "model.top_k=65", "1..model.experts=64"),
    (["model.d_model=0"], "model.d_model=0", "positive integer"),
    (["layout.ep=-2"], "layout.ep=-2", "positive integer"),
    (["model.foo=1"], "model.foo=1", "unknown key; valid model keys: vocab"),
    (["mdl.top_k=1"], "unknown section 'mdl'", "valid: model, layout, run"),
    (["run.dtype=fp8"], "run.dtype='fp8'", "valid: fp32, bf16, fp16"),
    (["model.capacity_factor=0"], "model.capacity_factor=0.0", "must be > 0 in capacity mode"),
    (["model.top_k=two"], "model.top_k='two'", "expected an integer"),
    (["top_k"], "override 'top_k'", "section.key=value"),
    # The families' options (issue 14): each names the field, the value and what would be valid.
    (["model.kv_heads=3"], "model.kv_heads=3", "must divide model.heads=16; valid: 1, 2, 4, 8, 16"),
    (
        ["model.heads=12", "model.kv_heads=6", "layout.tp=4", "model.head_dim=64"],
        "layout.tp=4",
        "must divide model.kv_heads=6 (K/V heads split) or be a multiple of it (K/V heads replicated); valid: 1, 2, 3, 6, 12",
    ),
    (["model.expert_groups=5"], "model.expert_groups=5", "must divide model.experts=64; valid: 1, 2, 4, 8, 16, 32, 64"),
    (["model.expert_groups=8", "model.group_top_k=9"], "model.group_top_k=9", "must be in 1..model.expert_groups=8"),
    (
        ["model.expert_groups=8", "model.group_top_k=1", "model.top_k=9"],
        "model.top_k=9",
        "group_top_k x experts per group = 1 x 8 = 8",
    ),
    (["model.dense_layers=16", "model.dense_hidden=64"], "model.dense_layers=16", "must be < model.layers=16"),
    (
        ["model.moe_every=3", "model.dense_hidden=64"],
        "model.moe_every=3",
        "must divide model.layers - model.dense_layers = 16 - 0 = 16",
    ),
    (["model.dense_layers=1"], "model.dense_hidden=0", "must be > 0: the model has dense layers"),
    (
        ["model.dense_layers=2", "model.dense_hidden=64", "layout.pp=4"],
        "layout.pp=4",
        "must divide the pipelined units=14 (model.layers=16 less model.dense_layers=2, in units of model.moe_every=1",
    ),
    (
        ["model.moe_every=2", "model.dense_hidden=64", "layout.pp=4", "layout.repeats=4"],
        "layout.pp=4",
        "a stage would hold a different layer pattern; valid pp x repeats: 1, 2, 4, 8",
    ),
    (["model.shared_gate=true"], "model.shared_gate=True", "needs a shared expert"),
    (["model.shared_hidden=100", "layout.tp=8"], "layout.tp=8", "must divide model.shared_hidden=100"),
    (["model.router_score=relu"], "model.router_score='relu'", "valid: softmax, sigmoid"),
    (["model.qk_norm=layer"], "model.qk_norm='layer'", "valid: none, head, projection"),
    # DeepSeek (issue 16): latent attention's sizes and uneven stages.
    ([*MLA, "model.kv_lora_rank=0"], "model.kv_lora_rank=0", "must be a positive integer with model.attention=mla"),
    ([*MLA, "model.qk_nope_head_dim=-8"], "model.qk_nope_head_dim=-8", "must be >= 0"),
    ([*MLA, "model.q_lora_rank=-1"], "model.q_lora_rank=-1", "must be >= 0"),
    ([*MLA, "model.qk_rope_head_dim=15"], "model.qk_rope_head_dim=15", "must be even (RoPE rotates pairs"),
    (["model.kv_lora_rank=512"], "model.kv_lora_rank=512", "is a latent-attention size; set model.attention=mla"),
    ([*MLA, "model.kv_heads=4"], "model.kv_heads=4", "is a multi-head attention option; with model.attention=mla"),
    (["model.attention=gqa"], "model.attention='gqa'", "valid: mha, mla"),
    (["layout.stage_layers=[4,4,4]"], "layout.stage_layers=[4, 4, 4]", "needs one count per stage: 4 numbers"),
    (["layout.stage_layers=[5,5,3,2]"], "layout.stage_layers=[5, 5, 3, 2]", "sums to 15; the pipelined layers are"),
    (["layout.stage_layers=[8,8,0,0]"], "layout.stage_layers=[8, 8, 0, 0]", "every stage needs a positive layer count"),
    (["layout.repeats=2", "layout.stage_layers=[4,4,4,4]"], "layout.stage_layers", "need layout.repeats=1, not 2"),
    (["layout.stage_layers=[a]"], "layout.stage_layers=['a']", "expected a list of integers, e.g. [2, 2, 2, 1]"),
    (["layout.pp=3"], "layout.pp=3", "(or uneven stages: layout.stage_layers)"),
    # Flash attention (issue 30): the sequence in whole blocks.
    (
        ["model.attention_impl=flash", "run.seq_len=1000"],
        "run.seq_len=1000",
        "must be a multiple of model.attention_block=512 with model.attention_impl='flash'",
    ),  # fmt: skip
    (["model.attention_block=0"], "model.attention_block=0", "must be"),
    (["model.attention_impl=flashy"], "model.attention_impl='flashy'", "valid: auto, xla, cudnn, blockwise, flash"),
]


@pytest.mark.parametrize("overrides,field,why", BAD_OVERRIDES)
def test_bad_override_is_one_line_naming_field_and_valid(overrides, field, why):
    with pytest.raises(ConfigError) as e:
        load_config(SEED, None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    assert field in msg and why in msg, msg


def test_dropless_accepts_any_capacity_factor():
    """Dropless and ragged dispatch drop nothing, so they have no capacity: a capacity factor set with them is
    ignored (accepted whatever its value, with no effect: tests/test_model.py), not refused."""
    from moe_jax.model.moe import capacity

    for dispatch in ("dropless", "ragged"):
        zero = load_config(SEED, None, [f"model.dispatch={dispatch}", "model.capacity_factor=0"])  # not refused
        default = load_config(SEED, None, [f"model.dispatch={dispatch}"])
        # and without effect: every expert's buffer holds all T tokens of its group, whatever the factor
        assert capacity(zero.model, 1000) == capacity(default.model, 1000) == 1000
    with pytest.raises(ConfigError, match="capacity_factor"):  # where it has an effect, 0 is refused
        load_config(SEED, None, ["model.dispatch=capacity", "model.capacity_factor=0"])


def test_device_count_mismatch():
    cfg = load_config(SEED)
    check_devices(cfg.layout, 128)
    with pytest.raises(ConfigError, match=r"devices=64: layout pp x dp x ep x tp = 4 x 1 x 16 x 2 = 128 devices"):
        check_devices(cfg.layout, 64)


def test_yaml_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  layerz: 4\n")
    with pytest.raises(ConfigError, match=r"model.layerz=4: unknown key"):
        load_config(p)


def test_yaml_unknown_section_and_bad_layout_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("modle:\n  layers: 4\n")
    with pytest.raises(ConfigError, match=r"unknown section; valid: model, layout, run"):
        load_config(p)
    lay = tmp_path / "l.yaml"
    lay.write_text("pp: 2\nexperts: 4\n")
    with pytest.raises(ConfigError, match=r"layout.experts=4: unknown key"):
        load_config(SEED, lay)


def test_yaml_not_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"must hold a YAML mapping of keys, found a list"):
        load_config(p)


def test_yaml_syntax_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {layers: 4\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"--config='nope.yaml': no such file"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match=r"--layout='meshes/nope.yaml': no such file"):
        load_config(SEED, "meshes/nope.yaml")


@pytest.mark.parametrize(
    "argv",
    [
        ["mesh", "--config", "nope.yaml"],
        ["mesh", "--config", SEED, "layout.ep=3"],
        ["mesh", "--config", SEED, "model.top_k=99"],
    ],
)
def test_cli_prints_one_line_and_exits_2(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-jax mesh: error: "), err
