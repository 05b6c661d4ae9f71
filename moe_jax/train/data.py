"""Batches: a synthetic, learnable token task made in memory, or token files read through a memory map.

A batch is a function of (seed, step) alone, never of the layout, so every layout sees the same data at every step
(what makes runs on different layouts comparable). With several processes each one materialises only its own rows.
"""

from __future__ import annotations

import os

import numpy as np

from moe_jax.config import ConfigError

RULES = 4  # the synthetic task's number of rules


class SyntheticTask:
    """Sequences of x_{t+1} = (a x_t + b) mod V with (a, b) one of RULES rules, picked per sequence and announced by
    the first token (x_0 = the rule's id). Everything after the first two tokens is predictable from context, so the
    loss can fall far below chance (log V): the floor is about log(V) x 1/S from the unpredictable second token."""

    def __init__(self, vocab: int, seq_len: int, seed: int = 0):
        if vocab <= RULES:
            raise ConfigError(f"model.vocab={vocab}: the synthetic task needs more than {RULES} tokens")
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed
        rng = np.random.default_rng(1234)
        self.a = rng.integers(1, vocab, RULES)
        self.b = rng.integers(0, vocab, RULES)

    def identity(self) -> dict:
        """What a checkpoint records of the data (train/loop.py): a batch is a function of this and the step."""
        return {"kind": "synthetic", "vocab": self.vocab, "seq_len": self.seq_len, "seed": self.seed}

    def describe(self) -> str:
        return f"synthetic: x[t+1] = (a x[t] + b) mod {self.vocab}, one of {RULES} rules per sequence, told by x[0]"

    def rows(self, step: int, batch: int, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows start..stop of the global batch of `step`: (tokens, targets), each [rows, S] int32."""
        stop = batch if stop is None else stop
        rng = np.random.default_rng([self.seed, step])
        rule = rng.integers(0, RULES, batch)[start:stop]
        first = rng.integers(0, self.vocab, batch)[start:stop]
        seq = np.empty((stop - start, self.seq_len + 1), np.int64)
        seq[:, 0] = rule
        seq[:, 1] = first
        a, b = self.a[rule], self.b[rule]
        for t in range(2, self.seq_len + 1):
            seq[:, t] = (a * seq[:, t - 1] + b) % self.vocab
        return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)


class TokenFile:
    """Token ids in a `.npy` file (any integer dtype) or a raw `.bin` of uint16 / uint32, read through a memory map.
    Row r of the batch of step s is a window of S + 1 tokens at an offset drawn from (seed, s, r)."""

    def __init__(self, path: str, vocab: int, seq_len: int, seed: int = 0, dtype: str = "uint16"):
        if not os.path.isfile(path):
            raise ConfigError(f"--data={path!r}: no such file")
        if os.path.getsize(path) == 0:
            raise ConfigError(f"--data={path!r}: the file is empty (0 bytes); it needs at least run.seq_len + 1 = "
                              f"{seq_len + 1} token ids")  # fmt: skip
        if path.endswith(".npy"):
            try:
                self.tokens = np.load(path, mmap_mode="r")
            except (ValueError, EOFError, OSError) as e:
                raise ConfigError(f"--data={path!r}: not a readable .npy file ({e})") from None
            if not np.issubdtype(self.tokens.dtype, np.integer):
                raise ConfigError(f"--data={path!r}: dtype {self.tokens.dtype} is not an integer type; token ids "
                                  "must be integers")  # fmt: skip
            self.tokens = self.tokens.reshape(-1)
        elif path.endswith(".bin"):
            if dtype not in ("uint16", "uint32"):
                raise ConfigError(f"--data-dtype={dtype!r}: valid for .bin files: uint16, uint32")
            size = os.path.getsize(path)
            width = np.dtype(dtype).itemsize
            if size % width:
                raise ConfigError(f"--data={path!r}: {size} bytes is not a whole number of {dtype} tokens; "
                                  "is --data-dtype right?")  # fmt: skip
            self.tokens = np.memmap(path, dtype=dtype, mode="r")
        else:
            raise ConfigError(f"--data={path!r}: unknown format; valid: .npy, or .bin of uint16 / uint32")
        if len(self.tokens) < seq_len + 1:
            raise ConfigError(f"--data={path!r}: {len(self.tokens)} tokens, fewer than run.seq_len + 1 = {seq_len + 1}")
        hi, lo = int(np.max(self.tokens)), int(np.min(self.tokens))
        if lo < 0:
            raise ConfigError(f"--data={path!r}: token id {lo} is negative; valid ids: 0..{vocab - 1} "
                              f"(model.vocab={vocab})")  # fmt: skip
        if hi >= vocab:
            raise ConfigError(f"--data={path!r}: token id {hi} is outside the vocabulary; valid ids: "
                              f"0..{vocab - 1} (model.vocab={vocab})")  # fmt: skip
        self.path, self.vocab, self.seq_len, self.seed = path, vocab, seq_len, seed

    def identity(self) -> dict:
        return {"kind": "file", "path": os.path.abspath(self.path), "tokens": len(self.tokens),
                "dtype": str(self.tokens.dtype), "seq_len": self.seq_len, "seed": self.seed}  # fmt: skip

    def describe(self) -> str:
        return f"{self.path}: {len(self.tokens):,} tokens ({self.tokens.dtype})"

    def rows(self, step: int, batch: int, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        stop = batch if stop is None else stop
        rng = np.random.default_rng([self.seed, step])
        offsets = rng.integers(0, len(self.tokens) - self.seq_len, batch)[start:stop]
        seq = np.stack([np.asarray(self.tokens[o : o + self.seq_len + 1]) for o in offsets]).astype(np.int64)
        return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)


def make_source(path: str | None, vocab: int, seq_len: int, seed: int, dtype: str = "uint16"):
    return SyntheticTask(vocab, seq_len, seed) if path is None else TokenFile(path, vocab, seq_len, seed, dtype)
