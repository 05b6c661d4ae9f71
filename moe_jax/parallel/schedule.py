"""The pipeline schedule: GPipe in SPMD form, contiguous (v = 1) or circular (v repeats).

L layers form pp x v chunks; chunk c lives on stage c mod pp. At tick t stage s works on k = t - s: microbatch k mod M
of repeat k div M (valid while 0 <= k < v M), then passes its output to stage s + 1 (the last stage passes to stage
0 when v > 1, where it waits in a buffer of M microbatches until its next repeat is due). Ticks = v M + pp - 1;
utilisation = useful ticks / all ticks = v M / (v M + pp - 1). The backward pass is autodiff of the same scan, in
reverse.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Schedule:
    pp: int
    microbatches: int
    repeats: int = 1
    layers: int | None = None  # for per-chunk figures; None when only the timing matters
    remat: str = "layer"

    def __post_init__(self):
        for name in ("pp", "microbatches", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be a positive integer")
        if self.repeats > 1 and self.microbatches % self.pp:
            raise ConfigError(
                f"microbatches={self.microbatches}: a circular schedule (repeats={self.repeats}) needs a multiple of "
                f"pp={self.pp}, so that each wrapped-around microbatch is due after it arrives"
            )
        if self.layers is not None and self.layers % (self.pp * self.repeats):
            raise ConfigError(f"layers={self.layers}: must be divisible by pp x repeats = {self.pp} x {self.repeats}")

    @property
    def ticks(self) -> int:
        return self.repeats * self.microbatches + self.pp - 1

    @property
    def useful_ticks(self) -> int:
        return self.repeats * self.microbatches

    @property
    def utilization(self) -> float:
        return self.useful_ticks / self.ticks

    @property
    def layers_per_chunk(self) -> int | None:
        return None if self.layers is None else self.layers // (self.pp * self.repeats)

    def work(self, stage: int, tick: int) -> tuple[int, int] | None:
        """(microbatch, repeat) that `stage` computes at forward tick `tick`, or None in the bubble."""
        k = tick - stage
        if not 0 <= k < self.useful_ticks:
            return None
        return k % self.microbatches, k // self.microbatches

    def chunk(self, stage: int, repeat: int) -> int:
        return repeat * self.pp + stage

    def activation_slots(self) -> dict[str, int]:
        """What one stage keeps between the forward and backward passes, in microbatch activations
        [B/(M dp ep), S/tp, D] (fp32): per tick the scan saves the tick input (remat 'tick') or every layer's input
        (remat 'layer', L/(pp v) per tick); plus the M final outputs and, circular, the M-slot wrap-around buffer."""
        per_tick = 1 if self.remat == "tick" else (self.layers_per_chunk or 1)
        return {
            "saved_per_tick": per_tick,
            "saved": self.ticks * per_tick,
            "outputs": self.microbatches,
            "wrap_buffer": self.microbatches if self.repeats > 1 else 0,
        }

    def to_json(self) -> dict[str, Any]:
        grid = [[self.work(s, t) for t in range(self.ticks)] for s in range(self.pp)]
        return {
            "pp": self.pp,
            "microbatches": self.microbatches,
            "repeats": self.repeats,
            "ticks": self.ticks,
            "useful_ticks": self.useful_ticks,
            "utilization": self.utilization,
            "bubble_fraction": 1 - self.utilization,
            "activation_slots": self.activation_slots(),
            "forward": [
                [None if w is None else {"microbatch": w[0], "repeat": w[1], "chunk": self.chunk(s, w[1])} for w in row]
                for s, row in enumerate(grid)
            ],  # fmt: skip
        }
