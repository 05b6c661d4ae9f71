"""Host memory of a Hugging Face import: a random Mixtral-shaped checkpoint of about 2 GB (bf16, 10 layers, width
1024, 8 experts of 3584, sharded into 4 safetensors files with their index) read into the shards of 8 fake CPU
devices (layout ep8: experts split, everything else replicated on each device).

Measured in a fresh process: the baseline RSS once JAX, its devices and the model's abstract shapes exist; the bytes
the devices hold after `import_params` (every addressable shard); the peak RSS (ru_maxrss) over the import. On fake
CPU devices the devices' buffers are host memory, so the claim is peak <= baseline + 1.5 x device bytes, i.e. the
import adds less than half of what it stores. Then `moe-jax import-hf` as a whole (the checkpoint written too).

    python scripts/bench_hf_import.py [--json docs/results/bench_hf_import.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=1024,
              num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=3584,
              num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
              max_position_embeddings=4096, hidden_act="silu", tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip

MEASURE = """
import json, os, resource, sys, time
import jax
from moe_jax.hf import config_from_hf
from moe_jax.hf.checkpoint import import_params
from moe_jax.mesh import make_mesh
from moe_jax.parallel.sharded import ShardedModel

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

cfg, _ = config_from_hf(sys.argv[1], None, os.path.join(sys.argv[2], "meshes", "cpu8-ep8.yaml"))
sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
jax.block_until_ready(jax.numpy.zeros(8))
base = rss()
t = time.perf_counter()
params, tensors = import_params(sm, sys.argv[1])
jax.block_until_ready(params)
seconds = time.perf_counter() - t
held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss": base, "device_bytes": held, "peak_rss": peak, "after_rss": rss(),
                  "file_bytes": sum(os.path.getsize(os.path.join(sys.argv[1], f)) for f in os.listdir(sys.argv[1])),
                  "seconds": seconds, "tensors": len(tensors.shapes)}))
"""


def write_checkpoint(directory: str) -> int:
    """The random checkpoint, written tensor by tensor into 4 files of about 500 MB (the index names each one)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from moe_jax.hf.checkpoint import expected_tensors
    from moe_jax.hf.families import FAMILIES, model_fields
    from moe_jax.model.transformer import param_table

    fields = model_fields(CONFIG, "bench")
    from moe_jax.load import load_config

    cfg = load_config(None, None, ["run.seq_len=2048"], base={"model": fields})
    _, shapes = param_table(cfg)
    names = expected_tensors(cfg.model, FAMILIES["mixtral"], shapes)
    rng = np.random.default_rng(0)
    files, shard, size, total, weight_map = [], {}, 0, 0, {}

    def flush():
        name = f"model-{len(files) + 1:05d}-of-00004.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(name)
        shard.clear()

    for name, (shape, _) in sorted(names.items()):
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        if size + x.nbytes > 520_000_000 and shard:
            flush()
            size = 0
        shard[name] = x
        size += x.nbytes
        total += x.nbytes
    flush()
    assert len(files) == 4, files
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "results", "bench_hf_import.json"))
    ap.add_argument("--keep", help="write the random checkpoint here and keep it")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        d = args.keep or os.path.join(tmp, "hf")
        os.makedirs(d, exist_ok=True)
        written = write_checkpoint(d)
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, "-c", MEASURE, d, ROOT], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        added = r["peak_rss"] - r["baseline_rss"]
        r["added_over_device_bytes"] = added / r["device_bytes"]
        r["bound_holds"] = r["peak_rss"] <= r["baseline_rss"] + 1.5 * r["device_bytes"]
        cli = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "moe_jax.cli", "import-hf", d, "--out",
                              os.path.join(tmp, "ckpt"), "--layout", os.path.join(ROOT, "meshes", "cpu8-ep8.yaml")],
                             env=env, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        if cli.returncode:
            raise SystemExit(cli.stderr[-3000:])
        r["cli_peak_rss"] = int(cli.stderr.strip().splitlines()[-1]) * 1024
    r.update(
        written_bytes=written, machine=f"{platform.machine()}, {os.cpu_count()} cores", python=sys.version.split()[0]
    )
    gib = 2**30
    print(f"{written / 1e9:.2f} GB of bf16 in 4 files: devices hold {r['device_bytes'] / gib:.2f} GiB (fp32), baseline "
          f"RSS {r['baseline_rss'] / gib:.2f} GiB, peak {r['peak_rss'] / gib:.2f} GiB: the import added "
          f"{added / gib:.2f} GiB = {r['added_over_device_bytes']:.2f} x the device bytes (bound 1.5: "
          f"{'holds' if r['bound_holds'] else 'FAILS'}); {r['seconds']:.1f} s. moe-jax import-hf with the checkpoint "
          f"write: peak {r['cli_peak_rss'] / gib:.2f} GiB")  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(r, f, indent=1)
        f.write("\n")
    if not r["bound_holds"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
