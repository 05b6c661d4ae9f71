"""The analytic model of a layout: parameters, per-device memory by part, FLOPs, collectives with the links they
cross, and the step time split into compute, communication and bubble.

The collectives are `collectives.expected_collectives`, the list the HLO audit checks the compiled program against,
so the planner's bytes per collective kind are the compiler's; the parameters each device holds are the abstract
model's shards (`model.params.param_shards`). Memory and FLOPs are checked against the compiled train step
(tests/test_plan.py, docs/planner-accuracy.md); docs/planner.md says what each term stands for.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from moe_jax.collectives import DTYPE_BYTES, bytes_by_kind, expected_collectives, local_sizes
from moe_jax.config import Config, storage_model
from moe_jax.model.params import active_params_per_token, param_kind, param_shards, total_params
from moe_jax.parallel.schedule import Schedule, schedule_of
from moe_jax.plan.hardware import Hardware
from moe_jax.sharding import MESH_AXES

GIB = 2**30

# What XLA keeps beyond the model's own arithmetic, read off compiled programs' buffer assignments: each figure once,
# with where it was measured (docs/planner.md tells each story).
MEASURED = {
    # an expert FFN's hidden and its activation's intermediates kept for the backward pass (the seed's grid; the presets)
    "hidden_copies": {"gelu": 6, "swiglu": 7},
    # fp32 [E, rows, d] buffers of the expert FFN's backward (SwiGLU: its two input matrices' gradients)
    "expert_grad_rows": {"gelu": 2, "swiglu": 3},
    # logits-sized buffers of the loss head's backward; two when the loss scan has one trip (OLMoE-1B-7B on 64
    # devices, capacity factor 0.25)
    "logit_copies": 3,
    "logit_copies_one_microbatch": 2,
    # GPipe's fp32 pipeline buffers of M microbatch activations: outputs, their gradient, the stage input; circular:
    # the wrap-around and its gradient; dense first layers: their input and their output's gradient (DeepSeek-V3 on
    # 2048 fake devices)
    "pipeline_buffers": 3,
    "pipeline_buffers_circular": 2,
    "pipeline_buffers_dense_first": 2,
    # 1F1B: activations and cotangents in flight and the forward slot's input and output (seed-128; OLMoE-64)
    "pipeline_buffers_1f1b": 6,
    # 1F1B's loss head: fp32 logits-sized buffers, with the head whole (seed-128: four in bf16, and one head-sized
    # buffer more in fp16) and with the vocabulary split (seed-128 fp16; OLMoE-64 and Qwen1.5-MoE-64 in bf16)
    "logit_buffers_1f1b": 4,
    "split_logit_buffers_1f1b": 3,
    # flash attention's backward: fp32 [B, H, block, block] buffers of one block pair (seed-128, 2048-16384)
    "flash_pair_buffers": 4,
}


def local_params(cfg: Config) -> dict[str, int]:
    """Parameters one device holds, by kind, from the parameter tree and the rules table (units split over pp,
    experts over ep, heads, K/V heads where tp divides them and every FFN hidden dimension over tp; the dense first
    layers, embedding, head and final norm on every stage)."""
    return dict(_local_params(cfg))


@functools.lru_cache(maxsize=4096)  # (a layout search plans each candidate's parameters three times)
def _local_params(cfg: Config) -> dict[str, int]:
    out = dict.fromkeys(("experts", "attention", "router", "norms", "shared", "dense", "embedding", "head"), 0)
    for p in param_shards(cfg):
        out[param_kind(p["path"])] += p["local"]
    return out


def stacked_local_params(cfg: Config) -> int:
    """The stage's stacked units (`blocks`, `dense_blocks`): what its layer scan reads and differentiates."""
    return sum(p["local"] for p in param_shards(cfg) if p["path"].split("/")[0] in ("blocks", "dense_blocks"))


def prologue_local_params(cfg: Config) -> int:
    return sum(p["local"] for p in param_shards(cfg) if p["path"].startswith("prologue/"))


def compiled_dtype_bytes(dtype: str, backend: str) -> int:
    """Bytes per element of the compute dtype as the compiler stores it: XLA:CPU has no bf16 arithmetic and keeps
    bf16 intermediates in fp32 (its float normalisation), so a plan checked against a CPU compile (`backend="cpu"`)
    counts 4 bytes there; accelerators store 2."""
    if dtype == "bf16" and backend == "cpu":
        return 4
    return DTYPE_BYTES[dtype]


def attention_dims(cfg: Config) -> dict[str, int]:
    """Per device and attention layer: `weights`, the elements of its projections (so 2 x weights FLOPs per row of
    the gathered sequence); `acts`, the elements per row its backward keeps (q, k, v and o over the local heads, and
    with latent attention the latent, the query's latent and the expanded K/V); `qk` and `v`, the widths scores and
    weighted values are taken at. Latent attention's latent projections are whole on every tp rank."""
    m, lay = cfg.model, cfg.layout
    h_loc, d = m.heads // lay.tp, m.d_model
    if m.attention == "mla":
        qk, vd, nope = m.qk_head_dim, m.v_head_dim, m.qk_nope_head_dim
        r_q, r, p = m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim
        query = d * r_q + r_q * h_loc * qk if r_q else d * h_loc * qk
        weights = query + d * (r + p) + r * h_loc * (nope + vd) + h_loc * vd * d
        acts = h_loc * (2 * qk + 2 * vd) + (r + p) + r_q + h_loc * (nope + vd)
        return {"weights": weights, "acts": acts, "qk": qk, "v": vd}
    hd, g = m.head_dim, kv_heads_computed(cfg)
    return {"weights": (2 * h_loc + 2 * g) * d * hd, "acts": (2 * h_loc + 2 * g) * hd, "qk": hd, "v": hd}


def cache_per_token_layer(cfg: Config) -> int:
    """Cached values per token and layer on one device: k and v of the K/V heads it caches, or with latent
    attention the latent and the RoPE key (kv_lora_rank + qk_rope_head_dim, whole on every tp rank)."""
    m, lay = cfg.model, cfg.layout
    if m.attention == "mla":
        return m.kv_lora_rank + m.qk_rope_head_dim
    g_cache = m.n_kv_heads // lay.tp if m.n_kv_heads % lay.tp == 0 else 1
    return 2 * g_cache * m.head_dim


def _attention_residuals(cfg: Config, backend: str) -> dict[str, int]:
    """One attention layer's residuals, bytes per device: the fp32 residual stream (the block's input, the norms'
    inputs and outputs), q, k, v and o over the local heads, the gathered sequence, and the scores when the sequence
    is one attention block."""
    m, run = cfg.model, cfg.run
    loc = local_sizes(cfg)
    db = compiled_dtype_bytes(run.dtype, backend)
    b, big_s, d = loc["batch"], run.seq_len, m.d_model
    flash = is_flash(cfg)
    single_block = not flash and attention_block(cfg) == big_s
    return {
        "residual_stream": 5 * b * loc["seq"] * d * 4,
        "q_k_v_o": b * big_s * attention_dims(cfg)["acts"] * db,
        "gathered_sequence": b * big_s * d * db,
        # blockwise in one block: the scores and probabilities; flash: the log-sum-exp of each query row (fp32)
        "scores": b * loc["heads"] * big_s * big_s * (4 + db) if single_block else 0,
        "log_sum_exp": b * loc["heads"] * big_s * 4 if flash else 0,
    }


def is_flash(cfg: Config) -> bool:
    return cfg.model.attention_impl == "flash"


def attention_block(cfg: Config) -> int:
    """The rows of one attention block the training step runs: model.attention_block where the sequence is a longer
    multiple of it, else the whole sequence (blockwise then scores it in one block; flash's config check refuses a
    longer sequence that the block does not divide)."""
    s, blk = cfg.run.seq_len, cfg.model.attention_block
    return blk if s > blk and s % blk == 0 else s


def layer_residuals(cfg: Config, backend: str = "accelerator") -> dict[str, int]:
    """What the backward pass of one layer run needs from its forward (JAX's residuals, bytes per device), when the
    layer is not rematerialised: read off the compiled programs (docs/planner.md), one term per tensor kind."""
    m, lay, run = cfg.model, cfg.layout, cfg.run
    loc = local_sizes(cfg)
    db = compiled_dtype_bytes(run.dtype, backend)
    t, e_loc, f_loc, d = loc["tokens"], loc["experts"], loc["hidden"], m.d_model
    rows = lay.tp * lay.ep * loc["capacity"]  # an expert's buffer rows after the all-to-all and the tp gather
    copies = MEASURED["hidden_copies"][m.ffn]
    shared_loc = m.shared_hidden // lay.tp
    weights = m.ffn_matrices * e_loc * d * f_loc + attention_dims(cfg)["weights"] + m.ffn_matrices * d * shared_loc
    return {
        "expert_rows": e_loc * rows * (d + copies * f_loc) * db,  # the gathered input, the hidden's terms
        **_attention_residuals(cfg, backend),
        "weights_in_compute_dtype": weights * db,
        "combine": t * m.top_k * d * db,
        "router": 2 * t * m.experts * 4 + d * m.experts * 4,
        "shared_expert": loc["batch"] * run.seq_len * copies * shared_loc * db,
        # a unit's dense layers (moe_every - 1 of them), each as `dense_layer_residuals`
        "dense_layers_of_the_unit": (m.moe_every - 1) * dense_layer_residuals(cfg, backend),
    }


def dense_layer_residuals(cfg: Config, backend: str = "accelerator") -> int:
    """One dense layer's residuals when it is not rematerialised: attention's (as a MoE layer's) and a dense FFN's
    on the gathered sequence (its input, the hidden's terms, its weights in the compute dtype)."""
    m, lay, run = cfg.model, cfg.layout, cfg.run
    loc = local_sizes(cfg)
    db = compiled_dtype_bytes(run.dtype, backend)
    f_loc = m.dense_hidden // lay.tp
    ffn = loc["batch"] * run.seq_len * (m.d_model + MEASURED["hidden_copies"][m.ffn] * f_loc) * db
    weights = (attention_dims(cfg)["weights"] + m.ffn_matrices * m.d_model * f_loc) * db
    return sum(_attention_residuals(cfg, backend).values()) + ffn + weights


def stage_cached_layers(cfg: Config) -> int:
    """Layers whose KV cache one stage holds: its units' layers, and the dense first layers (every stage)."""
    m, lay = cfg.model, cfg.layout
    return storage_model(cfg).units // lay.pp * m.moe_every + m.dense_layers


def kv_heads_computed(cfg: Config) -> int:
    """K/V heads one device projects: kv_heads / tp when tp divides them; else one (all of them where QK-norm spans
    the projection)."""
    m, tp = cfg.model, cfg.layout.tp
    kv = m.n_kv_heads
    if kv % tp == 0:
        return kv // tp
    return kv if m.qk_norm == "projection" else 1


def memory(cfg: Config, step: str = "train", backend: str = "accelerator") -> dict[str, Any]:
    """Per-device bytes of the train step by part, as XLA counts them (arguments + temporaries at their peak).

    The arguments (parameters, AdamW moments, the batch) are held all step. The temporaries are held from the forward
    pass to the update (the gradients, the residuals kept for the backward pass, the pipeline's buffers, two weight
    copies) plus the largest of the working sets of the backward pass's phases: the loss head (its fp32 logits) or a
    layer (its recomputed residuals and its backward's temporaries). `peak_phase` names the larger. See docs/planner.md
    for each term and the compiled buffers it stands for; `moe-jax plan --check` compares them."""
    m, lay = cfg.model, cfg.layout
    loc = local_sizes(cfg)
    p_loc = sum(local_params(cfg).values())
    sched = schedule_of(cfg)
    runs = sched.ticks * sched.layers_per_chunk
    bsd = loc["batch"] * loc["seq"] * m.d_model * 4  # one microbatch's fp32 residual stream on one device
    res = sum(layer_residuals(cfg, backend).values())
    saved = {"layer": runs * bsd, "tick": sched.ticks * bsd, "none": runs * res}[lay.remat]
    # The dense first layers, every microbatch on every stage: a checkpointed layer's input each, or (not
    # rematerialised) each layer's residuals, taken as a dense unit layer's.
    first = lay.microbatches * m.dense_layers
    if first:
        saved += first * (bsd if lay.remat == "layer" else dense_layer_residuals(cfg, backend))
    p_layers = stacked_local_params(cfg)  # the stage's stacked units
    head = m.d_model * loc["vocab"]  # the head (or the tied embedding) this device holds
    head_ws = _head_working_set(cfg, head, backend)
    head_grads = 4 * p_loc - 4 * head
    layer = _layer_working_set(cfg, sched, res, backend)
    base, expert_bwd, attn_bwd, mask = layer["base"], layer["expert_bwd"], layer["attn_bwd"], layer["mask"]
    layer_ws = base + max(expert_bwd, attn_bwd)
    if is_flash(cfg):
        # XLA starts flash's backward (its zeroed fp32 accumulators, its inputs) while the expert FFN's backward still
        # holds its buffers: both are alive at the peak (seed-512 and seed-128, remat tick, 10240 positions)
        layer_ws = base + expert_bwd + attn_bwd
    elif lay.schedule == "1f1b":
        # 1F1B makes the causal mask of every score block once, outside the tick loop: it is alive beside the expert
        # FFN's backward too (OLMoE-64, whose peak is a layer's backward once the vocabulary is split)
        layer_ws = base + max(expert_bwd + mask, attn_bwd)
    if lay.schedule == "1f1b":
        return _memory_1f1b(cfg, sched, p_loc, bsd, head, p_layers, layer_ws, layer["expert_rows"], mask, backend)
    # One tick (no pipeline, one microbatch): XLA drops the one-trip tick loop, and with it the second copy of the
    # stacked gradients and the pipeline's buffers.
    one_tick = sched.ticks == 1
    layer_grads = 4 * p_loc + (0 if one_tick else 4 * p_layers) - 4 * head
    head_peak = head_ws + head_grads >= layer_ws + layer_grads
    out: dict[str, Any] = {
        "parameters": 4 * p_loc,
        "optimizer_state": moment_bytes(cfg) * optimizer_params(cfg),
        "batch": 2 * lay.microbatches * loc["batch"] * loc["seq"] * 4,
        # With pp > 1 XLA copies the head and the final norm (the loss scan reads them; the update writes the
        # donated buffers in place) and keeps their gradients in the freed argument buffers; with pp = 1 it makes no
        # copy and their gradients are temporaries. The same bytes either way.
        "head_copy_or_gradient": 4 * (head + m.d_model),
        "gradients": head_grads if head_peak else layer_grads,
        "saved_for_backward": saved,
        "pipeline_buffers": 0 if one_tick else _pipeline_buffers(cfg) * lay.microbatches * bsd,
        "logits": head_ws if head_peak else 0,
        "layer_working_set": 0 if head_peak else layer_ws,
    }
    out["peak_phase"] = "the loss head's backward" if head_peak else "a layer's backward"
    out["total"] = sum(v for k, v in out.items() if k != "peak_phase")
    return out


def _pipeline_buffers(cfg: Config) -> int:
    """GPipe's fp32 buffers of M microbatch activations (MEASURED: outputs, their gradient, the stage input; the
    wrap-around's when circular; the dense first layers' input and output gradient)."""
    lay = cfg.layout
    circular = MEASURED["pipeline_buffers_circular"] if lay.repeats > 1 else 0
    first = MEASURED["pipeline_buffers_dense_first"] if cfg.model.dense_layers else 0
    return MEASURED["pipeline_buffers"] + circular + first


def _head_working_set(cfg: Config, head: int, backend: str) -> int:
    """The loss head's backward, one microbatch at a time: its fp32 logits-sized buffers (the logits, their
    log-softmax and their gradient), the head in the compute dtype and the head's gradient being made (counted here,
    not under gradients). With the vocabulary split, one of the buffers (the logits' gradient, cast for the head's
    backward matmul) is in the compute dtype and the head's gradient is alone."""
    one_trip = cfg.layout.microbatches == 1
    copies = MEASURED["logit_copies_one_microbatch"] if one_trip else MEASURED["logit_copies"]
    if cfg.layout.vocab_parallel:
        return split_head_bytes(cfg, copies, backend) * logits_elements(cfg) + 4 * head
    return copies * logits_elements(cfg) * 4 + 2 * 4 * head


def _layer_working_set(cfg: Config, sched: Schedule, res: int, backend: str) -> dict[str, int]:
    """A layer's backward: `base`, what the layers being differentiated keep (the tick's chunk when it is recomputed
    whole or never rematerialised; remat 'layer' recomputes one layer, whose residuals other than the expert rows stay
    alive through its backward), and the two candidates for the rest: the expert FFN's backward (fp32 gradients of its
    buffers and of its weights) and the attention's (fp32 score-block temporaries and, blockwise, the causal mask of
    every block, 1 byte each). `res`: one layer run's residuals."""
    m, lay, run = cfg.model, cfg.layout, cfg.run
    loc = local_sizes(cfg)
    rows = lay.tp * lay.ep * loc["capacity"]
    e_loc, f_loc, d = loc["experts"], loc["hidden"], m.d_model
    db = compiled_dtype_bytes(run.dtype, backend)
    expert_bwd = e_loc * rows * (2 * f_loc + MEASURED["expert_grad_rows"][m.ffn] * d) * 4 + 2 * e_loc * d * f_loc * 4
    if lay.remat == "layer":  # one more fp32 row buffer; with one local expert (2-D buffers, fused differently) XLA
        # also keeps the recomputed activation's tanh in the compute dtype
        expert_bwd += e_loc * rows * (d * 4 + (f_loc * db if e_loc == 1 else 0))
    s, b, h = run.seq_len, loc["batch"], loc["heads"]
    blk = attention_block(cfg)
    lr = layer_residuals(cfg, backend)
    recomputed = sum(lr[k] for k in ("residual_stream", "q_k_v_o", "gathered_sequence", "shared_expert"))
    chunk = sched.layers_per_chunk * res
    if is_flash(cfg):
        # flash's backward: fp32 accumulators of dq, dk and dv over the whole sequence and the rowsum of dO O; its
        # inputs, q, k and v copied out of the saved residuals, dO in fp32 and the gathered sequence's fp32 gradient;
        # one block pair's fp32 temporaries (scores, probabilities, their gradient); no mask outlives a pair
        ad = attention_dims(cfg)
        g = kv_heads_computed(cfg) if cfg.model.attention == "mha" else h
        qkv = b * s * (h * ad["qk"] + g * (ad["qk"] + ad["v"]))
        accumulators = qkv * 4 + b * h * s * 4
        inputs = qkv * db + b * s * (h * ad["v"] + d) * 4
        mask, attn_bwd = 0, accumulators + inputs + MEASURED["flash_pair_buffers"] * b * h * blk * blk * 4
    else:
        mask = b * h * s * s if blk < s else 0
        attn_bwd = b * h * s * 4 * blk * 4 + mask
    return {
        "base": {"layer": recomputed, "tick": chunk, "none": chunk}[lay.remat],
        "expert_bwd": expert_bwd,
        "attn_bwd": attn_bwd,
        "mask": mask,
        "expert_rows": e_loc * rows * d * 4,
    }


def logits_elements(cfg: Config) -> int:
    """One microbatch's logits on one device: [B/(M dp ep), S/tp, V], or with the vocabulary split over tp
    [B/(M dp ep), S, V/tp] (every token, this rank's columns)."""
    loc = local_sizes(cfg)
    return loc["batch"] * loc["head_seq"] * loc["vocab"]


def split_head_bytes(cfg: Config, copies: int, backend: str) -> int:
    """Bytes per logit of the vocabulary-parallel head's backward: `copies` logits-sized buffers, all fp32 but the
    logits' gradient cast for the head's matmul, which is in the compute dtype (bf16 on XLA:CPU too; fp16 dots are
    upcast there, so fp32)."""
    dtype = cfg.run.dtype
    cast = 4 if dtype == "fp32" or (dtype == "fp16" and backend == "cpu") else 2
    return 4 * (copies - 1) + cast


def moment_bytes(cfg: Config) -> int:
    """Bytes of AdamW's two moments per parameter, as stored (run.exp_avg_dtype, run.exp_avg_sq_dtype: fp32 4, bf16
    2 each; stored arrays keep their dtype on XLA:CPU too)."""
    return sum(DTYPE_BYTES[d] for d in (cfg.run.exp_avg_dtype, cfg.run.exp_avg_sq_dtype))


def optimizer_params(cfg: Config) -> int:
    """Per device, the parameters whose AdamW moments it holds: all it holds, or with layout.zero=1 its slice of
    each weight replicated over the batch axes (ZeRO-1; the fp32 weights themselves stay whole)."""
    return sum(p["zero_local"] for p in param_shards(cfg))


def _memory_1f1b(
    cfg: Config,
    sched: Schedule,
    p_loc: int,
    bsd: int,
    head: int,
    p_layers: int,
    layer_ws: int,
    expert_rows: int,
    mask: int,
    backend: str = "accelerator",
):
    """1F1B (parallel/one_f_one_b.py): nothing grows with M. Held all step: the fp32 gradient accumulators of every
    weight (the scan's carry), the stash ring (S slots of each unit's input under remat 'layer', of the chunk's input
    under 'tick'), the two activations in flight between stages and the slot outputs. At the peak, the larger of the
    last stage's loss head (one microbatch's fp32 logits and the three logits-sized buffers of its backward; in fp16
    one head-sized fp32 buffer more) and a backward slot's layer (the layer working set of GPipe's model, and under
    remat 'tick' the stage's stacked gradient the chunk's jax.vjp returns before it is added). See docs/planner.md."""
    lay, run = cfg.layout, cfg.run
    loc = local_sizes(cfg)
    segments = sched.layers_per_chunk if lay.remat == "layer" else 1
    # The loss head: fp32 logits-sized buffers (the logits, log-softmax's max and exp, the cross-entropy's gradient)
    # and with fp16's loss scaling one head-sized fp32 buffer more; with the vocabulary split, one of them in the
    # compute dtype and the head's gradient.
    if lay.vocab_parallel:
        head_ws = split_head_bytes(cfg, MEASURED["split_logit_buffers_1f1b"], backend) * logits_elements(cfg) + 4 * head
    else:
        fp16 = 4 * head if run.dtype == "fp16" else 0
        head_ws = MEASURED["logit_buffers_1f1b"] * logits_elements(cfg) * 4 + fp16
    # Under remat 'tick' the chunk's jax.vjp returns the stage's stacked gradient whole before it is added (a copy);
    # under 'layer' each unit's is added in place.
    stacked = 4 * p_layers if lay.remat == "tick" else 0
    layer_peak = stacked + layer_ws
    # Under remat 'tick' the recomputed chunk's backward and the loss head's working set are alive together (XLA keeps
    # the head's buffers through the slot, seed-128); under 'layer' they are not.
    head_peak = lay.remat == "tick" or head_ws >= layer_peak
    layer_too = lay.remat == "tick" or not head_peak
    out: dict[str, Any] = {
        "parameters": 4 * p_loc,
        "optimizer_state": moment_bytes(cfg) * optimizer_params(cfg),
        "batch": 2 * lay.microbatches * loc["batch"] * loc["seq"] * 4,
        "head_copy_or_gradient": 0,
        "gradients": 4 * p_loc + (stacked if layer_too else 0),
        "saved_for_backward": sched.stash_slots * segments * bsd,
        "pipeline_buffers": MEASURED["pipeline_buffers_1f1b"] * bsd,
        "logits": head_ws if head_peak else 0,
        # at the loss head's peak: the causal mask of every score block, made once outside the tick loop (blockwise
        # attention only), and one fp32 expert-rows buffer of a layer's backward (OLMoE-64)
        "layer_working_set": (layer_ws if layer_too else 0)
        + (0 if layer_too else expert_rows)
        + (0 if layer_too else mask),
    }
    out["peak_phase"] = "the loss head's backward" if head_peak else "a layer's backward"
    out["total"] = sum(v for k, v in out.items() if k != "peak_phase")
    return out


def flops(cfg: Config) -> dict[str, float]:
    """Matmul FLOPs per device per step. `total`: what the compiled program computes (bubble ticks, recomputed
    forwards, padded expert buffer rows and the masked half of every causal score block included); `scheduled`: the
    same without the bubble ticks; `useful`: the model's own FLOPs, the ones MFU counts (forward and backward once,
    the routed tokens' expert work, the causal half of attention); `lockstep`: what the step's time is made of, each
    tick as long as its busiest stage (GPipe: `total`; 1F1B: `total` counts every slot of its program, the skipped
    ones included, as the HLO holds them; its time is v M + pp - 1 ticks of one forward and one backward)."""
    m, lay, run = cfg.model, cfg.layout, cfg.run
    loc = local_sizes(cfg)
    sched = schedule_of(cfg)
    one_f_one_b = lay.schedule == "1f1b"
    rows = loc["batch"] * run.seq_len  # after the tp all-gather
    ad = attention_dims(cfg)
    mats = m.ffn_matrices
    t, d = loc["tokens"], m.d_model
    proj = 2 * rows * ad["weights"]  # q and o over the local heads, k and v over the K/V heads computed (or MLA's)
    # scores (at the q/k width) and weighted values (at the value width)
    scores = 2 * loc["batch"] * loc["heads"] * run.seq_len * run.seq_len * (ad["qk"] + ad["v"])
    router = 2 * t * d * m.experts
    experts = 2 * mats * loc["experts"] * lay.tp * lay.ep * loc["capacity"] * d * loc["hidden"]  # every buffer row
    if m.dispatch == "ragged":  # grouped matmuls over the routed rows only: k T tp per device (all tokens routed; as
        # balanced on average). XLA:CPU lowers ragged_dot dense (E-fold): a CPU compile counts more (docs/planner.md).
        experts = 2 * mats * m.top_k * t * loc["expert_gather"] * d * loc["hidden"]
    combine = 2 * t * m.top_k * d  # the gate-weighted sum of each token's expert outputs
    shared = 2 * mats * rows * d * (m.shared_hidden // lay.tp) + (2 * t * d if m.shared_gate else 0)
    dense_ffn = 2 * mats * rows * d * (m.dense_hidden // lay.tp)
    passes = 4 if lay.remat != "none" else 3  # forward, backward (2x), and the recomputed forward
    attention = proj * passes + _score_flops(cfg, scores, passes)
    dense_layer = attention + passes * dense_ffn
    # A unit: its MoE layer and its moe_every - 1 dense layers.
    per_run = attention + passes * (router + experts + combine + shared) + (m.moe_every - 1) * dense_layer
    # The dense first layers: every microbatch on every stage, rematerialised only under remat 'layer'.
    first_passes = 4 if lay.remat == "layer" else 3
    first = (
        lay.microbatches
        * m.dense_layers
        * ((proj + dense_ffn) * first_passes + _score_flops(cfg, scores, first_passes))
    )
    runs = sched.ticks * sched.layers_per_chunk
    head_mm = 2 * loc["batch"] * loc["head_seq"] * d * loc["vocab"]  # one microbatch's logits on this device
    head = head_mm * lay.microbatches * 4  # per microbatch, checkpointed: forward twice, backward
    if one_f_one_b:  # per slot: the head under jax.vjp (forward, backward), the first layers forward then under vjp
        first = first // lay.microbatches
        head = head_mm * 3
        total = per_run * runs + (head + first) * sched.ticks
        lockstep = per_run * sched.time_ticks * sched.layers_per_chunk + (head + first) * lay.microbatches
        scheduled = per_run * sched.useful_ticks * sched.layers_per_chunk + (head + first) * lay.microbatches
        first, head = first * lay.microbatches, head * lay.microbatches  # for the useful count below
    else:
        total = lockstep = per_run * runs + head + first
        scheduled = per_run * sched.useful_ticks * sched.layers_per_chunk + head + first
    useful_unit = (
        proj
        + scores / 2
        + router
        + 2 * mats * m.top_k * t * d * m.expert_hidden
        + shared
        + (m.moe_every - 1) * (proj + scores / 2 + dense_ffn)
    )
    # Useful work counts the dense first layers once per token (on stage 0), not on every stage.
    useful_first = lay.microbatches * m.dense_layers * (proj + scores / 2 + dense_ffn) / lay.pp
    useful = (
        3 * useful_unit * sched.useful_ticks * sched.layers_per_chunk
        + 3 * useful_first
        + 3 * 2 * t * d * m.vocab * lay.microbatches
    )
    return {"total": float(total), "scheduled": float(scheduled), "useful": float(useful), "lockstep": float(lockstep)}


def _score_flops(cfg: Config, scores: int, passes: int) -> int:
    """One attention layer run's score and weighted-value FLOPs (`scores`: both over the whole S x S square, once).
    Blockwise: `passes` times the square, and each checkpointed query block's backward recomputes its q k^T once
    more (not the weighted values). Flash: only the n(n+1)/2 causal block pairs of n x n, forward (twice when
    recomputed) q k^T and P V, backward five products (q k^T again, dO V^T, P^T dO, dS K, dS^T Q)."""
    blk = attention_block(cfg)
    if not is_flash(cfg):
        return passes * scores + (scores // 2 if blk < cfg.run.seq_len else 0)
    n = cfg.run.seq_len // blk
    ad = attention_dims(cfg)
    pair = scores // (n * n) // (ad["qk"] + ad["v"])  # 2 B H block^2: one product of unit width
    pairs = n * (n + 1) // 2
    forwards = passes - 2
    return pairs * pair * (forwards * (ad["qk"] + ad["v"]) + 3 * ad["qk"] + 2 * ad["v"])


def collectives(cfg: Config, hw: Hardware | None = None, step: str = "train", latency: bool = False) -> list[dict]:
    """The expected collectives (training's, or serving's for step prefill / decode) with their group size, the link
    they cross and (given hardware) their seconds per step: ring wire bytes over that link's bandwidth, plus a fixed
    latency per collective when `latency`."""
    lay = cfg.layout
    sizes = dict(zip(MESH_AXES, lay.shape, strict=True))
    out = []
    groups: dict[tuple[str, ...], tuple[int, str]] = {}  # axes -> (group size, link), once per set of axes
    for row in expected_collectives(cfg, step):
        axes = tuple(row["axes"])
        if axes not in groups:
            cross = crosses_hosts(lay.shape, lay.devices_per_host, axes)
            groups[axes] = (math.prod(sizes[a] for a in axes), "inter-host" if cross else "intra-host")
        g, link = groups[axes]
        priced = dict(row, group_size=g, link=link)
        if hw is not None:
            bw = hw.inter_host_bandwidth if link == "inter-host" else hw.intra_host_bandwidth
            per = _wire_bytes(row["kind"], row["bytes_per_device"], g) / bw + (LATENCY_S[link] if latency else 0.0)
            priced["seconds"] = row["count_per_step"] * per
        out.append(priced)
    return out


@functools.lru_cache(maxsize=4096)
def crosses_hosts(shape: tuple[int, ...], devices_per_host: int, axes: tuple[str, ...]) -> bool:
    """Whether some group over `axes` spans two hosts, with the planned devices: ids row-major over the mesh, host
    = id // devices_per_host (the assignment's rule for one process per host)."""
    host = (np.arange(math.prod(shape)) // devices_per_host).reshape(shape)
    along = [MESH_AXES.index(a) for a in axes]
    rest = [i for i in range(len(shape)) if i not in along]
    groups = host.transpose(rest + along).reshape(-1, math.prod(shape[i] for i in along))
    return bool((groups.min(axis=1) != groups.max(axis=1)).any())


def _wire_bytes(kind: str, operand: int, g: int) -> float:
    """Bytes one device sends for a ring implementation of the collective."""
    if kind == "all-gather":
        return operand * (g - 1)
    if kind in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):  # ragged: its buffer's worst case
        return operand * (g - 1) / g
    if kind == "all-reduce":
        return 2 * operand * (g - 1) / g
    return operand  # collective-permute


def _layout_row(lay) -> dict[str, Any]:
    keys = (
        "pp",
        "dp",
        "ep",
        "tp",
        "microbatches",
        "repeats",
        "stage_layers",
        "remat",
        "schedule",
        "zero",
        "expert_tp",
        "vocab_split",
        "devices",
    )
    return {k: getattr(lay, k) for k in keys}


def optimizer_sharding(cfg: Config) -> dict[str, dict[str, int]]:
    """Per device, the weights' bytes as the train step keeps them (`replicated`: fp32 master weights 4, fp32
    gradients 4 and AdamW's two moments 8 bytes per parameter held in fp32, 4 in bf16: `moment_bytes`) and as ZeRO-1 over the batch axes would
    (`zero1`: each weight's master copy and moments split over the (dp, ep) devices holding a replica of it, the
    experts over dp; a compute-dtype copy of every weight kept whole; the gradients whole, as ZeRO-1 reduce-scatters
    them only once they are made). moe_jax trains the first way with layout.zero=0; with layout.zero=1 it splits the
    moments as the second does but keeps the fp32 weights whole (its compute copy), which `memory` plans."""
    sizes = dict(zip(("pp", "dp", "ep", "tp"), cfg.layout.shape, strict=True))
    db = DTYPE_BYTES[cfg.run.dtype]
    out = {k: dict.fromkeys(("parameters", "gradients", "optimizer_state"), 0) for k in ("replicated", "zero1")}
    for p in param_shards(cfg):
        n = p["local"]
        r = math.prod(sizes[a] for a in ("dp", "ep") if a not in p["split"])
        out["replicated"]["parameters"] += 4 * n
        out["replicated"]["gradients"] += 4 * n
        out["replicated"]["optimizer_state"] += moment_bytes(cfg) * n
        out["zero1"]["parameters"] += 4 * n // r + db * n
        out["zero1"]["gradients"] += 4 * n
        out["zero1"]["optimizer_state"] += moment_bytes(cfg) * n // r
    for v in out.values():
        v["total"] = sum(v.values())
    return out


def ragged_rows(cfg: Config) -> dict[str, int]:
    """Ragged dispatch's expert rows per device and MoE layer run: the worst case its padded exchange holds (every
    token of every source to every local expert: E/ep x ep x tp x T, as dropless; the memory plan counts this) and the
    expected case under balanced routing (k T tp: each device's experts get their share of the routed pairs), with the
    bytes of the expert input rows in the compute dtype for each. A ragged all-to-all would move and hold the second."""
    m, lay = cfg.model, cfg.layout
    loc = local_sizes(cfg)
    db = DTYPE_BYTES[cfg.run.dtype]
    worst = loc["experts"] * lay.ep * lay.tp * loc["tokens"]
    expected = m.top_k * loc["tokens"] * loc["expert_gather"]
    return {"worst_case_rows": worst, "expected_rows": expected, "worst_case_bytes": worst * m.d_model * db,
            "expected_bytes": expected * m.d_model * db}  # fmt: skip


_COMM_SECONDS: dict[tuple[Config, Hardware], float] = {}  # a GPipe layout's communication time, for its 1F1B twin


def _comm_seconds(cfg: Config, hw: Hardware) -> float:
    if (cfg, hw) not in _COMM_SECONDS:
        _COMM_SECONDS[(cfg, hw)] = sum(r["seconds"] for r in collectives(cfg, hw))
    return _COMM_SECONDS[(cfg, hw)]


def plan(cfg: Config, hw: Hardware) -> dict[str, Any]:
    lay = cfg.layout
    sched = schedule_of(cfg)
    mem = memory(cfg)
    fl = flops(cfg)
    colls = collectives(cfg, hw)
    rate = hw.peak_flops * hw.mfu
    compute = fl["scheduled"] / rate
    bubble = (fl["lockstep"] - fl["scheduled"]) / rate
    comm = sum(r["seconds"] for r in colls)
    if lay.schedule == "gpipe" and len(_COMM_SECONDS) < 100_000:
        _COMM_SECONDS[(cfg, hw)] = comm
    if lay.schedule == "1f1b":
        # The rows are the program's (every slot, the skipped ones too: what the HLO holds); in time a 1F1B step
        # runs GPipe's v M + pp - 1 ticks of a forward and a backward, so it communicates what GPipe's does.
        twin = dataclasses.replace(cfg, layout=dataclasses.replace(lay, schedule="gpipe"))
        comm = _comm_seconds(twin, hw)  # the search plans the twin too: computed once
    total = compute + bubble + comm
    tokens = cfg.run.batch * cfg.run.seq_len
    return {
        "layout": _layout_row(lay),
        "hardware": hw.name,
        "params": {
            "total": total_params(cfg.model),
            "active_per_token": active_params_per_token(cfg.model),
            "per_device": sum(local_params(cfg).values()),
            "by_kind_per_device": local_params(cfg),
        },
        # From the active parameters alone (2 per multiply-add; training: forward and backward, 3 passes).
        "flops_per_token": {
            "forward": 2 * active_params_per_token(cfg.model),
            "train": 6 * active_params_per_token(cfg.model),
        },
        "memory_per_device_bytes": mem,
        "optimizer_sharding": optimizer_sharding(cfg),
        **({"ragged_rows": ragged_rows(cfg)} if cfg.model.dispatch == "ragged" else {}),
        "fits": mem["total"] <= hw.hbm_bytes,
        "hbm_bytes": hw.hbm_bytes,
        "flops_per_step": fl["total"],
        "flops_useful_per_step": fl["useful"],
        "collectives": colls,
        "bytes_by_kind": bytes_by_kind(colls),
        "schedule": {
            "kind": lay.schedule,
            "ticks": sched.ticks,
            "time_ticks": sched.time_ticks,
            "utilization": sched.utilization,
            "activation_slots": sched.activation_slots(),
        },  # fmt: skip
        "step_time_s": {"compute": compute, "comm": comm, "bubble": bubble, "total": total},
        "tokens_per_s": tokens / total,
        "mfu": fl["useful"] * lay.devices / total / (hw.peak_flops * lay.devices),
    }


# ------------------------------------------------------------------------------------------------------- serving

LATENCY_S = {"intra-host": 5e-6, "inter-host": 15e-6}  # per collective: what dominates a decode step's communication


def serve_memory(cfg: Config, step: str) -> dict[str, int]:
    """Per device for prefill or decode with a cache of run.seq_len positions (what `moe-jax compile` builds)."""
    m, lay, run = cfg.model, cfg.layout, cfg.run
    db = DTYPE_BYTES[run.dtype]
    lp = local_params(cfg)
    p_layers = stacked_local_params(cfg) + prologue_local_params(cfg)
    b_loc = run.batch // (lay.dp * lay.ep)
    bm = b_loc // lay.microbatches
    per_token = cache_per_token_layer(cfg)  # k and v of the K/V heads a device caches, or MLA's latent + RoPE key
    cache = stage_cached_layers(cfg) * b_loc * run.seq_len * per_token * db
    slice_ = bm * run.seq_len * per_token // 2  # one layer's k (or v) cache for one microbatch
    out = {
        "parameters": 4 * sum(lp.values()),
        "kv_cache": cache,
        # compute-dtype copies of the stage's weights and of the head; one layer's k and v cache slices, old and
        # new, upcast to fp32 for the attention
        "working_set": db * p_layers + db * m.d_model * local_sizes(cfg)["vocab"] + 4 * 4 * slice_,
    }
    # The expert FFN of one layer, dropless (C = every token of the microbatch, E x C buffer rows in all): its input
    # after the all-to-all (compute dtype), the hidden in fp32 and its activation in the compute dtype, and the fp32
    # output. In prefill (C = B/M x S) this is the peak; in decode (C = B/M) it is small.
    s = run.seq_len if step == "prefill" else 1
    rows = m.experts * bm * s
    f_loc = local_sizes(cfg)["hidden"]
    moe_peak = rows * m.d_model * db + rows * f_loc * (4 + db) + rows * m.d_model * 4
    out["working_set"] = max(out["working_set"], moe_peak)
    out["total"] = sum(out.values())
    return out


def serve_plan(cfg: Config, hw: Hardware, step: str = "decode") -> dict[str, Any]:
    """Prefill or one decode step: memory, time (the larger of compute and memory traffic, plus communication)."""
    m, lay, run = cfg.model, cfg.layout, cfg.run
    db = DTYPE_BYTES[run.dtype]
    sched = Schedule(lay.pp, lay.microbatches, lay.repeats, storage_model(cfg).units)
    runs = sched.ticks * sched.layers_per_chunk  # unit runs
    layer_runs = runs * m.moe_every + lay.microbatches * m.dense_layers  # every layer run, the first ones included
    s = run.seq_len if step == "prefill" else 1
    bm = run.batch // (lay.dp * lay.ep * lay.microbatches)
    tokens = bm * s  # per device and tick
    p_layers = stacked_local_params(cfg)
    mem = serve_memory(cfg, step)
    # Traffic: every tick reads the stage's fp32 weights for its chunk, each microbatch the dense first layers'; every
    # layer run reads its cache slice.
    chunk_weights = 4 * p_layers // lay.repeats
    cache_per_run = bm * run.seq_len * cache_per_token_layer(cfg) * db
    traffic = (
        sched.ticks * chunk_weights
        + lay.microbatches * 4 * prologue_local_params(cfg)
        + layer_runs * cache_per_run
        + 4 * m.d_model * local_sizes(cfg)["vocab"] * lay.microbatches
    )
    ad = attention_dims(cfg)
    f_loc = local_sizes(cfg)["hidden"]
    mats = m.ffn_matrices
    # scores and weighted values against the cache: MHA at the head width; MLA in the latent space (latent + RoPE
    # key, then the latent), its per-head expansions absorbed into q and o (the same count as `weights`)
    widths = ad["qk"] + ad["v"] if m.attention == "mha" else 2 * m.kv_lora_rank + m.qk_rope_head_dim
    attention = 2 * tokens * ad["weights"] + 2 * bm * (m.heads // lay.tp) * s * run.seq_len * widths
    ffn_dense = 2 * mats * tokens * m.d_model * (m.dense_hidden // lay.tp)
    ffn_moe = 2 * mats * tokens * m.d_model * (m.top_k * f_loc + m.shared_hidden // lay.tp)
    flops = layer_runs * attention + runs * ffn_moe + (layer_runs - runs) * ffn_dense
    flops += 2 * bm * lay.microbatches * m.d_model * local_sizes(cfg)["vocab"]
    rows = collectives(cfg, hw, step, latency=True)  # the serving audit's expected set (collectives.py)
    compute = flops / (hw.peak_flops * hw.mfu)
    memory_s = traffic / (hw.hbm_bandwidth * hw.hbm_efficiency)
    comm = sum(r["seconds"] for r in rows)
    total = max(compute, memory_s) + comm
    new_tokens = run.batch * (s if step == "prefill" else 1)
    return {
        "step": step,
        "layout": _layout_row(lay),
        "hardware": hw.name,
        "params": {"total": total_params(m), "active_per_token": active_params_per_token(m)},
        "memory_per_device_bytes": mem,
        "fits": mem["total"] <= hw.hbm_bytes,
        "hbm_bytes": hw.hbm_bytes,
        "flops_per_step": float(flops),
        "bytes_read_per_step": traffic,
        "collectives": rows,
        "step_time_s": {"compute": compute, "memory": memory_s, "comm": comm, "bubble": 0.0, "total": total},
        "tokens_per_s": new_tokens / total,
    }
