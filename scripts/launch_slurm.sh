#!/usr/bin/env bash
# A Slurm template for GPU nodes: one moe-jax process per node, all of a node's GPUs in that process.
# jax.distributed detects the job from Slurm's variables (--distributed), so no coordinator flags are needed.
#
#   sbatch scripts/launch_slurm.sh            # edit the #SBATCH lines and the command below first
#
#SBATCH --job-name=moe-jax
#SBATCH --nodes=16                 # seed-128: 16 nodes x 8 GPUs
#SBATCH --ntasks-per-node=1        # one process per node
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=moe-jax-%j.out
set -euo pipefail

# Each process sees its node's 8 GPUs; the mesh puts tp, then ep, inside a node (NVLink) and pp across nodes.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

srun --kill-on-bad-exit=1 moe-jax train \
  --real --distributed \
  --config configs/seed.yaml --layout meshes/seed-128.yaml \
  --data /path/to/tokens.bin --data-dtype uint16 \
  --steps 1000 --metrics metrics.jsonl \
  --checkpoint-dir /shared/checkpoints/moe-jax --checkpoint-every 100
