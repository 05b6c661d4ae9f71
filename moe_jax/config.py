"""Configs: frozen dataclasses for the model, the layout and the run, loaded from YAML, overridable with key=value.

Every check of the config alone lives in this module (`check_config`, `check_devices`); the one that needs the model's
parameters (layout.zero) is in load.py, whose `load_config` runs both. A failed check raises `ConfigError` with one
line that names the field, the value and what would be valid. The CLI prints that line and exits 2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, get_type_hints

import yaml

DTYPES = ("fp32", "bf16", "fp16")
# What a step with a non-finite loss or gradients does (train/loop.py): stop the run there, or skip the update (fp16's
# loss scaling always skips an overflowing step; past run.max_skips skipped steps in a row the run stops either way).
NONFINITE = ("stop", "skip")
MOMENT_DTYPES = ("fp32", "bf16")  # what AdamW's moments may be stored in (run.exp_avg_dtype, run.exp_avg_sq_dtype)
FFN_KINDS = ("gelu", "swiglu")
DISPATCH_MODES = ("capacity", "dropless", "ragged")
REMAT_POLICIES = ("none", "tick", "layer")
QK_NORMS = ("none", "head", "projection")
ROUTER_SCORES = ("softmax", "sigmoid")
SCHEDULES = ("gpipe", "1f1b")
# layout.expert_tp: 'tp' splits each expert's hidden dimension over tp (attention's degree); '1' folds the experts over
# (ep, tp) instead, each whole on one device (Megatron-Core's MoE parallel folding).
EXPERT_TP = ("tp", "1")
# layout.ragged_exchange: how ragged dispatch moves rows between expert shards. auto: jax.lax.ragged_all_to_all
# where the backend compiles it (not XLA:CPU), else padded; padded: the dropless all-to-all of every expert's worst
# case; emulated: ragged_all_to_all's semantics built from padded collectives (checks the ragged exchange's code on
# any backend).
RAGGED_EXCHANGES = ("auto", "padded", "emulated")
# layout.vocab_split: 'tp' splits the embedding's rows and the head's columns over tp (vocabulary-parallel embedding,
# head and cross-entropy, Megatron-Core's); 'tp_pp' over tp and pp (every stage computes its share of the head on the
# last stage's outputs, GPipe); 'none' keeps both whole on every device.
VOCAB_SPLITS = ("tp", "tp_pp", "none")
ATTENTION_KINDS = ("mha", "mla")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blockwise", "flash")
# DeepSeek's latent RMSNorms (q_a_layernorm, kv_a_layernorm) use their class default, not the model's norm_eps.
LATENT_NORM_EPS = 1e-6


class ConfigError(ValueError):
    """A bad config, layout, override or file, described in one line."""


def _cached_hash(self) -> int:
    """The configs are lru_cache keys the layout search hashes hundreds of thousands of times: each instance hashes
    its fields once. (The cache is not pickled, `_state`: string hashes differ between processes.)"""
    h = self.__dict__.get("_hash")
    if h is None:
        h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
        object.__setattr__(self, "_hash", h)
    return h


def _state(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k != "_hash"}


def _config_section(cls):
    """A frozen dataclass that hashes its fields once (`_cached_hash`) and pickles without that cache."""
    cls.__hash__ = _cached_hash
    cls.__getstate__ = _state
    return dataclasses.dataclass(frozen=True)(cls)


@_config_section
class ModelConfig:
    """The MoE transformer. Defaults are the seed's model with the choices of design.md section 1."""

    vocab: int = 32000
    d_model: int = 1024
    layers: int = 16
    heads: int = 16
    head_dim: int = 64
    attention: str = (
        "mha"  # mha: multi-head, grouped-query or multi-query (kv_heads); mla: multi-head latent (DeepSeek)
    )
    q_lora_rank: int = 0  # MLA: queries through a rank-r projection and its RMSNorm; 0: one full projection (V2-Lite)
    kv_lora_rank: int = 0  # MLA: the shared latent keys and values are made from (and what serving caches)
    qk_nope_head_dim: int = 0  # MLA: the per-head query/key part without RoPE
    qk_rope_head_dim: int = 0  # MLA: the RoPE part, its key shared by all heads (cached beside the latent)
    v_head_dim: int = 0  # MLA: the value heads' width (the output projection reads heads x v_head_dim)
    # training attention: blockwise (query blocks, each rematerialised: long sequences fit, the causal mask of every
    # block kept), flash (query and key blocks, only the causal pairs, an online softmax and its own backward: memory
    # linear in the sequence; what published runs use), or jax.nn.dot_product_attention's xla (scores materialised
    # whole) or cudnn (fused, GPU only); auto: cudnn on GPU, blockwise elsewhere. Serving attends blockwise (its
    # queries start at the cache position).
    attention_impl: str = "auto"
    attention_block: int = 512  # rows of a query (and, flash, key) block; flash needs the sequence to be a multiple
    kv_heads: int = 0  # K/V heads (grouped-query attention): 1 = MQA; 0 means `heads` (MHA, the seed's).
    qk_norm: str = "none"  # RMSNorm on q and k before RoPE: per head (Qwen3) or over the whole projection (OLMoE).
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen1.5-MoE / Qwen2-MoE).
    experts: int = 64
    top_k: int = 2
    expert_hidden: int = 2048
    ffn: str = "gelu"  # gelu: two matrices d -> F -> d; swiglu: three. Experts, shared experts and dense layers.
    shared_hidden: int = 0  # width of the always-on shared expert FFN beside the routed ones; 0: none.
    shared_gate: bool = False  # the shared expert's output times sigmoid(x . w) (Qwen2-MoE).
    dense_layers: int = 0  # the first k layers have a dense FFN of width dense_hidden instead of experts (DeepSeek).
    moe_every: int = 1  # of the layers after those, every n-th is MoE and the others dense (Switch, Llama 4: 2).
    dense_hidden: int = 0  # the dense layers' FFN width (needed when any layer is dense).
    router_score: str = "softmax"  # softmax over experts, or an independent sigmoid per expert (DeepSeek-V3).
    norm_topk: bool = True  # gates renormalised to sum 1 over the k chosen (Mixtral, Qwen3) or not (OLMoE, Qwen1.5).
    routed_scale: float = 1.0  # gates times this factor (DeepSeek's routed_scaling_factor).
    expert_groups: int = 1  # grouped top-k: experts in n groups, a token picks from its best group_top_k groups.
    group_top_k: int = 1
    # capacity: C = ceil(k T / E * capacity_factor) rows per expert and source shard (overflow dropped); dropless: C = T
    # (nothing dropped, every buffer row computed); ragged: nothing dropped, the routed rows sorted by expert and run
    # as a grouped matmul (`lax.ragged_dot`) over exactly the rows each expert got. capacity_factor is ignored by both.
    dispatch: str = "capacity"
    capacity_factor: float = 1.25
    lb_loss_weight: float = 1e-2  # Switch load-balancing loss.
    z_loss_weight: float = 1e-3  # Router z-loss.
    expert_bias: bool = False  # DeepSeek-style aux-loss-free bias on the routing scores.
    expert_bias_rate: float = 1e-3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    max_seq_len: int = 10240
    tie_embeddings: bool = False  # the head is the embedding's transpose

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def qk_head_dim(self) -> int:
        """The width q and k are scored at: head_dim, or with MLA the no-RoPE and RoPE parts together."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices of an FFN: in, out, and SwiGLU's gate."""
        return 3 if self.ffn == "swiglu" else 2

    @property
    def moe_layers(self) -> int:
        """MoE layers: one per scanned unit of the pipelined stack (each unit: moe_every - 1 dense layers, then MoE)."""
        return (self.layers - self.dense_layers) // self.moe_every

    @property
    def units(self) -> int:
        """The stacked units the pipeline splits over stages (the first dense_layers run before it)."""
        return self.moe_layers

    def is_moe(self, layer: int) -> bool:
        """Layer i (0-based) is MoE when it is past the first dense_layers and ends a unit of moe_every layers."""
        return layer >= self.dense_layers and (layer - self.dense_layers + 1) % self.moe_every == 0


@_config_section
class LayoutConfig:
    """A parallel layout over the mesh axes (pp, dp, ep, tp), row-major, tp fastest.

    `check_config` holds it against the model and the run; `load.check_with_model` against the weights' shapes."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    tp: int = 1
    repeats: int = 1  # Circular pipeline repeats v: pp * v chunks, chunk c on stage c mod pp.
    microbatches: int = 1
    devices_per_host: int = 8
    remat: str = "layer"
    schedule: str = "gpipe"
    # Uneven pipeline stages: the pipelined layers each stage holds (pp numbers summing to model.layers less
    # model.dense_layers; the dense first layers run on every stage before the pipeline). Empty: equal stages.
    stage_layers: tuple[int, ...] = ()
    # ZeRO-1: 1 splits the AdamW moments of every weight replicated over the batch axes (dp, ep) over them; gradients
    # are reduce-scattered, each shard updates its slice, the updated weights are all-gathered.
    zero: int = 0
    # Expert folding: 'tp' splits each expert's hidden dimension over tp; '1' gives each device E / (ep x tp) whole
    # experts: the dispatch all-to-all spans (ep, tp) on the sequence-split tokens, no tp collective around the experts.
    expert_tp: str = "tp"
    # Ragged dispatch's exchange between expert shards: auto (ragged_all_to_all where the backend has it), padded or
    # emulated (RAGGED_EXCHANGES).
    ragged_exchange: str = "auto"
    # The vocabulary (embedding rows, head columns) split over tp (or tp and pp), padded to a multiple of the split
    # (VOCAB_SPLITS).
    vocab_split: str = "tp"
    name: str = ""
    description: str = ""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.ep, self.tp)

    @property
    def devices(self) -> int:
        return math.prod(self.shape)

    def summary(self, remat: bool = False) -> str:
        """'pp 4, dp 2, ep 4, tp 2, m 32, v 4[, remat layer], 1f1b[, ZeRO-1][, experts folded][, vocab whole]': the
        CLI headers'."""
        return (
            f"pp {self.pp}, dp {self.dp}, ep {self.ep}, tp {self.tp}, m {self.microbatches}, v {self.repeats}, "
            + (f"remat {self.remat}, " if remat else "")
            + self.schedule
            + (", ZeRO-1" if self.zero else "")
            + (", experts folded" if self.folded else "")
            + (", vocab whole" if self.tp > 1 and not self.vocab_parallel else "")
            + (", vocab over tp x pp" if "pp" in self.vocab_axes else "")
        )

    @property
    def folded(self) -> bool:
        """Experts folded over (ep, tp): layout.expert_tp=1 on a layout with tp > 1."""
        return self.expert_tp == "1" and self.tp > 1

    @functools.cached_property  # (the layout search asks millions of times)
    def vocab_axes(self) -> tuple[str, ...]:
        """The mesh axes the vocabulary is split over (those of more than one device): (), ('tp',), ('tp', 'pp')."""
        axes = {"none": (), "tp": ("tp",), "tp_pp": ("tp", "pp")}.get(self.vocab_split, ())
        return tuple(a for a in axes if getattr(self, a) > 1)

    @functools.cached_property
    def vocab_shards(self) -> int:
        return math.prod(getattr(self, a) for a in self.vocab_axes)

    @property
    def vocab_parallel(self) -> bool:
        """The vocabulary split: layout.vocab_split=tp on a layout with tp > 1 (or tp_pp with tp or pp > 1)."""
        return bool(self.vocab_axes)


@_config_section
class RunConfig:
    """What one step sees: the global batch, the sequence, the compute dtype, and the optimizer's settings (AdamW,
    warmup then cosine decay over run.steps, gradients clipped by their global norm: train/step.py), and what a step
    with a non-finite loss or gradients does (`nonfinite`: stop the run, or skip the update; `max_skips` skipped steps
    in a row stop it either way: train/loop.py), and the dtypes AdamW's two moments are stored in."""

    batch: int = 128
    seq_len: int = 2048
    dtype: str = "fp16"
    seed: int = 0
    steps: int = 50
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    nonfinite: str = "stop"
    max_skips: int = 10
    # AdamW's moments as stored (updated in fp32 either way): Megatron-Core's --exp-avg-dtype / --exp-avg-sq-dtype of
    # its precision-aware optimizer; DeepSeek-V3 kept both in bf16
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"


@_config_section
class Config:
    model: ModelConfig = ModelConfig()
    layout: LayoutConfig = LayoutConfig()
    run: RunConfig = RunConfig()


SECTIONS: dict[str, type] = {"model": ModelConfig, "layout": LayoutConfig, "run": RunConfig}

# Fields that must be >= 1 (sizes and counts), and fields that must be > 0 (rates, scales).
_POSITIVE_INTS = {
    "model": (
        "vocab",
        "d_model",
        "layers",
        "heads",
        "head_dim",
        "experts",
        "expert_hidden",
        "max_seq_len",
        "moe_every",
        "expert_groups",
        "group_top_k",
        "attention_block",
    ),
    "layout": ("pp", "dp", "ep", "tp", "repeats", "microbatches", "devices_per_host"),
    "run": ("batch", "seq_len", "steps", "max_skips"),
}
_POSITIVE_FLOATS = {"model": ("rope_theta", "norm_eps", "init_std", "routed_scale"), "run": ("lr",)}
_NON_NEGATIVE = {
    "model": (
        "lb_loss_weight",
        "z_loss_weight",
        "expert_bias_rate",
        "kv_heads",
        "shared_hidden",
        "dense_layers",
        "dense_hidden",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    ),
    "run": ("warmup_steps", "weight_decay", "grad_clip", "seed"),
}
_CHOICES = {
    ("model", "ffn"): FFN_KINDS,
    ("model", "dispatch"): DISPATCH_MODES,
    ("model", "qk_norm"): QK_NORMS,
    ("model", "router_score"): ROUTER_SCORES,
    ("model", "attention"): ATTENTION_KINDS,
    ("model", "attention_impl"): ATTENTION_IMPLS,
    ("layout", "remat"): REMAT_POLICIES,
    ("layout", "schedule"): SCHEDULES,
    ("layout", "expert_tp"): EXPERT_TP,
    ("layout", "ragged_exchange"): RAGGED_EXCHANGES,
    ("layout", "vocab_split"): VOCAB_SPLITS,
    ("run", "dtype"): DTYPES,
    ("run", "nonfinite"): NONFINITE,
    ("run", "exp_avg_dtype"): MOMENT_DTYPES,
    ("run", "exp_avg_sq_dtype"): MOMENT_DTYPES,
}


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _fail(field: str, value: Any, why: str) -> None:
    raise ConfigError(f"{field}={value!r}: {why}")


def check_config(cfg: Config) -> Config:
    """Checks every field and every cross-field rule; returns cfg or raises ConfigError naming the first bad field."""
    for section, names in _POSITIVE_INTS.items():
        for name in names:
            v = getattr(getattr(cfg, section), name)
            if v < 1:
                _fail(f"{section}.{name}", v, "must be a positive integer (>= 1)")
    for section, names in _POSITIVE_FLOATS.items():
        for name in names:
            v = getattr(getattr(cfg, section), name)
            if not v > 0:
                _fail(f"{section}.{name}", v, "must be > 0")
    for section, names in _NON_NEGATIVE.items():
        for name in names:
            v = getattr(getattr(cfg, section), name)
            if v < 0:
                _fail(f"{section}.{name}", v, "must be >= 0")
    for (section, name), choices in _CHOICES.items():
        v = getattr(getattr(cfg, section), name)
        if v not in choices:
            _fail(f"{section}.{name}", v, f"valid: {', '.join(choices)}")

    m, lay, run = cfg.model, cfg.layout, cfg.run
    if lay.zero not in (0, 1):
        _fail("layout.zero", lay.zero, "valid: 0 (optimizer state like the weights), 1 (split over dp and ep: ZeRO-1)")
    if not 1 <= m.top_k <= m.experts:
        _fail("model.top_k", m.top_k, f"must be in 1..model.experts={m.experts}")
    if m.dispatch == "capacity" and not m.capacity_factor > 0:
        _fail(
            "model.capacity_factor", m.capacity_factor, "must be > 0 in capacity mode (or use model.dispatch=dropless)"
        )
    _check_architecture(m)
    if m.experts % lay.ep:
        _fail("layout.ep", lay.ep, f"must divide model.experts={m.experts}; valid: {_divisors(m.experts)}")
    if lay.folded and m.experts % (lay.ep * lay.tp):
        _fail(
            "layout.expert_tp",
            lay.expert_tp,
            f"folds the experts over layout.ep x layout.tp = {lay.ep} x {lay.tp} = {lay.ep * lay.tp} devices, which "
            f"must divide model.experts={m.experts}; valid: layout.expert_tp=tp, or ep x tp in {_divisors(m.experts)}",
        )
    if lay.stage_layers:
        _check_stage_layers(m, lay)
    elif m.units % (lay.pp * lay.repeats):
        what = "model.layers" if m.units == m.layers else "the pipelined units"
        unit = "" if m.units == m.layers else (
                f" (model.layers={m.layers} less model.dense_layers={m.dense_layers}, in units of model.moe_every="
                f"{m.moe_every} layers)"
            )  # fmt: skip
        _fail(
            "layout.pp",
            lay.pp,
            f"layout.pp x layout.repeats = {lay.pp} x {lay.repeats} must divide {what}={m.units}{unit}, or a stage "
            f"would hold a different layer pattern; valid pp x repeats: {_divisors(m.units)} (or uneven stages: "
            f"layout.stage_layers)",
        )
    if m.heads % lay.tp:
        _fail("layout.tp", lay.tp, f"must divide model.heads={m.heads}; valid: {_divisors(m.heads)}")
    kvh = m.n_kv_heads
    if kvh % lay.tp and lay.tp % kvh:
        _fail(
            "layout.tp",
            lay.tp,
            f"must divide model.kv_heads={kvh} (K/V heads split) or be a multiple of it (K/V heads replicated); "
            f"valid: {', '.join(str(t) for t in range(1, m.heads + 1) if m.heads % t == 0 and (kvh % t == 0 or t % kvh == 0))}",
        )
    for name in ("shared_hidden", "dense_hidden") if lay.folded else ("expert_hidden", "shared_hidden", "dense_hidden"):
        width = getattr(m, name)
        if width and width % lay.tp:
            _fail("layout.tp", lay.tp, f"must divide model.{name}={width}; valid: {_divisors(width)}")
    if run.seq_len % lay.tp:
        _fail("run.seq_len", run.seq_len, f"must be divisible by layout.tp={lay.tp} (sequence parallelism)")
    if run.seq_len > m.max_seq_len:
        _fail("run.seq_len", run.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
    if m.attention_impl == "flash" and run.seq_len > m.attention_block and run.seq_len % m.attention_block:
        _fail("run.seq_len", run.seq_len, f"must be a multiple of model.attention_block={m.attention_block} with "
              f"model.attention_impl='flash' (or at most one block); valid block sizes: {_divisors(run.seq_len)}")  # fmt: skip
    shards = lay.dp * lay.ep * lay.microbatches
    if run.batch % shards:
        _fail(
            "run.batch",
            run.batch,
            f"must be divisible by layout.dp x layout.ep x layout.microbatches = "
            f"{lay.dp} x {lay.ep} x {lay.microbatches} = {shards}",
        )
    if lay.repeats > 1 and lay.microbatches % lay.pp:
        _fail(
            "layout.microbatches",
            lay.microbatches,
            f"a circular schedule (layout.repeats={lay.repeats}) needs a multiple of layout.pp={lay.pp}",
        )
    if lay.schedule == "1f1b" and lay.microbatches < lay.pp:
        _fail(
            "layout.microbatches",
            lay.microbatches,
            f"a 1f1b schedule needs at least layout.pp={lay.pp} (with fewer it never reaches its steady state and "
            f"stashes more than GPipe keeps); valid: >= {lay.pp}, or layout.schedule=gpipe",
        )
    if lay.schedule == "1f1b" and lay.remat == "none":
        _fail(
            "layout.remat",
            lay.remat,
            "a 1f1b schedule recomputes each chunk from its stashed input; valid: tick or layer",
        )
    return cfg


def _check_stage_layers(m: ModelConfig, lay: LayoutConfig) -> None:
    counts = lay.stage_layers
    pipelined = m.layers - m.dense_layers
    if len(counts) != lay.pp:
        _fail("layout.stage_layers", list(counts), f"needs one count per stage: {lay.pp} numbers (layout.pp={lay.pp})")
    if lay.repeats > 1:
        _fail("layout.stage_layers", list(counts), f"uneven stages need layout.repeats=1, not {lay.repeats}")
    if any(c < 1 or c % m.moe_every for c in counts):
        unit = f" multiples of model.moe_every={m.moe_every}" if m.moe_every > 1 else ""
        _fail("layout.stage_layers", list(counts), f"every stage needs a positive layer count{unit}")
    if sum(counts) != pipelined:
        _fail(
            "layout.stage_layers",
            list(counts),
            f"sums to {sum(counts)}; the pipelined layers are model.layers - model.dense_layers = {m.layers} - "
            f"{m.dense_layers} = {pipelined}",
        )


def stage_units(cfg: Config) -> tuple[int, ...]:
    """The units each pipeline stage holds: layout.stage_layers in units, or U / pp each."""
    m, lay = cfg.model, cfg.layout
    if lay.stage_layers:
        return tuple(c // m.moe_every for c in lay.stage_layers)
    return (m.units // lay.pp,) * lay.pp


def uneven_units(cfg: Config) -> tuple[int, ...]:
    """The units each stage holds where the stages are uneven (layout.stage_layers); () for equal stages."""
    return stage_units(cfg) if cfg.layout.stage_layers else ()


@functools.lru_cache(maxsize=4096)  # (the layout search asks for it hundreds of thousands of times)
def storage_model(cfg: Config) -> ModelConfig:
    """The model as the mesh stores it: with uneven stages every stage holds as many units as the largest (the others
    padded with units that are never applied: their output is their input), so the stacked units are pp x max."""
    m, lay = cfg.model, cfg.layout
    if lay.vocab_parallel and m.vocab % lay.vocab_shards:  # the vocabulary split: padded to a multiple of the split
        m = dataclasses.replace(m, vocab=padded_vocab(cfg))
    if not lay.stage_layers:
        return m
    return dataclasses.replace(m, layers=m.dense_layers + lay.pp * max(stage_units(cfg)) * m.moe_every)


def padded_vocab(cfg: Config) -> int:
    """The vocabulary as stored: model.vocab, or split (layout.vocab_split) the next multiple of the split. The
    padding rows of the embedding are never looked up (token ids are checked against model.vocab where data enters)
    and the padding columns of the head are masked out of the cross-entropy and cut from served logits, so they get
    no gradient and stay zero; checkpoints and exports hold model.vocab rows only."""
    v, n = cfg.model.vocab, cfg.layout.vocab_shards
    return -(-v // n) * n


def masked_vocab(cfg: Config) -> int:
    """model.vocab where the stored vocabulary is padded past it (the ids the loss masks and served logits cut at),
    else 0: nothing to mask."""
    return cfg.model.vocab if padded_vocab(cfg) != cfg.model.vocab else 0


def _check_architecture(m: ModelConfig) -> None:
    """The model's own cross-field rules (no layout involved)."""
    if m.attention == "mla":
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, name) < 1:
                _fail(f"model.{name}", getattr(m, name), "must be a positive integer with model.attention=mla")
        if m.qk_rope_head_dim % 2:
            _fail("model.qk_rope_head_dim", m.qk_rope_head_dim, "must be even (RoPE rotates pairs of dimensions)")
        if m.kv_heads or m.qk_norm != "none" or m.qkv_bias:
            name, v = next((n, getattr(m, n)) for n in ("kv_heads", "qk_norm", "qkv_bias") if getattr(m, n))
            _fail(f"model.{name}", v, "is a multi-head attention option; with model.attention=mla leave it unset")
    else:
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, name):
                _fail(
                    f"model.{name}", getattr(m, name), "is a latent-attention size; set model.attention=mla to use it"
                )
    if m.head_dim % 2 and m.attention == "mha":
        _fail("model.head_dim", m.head_dim, "must be even (RoPE rotates pairs of dimensions)")
    if m.kv_heads and m.heads % m.kv_heads:
        _fail("model.kv_heads", m.kv_heads, f"must divide model.heads={m.heads}; valid: {_divisors(m.heads)}")
    if m.dense_layers >= m.layers:
        _fail("model.dense_layers", m.dense_layers, f"must be < model.layers={m.layers} (at least one MoE layer)")
    if (m.layers - m.dense_layers) % m.moe_every:
        _fail(
            "model.moe_every",
            m.moe_every,
            f"must divide model.layers - model.dense_layers = {m.layers} - {m.dense_layers} = "
            f"{m.layers - m.dense_layers} (the stack repeats units of moe_every - 1 dense layers and one MoE layer); "
            f"valid: {_divisors(m.layers - m.dense_layers)}",
        )
    if (m.dense_layers or m.moe_every > 1) and not m.dense_hidden:
        _fail(
            "model.dense_hidden", m.dense_hidden, "must be > 0: the model has dense layers (dense_layers or moe_every)"
        )
    if m.shared_gate and not m.shared_hidden:
        _fail("model.shared_gate", m.shared_gate, "needs a shared expert (model.shared_hidden > 0)")
    if m.experts % m.expert_groups:
        _fail(
            "model.expert_groups",
            m.expert_groups,
            f"must divide model.experts={m.experts}; valid: {_divisors(m.experts)}",
        )
    if m.group_top_k > m.expert_groups:
        _fail("model.group_top_k", m.group_top_k, f"must be in 1..model.expert_groups={m.expert_groups}")
    reachable = m.group_top_k * (m.experts // m.expert_groups)
    if m.top_k > reachable:
        _fail(
            "model.top_k",
            m.top_k,
            f"must be <= model.group_top_k x experts per group = {m.group_top_k} x {m.experts // m.expert_groups} "
            f"= {reachable} (the experts a token can reach)",
        )


def check_devices(layout: LayoutConfig, devices: int) -> None:
    """The mesh must use every device it is given: pp x dp x ep x tp == devices."""
    if layout.devices != devices:
        raise ConfigError(
            f"devices={devices}: layout pp x dp x ep x tp = {' x '.join(map(str, layout.shape))} = {layout.devices} "
            f"devices; run on {layout.devices} devices or pick a layout whose axes multiply to {devices}"
        )


# ----------------------------------------------------------------------------------------------------- loading


def _coerce(field: str, value: Any, typ: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        _fail(field, value, "expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(field, value, "expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(field, value, "expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # `expert_tp: 1` in YAML or on a command line
            return str(value)
        _fail(field, value, "expected a string")
    if typ == tuple[int, ...]:
        if isinstance(value, str):  # "2,2,2,1" on a command line
            try:
                value = [int(v) for v in value.replace(" ", "").strip("[]()").split(",") if v]
            except ValueError:
                _fail(field, value, "expected a list of integers, e.g. [2, 2, 2, 1]")
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        _fail(field, value, "expected a list of integers, e.g. [2, 2, 2, 1]")
    return value


def _replace(obj: Any, section: str, updates: Mapping[str, Any]) -> Any:
    cls = type(obj)
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in updates.items():
        if key not in names:
            _fail(f"{section}.{key}", value, f"unknown key; valid {section} keys: {', '.join(names)}")
    coerced = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in updates.items()}
    return dataclasses.replace(obj, **coerced)


def read_yaml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what}={path!r}: no such file")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{what}={path!r}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}={path!r}: the file must hold a YAML mapping of keys, found a {type(data).__name__}")
    return data


def apply_sections(cfg: Config, data: Mapping[str, Any], origin: str) -> Config:
    for section, values in data.items():
        if section not in SECTIONS:
            _fail(f"{origin}: {section}", values, f"unknown section; valid: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            _fail(f"{origin}: {section}", values, "must be a mapping of keys")
        cfg = dataclasses.replace(cfg, **{section: _replace(getattr(cfg, section), section, values)})
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """'model.top_k=1' -> ('model', 'top_k', 1). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. model.top_k=1 or layout.ep=4")
    key, raw = text.split("=", 1)
    if key.count(".") != 1:
        raise ConfigError(f"override {text!r}: expected section.key=value with section in {', '.join(SECTIONS)}")
    section, name = key.split(".")
    if section not in SECTIONS:
        raise ConfigError(f"override {key}={raw!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_layout(path: str | os.PathLike) -> LayoutConfig:
    data = read_yaml(path, "--layout")
    if "layout" in data and isinstance(data["layout"], dict) and len(data) == 1:
        data = data["layout"]
    elif "devices" in data and "layout" in data:
        raise ConfigError(
            f"--layout={os.fspath(path)!r}: an assignment file (what `moe-jax mesh --json` writes), "
            "not a layout; give the layout's YAML (its keys pp, dp, ep, tp, ...), e.g. meshes/NAME.yaml"
        )
    elif set(data) & {"model", "run"}:
        raise ConfigError(
            f"--layout={os.fspath(path)!r}: a model config (sections {', '.join(sorted(data))}), not "
            "a layout; pass it as --config, and a layout (pp, dp, ep, tp, ...) as --layout"
        )
    return _replace(LayoutConfig(), "layout", data)


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Applies key=value overrides in order (unchecked: call load.check_with_model after)."""
    for text in overrides:
        section, name, value = parse_override(text)
        cfg = dataclasses.replace(cfg, **{section: _replace(getattr(cfg, section), section, {name: value})})
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


# What `moe-jax` runs when given no --config and no --layout: the seed's model on the seed's 128 devices as they can
# really be laid out (pp 4, ep 16, tp 2), 8 microbatches.
SEED_128 = LayoutConfig(pp=4, ep=16, tp=2, microbatches=8, devices_per_host=8, name="seed-128")
EMBEDDED_DEFAULT = Config(layout=SEED_128)
