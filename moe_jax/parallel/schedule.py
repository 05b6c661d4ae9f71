"""The pipeline schedules in SPMD form: GPipe and 1F1B, each contiguous (v = 1) or circular / interleaved (v repeats).

L layers form pp x v chunks; chunk c lives on stage c mod pp.

GPipe: at tick t stage s works on k = t - s: microbatch k mod M of repeat k div M (valid while 0 <= k < v M), then
passes its output to stage s + 1 (the last stage passes to stage 0 when v > 1, where it waits in a buffer of M
microbatches until its next repeat is due). Ticks = v M + pp - 1; utilisation = v M / (v M + pp - 1). The backward
pass is autodiff of the same scan, in reverse, so a stage keeps what every forward tick saved: it grows with M.

1F1B: each tick a stage runs at most one chunk forward and one chunk backward. Forward slot k = t - s, backward slot
k = t - (v pp - 1) - (pp - 1 - s), each valid while 0 <= k < v M. Slot k is microbatch g pp + (w mod pp) of repeat
w div pp (forward) or v - 1 - w div pp (backward), g = k div (v pp), w = k mod (v pp): with v > 1 (interleaved
1F1B) a stage takes pp microbatches through one chunk, then the same pp through its next chunk, and a microbatch
leaving the last stage is due on stage 0 at the very next tick (no wrap-around buffer). The last stage starts a
microbatch's backward in the tick of its last forward, from its own loss; cotangents then step back one stage per
tick. A stage keeps each chunk input from its forward slot to its backward slot (the stash, a ring indexed by the
forward slot), never more than 2 v pp - 1 of them whatever M is. Ticks = v M + v pp + pp - 2, but empty slots are
skipped (a `lax.cond`), so in lockstep the step costs v M + pp - 1 ticks of one forward and one backward: GPipe's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from moe_jax.config import ConfigError, storage_model


@dataclasses.dataclass(frozen=True)
class Schedule:
    pp: int
    microbatches: int
    repeats: int = 1
    layers: int | None = None  # for per-chunk figures; None when only the timing matters
    remat: str = "layer"
    kind: str = "gpipe"  # gpipe | 1f1b

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
        if self.kind not in ("gpipe", "1f1b"):
            raise ConfigError(f"schedule={self.kind!r}: valid: gpipe, 1f1b")
        if self.kind == "1f1b" and self.microbatches < self.pp:
            raise ConfigError(
                f"microbatches={self.microbatches}: a 1f1b schedule needs at least pp={self.pp} microbatches (with "
                f"fewer it never reaches its steady state and stashes more than GPipe keeps: use gpipe)"
            )
        if self.kind == "1f1b" and self.remat == "none":
            raise ConfigError(
                "remat='none': a 1f1b schedule recomputes each chunk from its stashed input in the backward slot; "
                "valid: tick (the chunk's activations live within the slot) or layer (each layer's input only)"
            )

    @property
    def ticks(self) -> int:
        """Ticks of the program's scan (1F1B: both slot kinds; its bubble slots are skipped, see `time_ticks`)."""
        if self.kind == "1f1b":
            return self.repeats * self.microbatches + (self.repeats + 1) * self.pp - 2
        return self.repeats * self.microbatches + self.pp - 1

    @property
    def time_ticks(self) -> int:
        """The step's length in ticks of one chunk forward plus one chunk backward, in lockstep SPMD (a tick lasts
        as long as its busiest stage): v M + pp - 1 for both schedules."""
        return self.repeats * self.microbatches + self.pp - 1

    @property
    def backward_offset(self) -> int:
        """1F1B: the last stage's backward slot k runs at tick k + v pp - 1 (the tick of its last forward of it)."""
        return self.repeats * self.pp - 1

    @property
    def useful_ticks(self) -> int:
        return self.repeats * self.microbatches

    @property
    def utilization(self) -> float:
        return self.useful_ticks / self.time_ticks

    @property
    def layers_per_chunk(self) -> int | None:
        return None if self.layers is None else self.layers // (self.pp * self.repeats)

    def slot(self, k: int, backward: bool = False) -> tuple[int, int]:
        """Slot k -> (microbatch, repeat)."""
        if self.kind == "gpipe":
            return k % self.microbatches, k // self.microbatches
        g, w = divmod(k, self.repeats * self.pp)
        r = w // self.pp
        return g * self.pp + w % self.pp, (self.repeats - 1 - r if backward else r)

    def forward_slot(self, j: int, r: int) -> int:
        """(microbatch, repeat) -> its forward slot (inverse of `slot`)."""
        if self.kind == "gpipe":
            return r * self.microbatches + j
        g, jj = divmod(j, self.pp)
        return g * self.repeats * self.pp + r * self.pp + jj

    def work(self, stage: int, tick: int) -> tuple[int, int] | None:
        """(microbatch, repeat) that `stage` runs forward at tick `tick`, or None in the bubble."""
        k = tick - stage
        if not 0 <= k < self.useful_ticks:
            return None
        return self.slot(k)

    def backward_work(self, stage: int, tick: int) -> tuple[int, int] | None:
        """1F1B: (microbatch, repeat) whose backward `stage` runs at tick `tick`, or None."""
        if self.kind != "1f1b":
            return None
        k = tick - self.backward_offset - (self.pp - 1 - stage)
        if not 0 <= k < self.useful_ticks:
            return None
        return self.slot(k, backward=True)

    def stash_lifetimes(self, stage: int) -> list[tuple[int, int]]:
        """1F1B: (forward tick, backward tick) of every chunk input `stage` stashes."""
        out = []
        for t in range(self.ticks):
            b = self.backward_work(stage, t)
            if b is not None:
                out.append((self.forward_slot(*b) + stage, t))
        return out

    def in_flight(self, stage: int) -> int:
        """1F1B: the most chunk inputs `stage` holds at once (stashed at its forward, freed after its backward)."""
        return _in_flight(self.pp, self.microbatches, self.repeats, stage)

    def _in_flight(self, stage: int) -> int:
        delta = [0] * (self.ticks + 1)
        for f, b in self.stash_lifetimes(stage):
            delta[f] += 1
            delta[b + 1] -= 1
        held = peak = 0
        for d in delta:
            held += d
            peak = max(peak, held)
        return peak

    @property
    def stash_slots(self) -> int:
        """1F1B: the stash ring's size, the same array on every stage (SPMD): an input stashed at forward slot k
        goes to slot k mod S and must be read before slot k + S is written, so S is the longest stay (in ticks,
        one forward slot per tick) plus one, over every stage: stage 0's first repeat, from tick k to k + 2 v pp - 2;
        at most v M (tests/test_pipeline.py checks both against the slots)."""
        return min(2 * self.repeats * self.pp - 1, self.useful_ticks)

    def chunk(self, stage: int, repeat: int) -> int:
        return repeat * self.pp + stage

    def activation_slots(self) -> dict[str, Any]:
        """What one stage keeps between the forward and backward passes, in microbatch activations
        [B/(M dp ep), S/tp, D] (fp32). GPipe: per tick the scan saves the tick input (remat 'tick') or every layer's
        input (remat 'layer', L/(pp v) per tick); plus the M final outputs and, circular, the M-slot wrap-around
        buffer. 1F1B: the stash ring (`stash_slots`, of which stage s fills `in_flight(s)` at its peak), and within a
        backward slot the recomputed chunk's saved layer inputs (remat 'layer') or its whole activations ('tick')."""
        if self.kind == "1f1b":
            return {
                "stash": self.stash_slots,
                "in_flight": [self.in_flight(s) for s in range(self.pp)],
                "recompute_layer_inputs": (self.layers_per_chunk or 1) if self.remat == "layer" else 0,
            }
        per_tick = 1 if self.remat == "tick" else (self.layers_per_chunk or 1)
        return {
            "saved_per_tick": per_tick,
            "saved": self.ticks * per_tick,
            "outputs": self.microbatches,
            "wrap_buffer": self.microbatches if self.repeats > 1 else 0,
        }

    def to_json(self) -> dict[str, Any]:
        def cell(s, w):
            return None if w is None else {"microbatch": w[0], "repeat": w[1], "chunk": self.chunk(s, w[1])}

        out = {
            "schedule": self.kind,
            "pp": self.pp,
            "microbatches": self.microbatches,
            "repeats": self.repeats,
            "ticks": self.ticks,
            "time_ticks": self.time_ticks,
            "useful_ticks": self.useful_ticks,
            "utilization": self.utilization,
            "bubble_fraction": 1 - self.utilization,
            "activation_slots": self.activation_slots(),
            "forward": [[cell(s, self.work(s, t)) for t in range(self.ticks)] for s in range(self.pp)],
        }
        if self.kind == "1f1b":
            out["backward"] = [[cell(s, self.backward_work(s, t)) for t in range(self.ticks)] for s in range(self.pp)]
        return out


@functools.lru_cache(maxsize=4096)
def _in_flight(pp: int, microbatches: int, repeats: int, stage: int) -> int:
    return Schedule(pp, microbatches, repeats, kind="1f1b")._in_flight(stage)


def schedule_of(cfg) -> Schedule:
    """The schedule a config's layout runs: its stages over the stored units (uneven stages' padding included)."""
    lay = cfg.layout
    return Schedule(lay.pp, lay.microbatches, lay.repeats, storage_model(cfg).units, lay.remat, lay.schedule)
