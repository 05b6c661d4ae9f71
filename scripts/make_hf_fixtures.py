"""Makes tests/fixtures/hf/<family>/: a tiny random model of each Hugging Face family built with transformers' own
config and model classes, saved with save_pretrained (safetensors), with transformers' fp32 logits and greedy
continuations for fixed prompts, and a word-level tokenizer made with the tokenizers package. Then it checks that
moe_jax's export is a real Hugging Face checkpoint: each fixture is imported on 8 fake CPU devices, exported,
loaded back by transformers, and its logits must equal the originals.

Needs the optional extra: pip install -e '.[hf]' (on a CPU-only machine install torch's CPU build first, e.g.
pip install torch==2.13.0). Usage: python scripts/make_hf_fixtures.py [--out tests/fixtures/hf] [--only mixtral]
The default test run reads the committed files and needs neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

PROMPTS, PROMPT_LEN, NEW = 8, 8, 8  # 8 prompts of 8 tokens, 8 greedy tokens each
TEXT_PROMPT = "ka lo mi su ra"
SEED = 1234

# Small enough to run in a second on CPU, large enough to split over 8 devices every way the tests do
# (pp 2, tp 4, ep 8): widths divisible by 4, 8 experts, 4 query heads over 2 K/V heads where the family has GQA.
COMMON = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
              initializer_range=0.1, hidden_act="silu", attn_implementation="eager")  # fmt: skip
FAMILIES = {
    "mixtral": dict(
        cls=("MixtralConfig", "MixtralForCausalLM"),
        config=dict(
            COMMON,
            num_hidden_layers=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_theta=1e6,
            sliding_window=None,
            router_jitter_noise=0.0,
            tie_word_embeddings=False,
        ),  # fmt: skip
        dtype="float32",
    ),
    "qwen3_moe": dict(  # head_dim 24 is not hidden / heads (as in Qwen3); QK-norm per head; tied embeddings;
        # MoE every second layer (decoder_sparse_step 2: layers 1 and 3), the others dense of intermediate_size
        cls=("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        config=dict(
            COMMON,
            num_hidden_layers=4,
            num_key_value_heads=2,
            head_dim=24,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            rope_theta=1e6,
            tie_word_embeddings=True,
            intermediate_size=64,
            decoder_sparse_step=2,
        ),  # fmt: skip
        dtype="float32",
    ),
    "olmoe": dict(  # multi-head; QK-norm over the whole projection; top-k not renormalised
        cls=("OlmoeConfig", "OlmoeForCausalLM"),
        config=dict(
            COMMON,
            num_hidden_layers=4,
            num_key_value_heads=4,
            intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            rope_theta=1e4,
            tie_word_embeddings=False,
        ),  # fmt: skip
        dtype="float32",
    ),
    "qwen2_moe": dict(  # biases on q, k, v; a gated shared expert; a dense first layer; saved in bf16
        cls=("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
        config=dict(
            COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            intermediate_size=80,
            mlp_only_layers=[0],
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            rope_theta=1e6,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),  # fmt: skip
        dtype="bfloat16",
    ),
    "deepseek_v2": dict(  # DeepSeek-V2-Lite's structure: latent attention with one full query projection, a dense
        # first layer, two shared experts, softmax top-3 greedy routing not renormalised
        cls=("DeepseekV2Config", "DeepseekV2ForCausalLM"),
        config=dict(
            COMMON,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=80,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            n_shared_experts=2,
            moe_intermediate_size=24,
            num_experts_per_tok=3,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            tie_word_embeddings=False,
        ),  # fmt: skip
        dtype="float32",
    ),
    "deepseek_v3": dict(  # DeepSeek-V3's: latent attention with a query projection of rank 24, a dense first layer,
        # one shared expert, sigmoid scores, the best 2 of 4 groups, top-3 renormalised and scaled by 2.5, and a
        # random aux-free routing bias (e_score_correction_bias) so that its import is checked too
        cls=("DeepseekV3Config", "DeepseekV3ForCausalLM"),
        config=dict(
            COMMON,
            num_hidden_layers=5,
            num_key_value_heads=4,  # the class defaults to V3's 128
            first_k_dense_replace=1,
            intermediate_size=80,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            n_shared_experts=1,
            moe_intermediate_size=24,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            tie_word_embeddings=False,
        ),  # fmt: skip
        dtype="bfloat16",
        random_bias=True,
    ),
}


def make_tokenizer():
    """A word-level tokenizer of 133 tokens (7 x 19: no power of two divides it): <unk>, <s>, </s> and 130
    syllables; it prepends <s>. Decoding joins words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "</s>"] + [c + v for c in "bdfghjklmnprstvwz" for v in "aeiou"]
    words += [a + b for a in ("ka", "lo", "mi", "su", "ra") for b in ("n", "m", "r", "s", "t", "x", "l", "k", "p")]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def logits_of(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def greedy(model, tokens: np.ndarray, new: int) -> np.ndarray:
    """Greedy continuation by full forwards (no cache): each step takes the argmax at the last position."""
    seq = np.asarray(tokens)
    for _ in range(new):
        nxt = logits_of(model, seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq[:, tokens.shape[1] :]


def make(family: str, spec: dict, out: str) -> dict:
    import torch
    import transformers

    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    config_cls, model_cls = (getattr(transformers, n) for n in spec["cls"])
    cfg = config_cls(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **spec["config"])
    torch.manual_seed(SEED)
    model = model_cls(cfg).eval()
    if spec.get("random_bias"):  # transformers initialises the routing bias to zero; a zero bias would check nothing
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(0.05 * torch.randn(buf.shape))
    d = os.path.join(out, family)
    shutil.rmtree(d, ignore_errors=True)
    model.to(getattr(torch, spec["dtype"])).save_pretrained(d, safe_serialization=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>"}, f, indent=2)  # fmt: skip

    # The reference is the model as saved, loaded back by transformers in fp32.
    ref = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    rng = np.random.default_rng(SEED)
    prompts = rng.integers(3, vocab, size=(PROMPTS, PROMPT_LEN))
    new = greedy(ref, prompts, NEW)
    full = np.concatenate([prompts, new], axis=1)
    logits = logits_of(ref, full)
    text_ids = np.asarray([tok.encode(TEXT_PROMPT).ids])
    text_new = greedy(ref, text_ids, NEW)
    np.savez_compressed(os.path.join(d, "expected.npz"), prompts=prompts, greedy=new,
                        logits=logits.astype(np.float32))  # fmt: skip
    expected = {
        "family": family,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "text_prompt": TEXT_PROMPT,
        "text_prompt_ids": text_ids[0].tolist(),
        "text_greedy_ids": text_new[0].tolist(),
        "text_continuation": tok.decode(text_new[0].tolist(), skip_special_tokens=True),
        "parameters": sum(p.numel() for p in ref.parameters()),
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
    size = sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))
    print(f"{family}: {expected['parameters']:,} parameters, {size / 1e6:.2f} MB in {d}")
    return {"dir": d, "model_cls": model_cls, "logits": logits, "tokens": full, "size": size}


def check_export(family: str, made: dict) -> float:
    """moe_jax imports the fixture on 8 fake devices (pp2-ep2-tp2), exports it in fp32, sharded into several files;
    transformers loads the export and its logits must equal the originals. Returns the largest difference."""
    import torch

    from moe_jax.hf import config_from_hf
    from moe_jax.hf.checkpoint import export, import_state
    from moe_jax.hf.families import FAMILIES as TABLES
    from moe_jax.mesh import make_mesh
    from moe_jax.parallel.sharded import ShardedModel

    cfg, hf = config_from_hf(made["dir"], layout=os.path.join(ROOT, "meshes", "cpu8-pp2-ep2-tp2.yaml"),
                             overrides=["run.dtype=fp32", "run.seq_len=16", "run.batch=8"])  # fmt: skip
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    params, rest, _ = import_state(sm, made["dir"])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "export")
        summary = export(sm, params, out, TABLES[family], "float32", max_shard_bytes=200_000, base_config=hf, rest=rest)
        assert len(summary["files"]) > 1, summary  # the sharded form, with its index, is what transformers reads
        back = made["model_cls"].from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        got = logits_of(back, made["tokens"])
    diff = float(np.max(np.abs(got - made["logits"])))
    scale = float(np.max(np.abs(made["logits"])))
    print(f"{family}: exported as {len(summary['files'])} files; transformers' logits of the export differ from "
          f"the original's by {diff:.3g} (max |logit| {scale:.3g})")  # fmt: skip
    if not diff <= 1e-5 * scale:
        raise SystemExit(f"{family}: the export is not the same model for transformers (max difference {diff})")
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "hf"))
    ap.add_argument("--only", choices=sorted(FAMILIES))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for family, spec in FAMILIES.items():
        if args.only and family != args.only:
            continue
        made = make(family, spec, args.out)
        if made["size"] > 2_000_000:
            raise SystemExit(f"{family}: {made['size']} bytes, over the 2 MB a fixture may take")
        check_export(family, made)


if __name__ == "__main__":
    main()
