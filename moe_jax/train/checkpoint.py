"""Orbax checkpoints: every N steps, keep K, written atomically (a temporary directory renamed into place, so a process
killed mid-save leaves the previous checkpoint whole). Saved in global layer order, so a checkpoint restores onto any
layout: Orbax reshards into the new layout's shardings, and circular layouts permute their layer stack after."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe_jax.config import Config, ConfigError, to_dict
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.train.step import LossScale, TrainState


def _shapes(tree) -> dict[str, list[int]]:
    return {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def read_meta(directory: str) -> dict[str, Any] | None:
    """The metadata of the latest complete checkpoint in `directory` (config, shapes, step; an imported one's
    Hugging Face files), read from its JSON file without starting JAX: a command needs the saved config, and so its
    device count, before JAX makes its devices. None where there is no checkpoint."""
    if not os.path.isdir(directory):
        return None
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    steps = [s for s in steps if os.path.isfile(os.path.join(directory, str(s), "meta", "metadata"))]
    if not steps:
        return None
    with open(os.path.join(directory, str(max(steps)), "meta", "metadata")) as f:
        return json.load(f)


class Checkpoints:
    def __init__(self, directory: str, every: int = 50, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=False, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, sm: ShardedModel, cfg: Config, state: TrainState, force: bool = False) -> bool:
        tree = self._to_global(sm, state)
        meta = {"config": to_dict(cfg), "shapes": _shapes(tree), "step": state.step}
        saved = self.manager.save(
            state.step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        self.manager.wait_until_finished()
        return bool(saved)

    def save_weights(self, sm: ShardedModel, cfg: Config, params, rest, extra_meta: dict | None = None) -> None:
        """A weights-only checkpoint at step 0 (what `moe-jax import-hf` writes): parameters and the model's other
        state, no optimizer moments. It restores like any checkpoint, with a fresh optimizer state."""
        tree = {"params": sm.to_global(params), "rest": sm.to_global(rest)}
        meta = {"config": to_dict(cfg), "shapes": _shapes(tree), "step": 0, "weights_only": True, **(extra_meta or {})}
        self.manager.save(
            0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True
        )
        self.manager.wait_until_finished()

    def saved_config(self, step: int) -> dict[str, dict[str, Any]]:
        """The config (as `to_dict` writes it) the checkpoint of `step` was saved with."""
        return self._meta(step)["config"]

    def _meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, sm: ShardedModel, template: TrainState, step: int | None = None) -> TrainState:
        """Restores onto `template`'s layout (its shardings); raises ConfigError if the checkpoint is missing or was
        written for another model."""
        step = self.latest() if step is None else step
        if step is None:
            raise ConfigError(f"--resume: no checkpoint in {self.directory}; train without --resume to start one")
        meta = self._meta(step)
        target = self._to_global(sm, template)
        if meta.get("weights_only"):
            target = {k: target[k] for k in ("params", "rest")}
        want = _shapes(target)
        diff = [(k, meta["shapes"].get(k), v) for k, v in want.items() if meta["shapes"].get(k) != v]
        diff.sort(key=lambda d: not d[0].startswith("['params']"))  # name a parameter before an optimizer moment
        if diff:
            k, there, here = diff[0]
            more = f"; {len(diff) - 1} more differ" if len(diff) > 1 else ""
            raise ConfigError(
                f"checkpoint {self.directory} step {step} was written for another model: {k} has shape "
                f"{tuple(there) if there else 'none'} there, {tuple(here)} here{more}"
            )
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        tree = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        if meta.get("weights_only"):  # imported weights: the template's fresh optimizer state and loss scale
            return TrainState(sm.to_storage(tree["params"]), sm.to_storage(tree["rest"]), template.opt_state,
                              template.loss_scale, 0)  # fmt: skip
        return self._from_global(sm, tree, int(meta["step"]))

    @staticmethod
    def _to_global(sm: ShardedModel, state: TrainState) -> dict[str, Any]:
        return {
            "params": sm.to_global(state.params),
            "rest": sm.to_global(state.rest),
            "opt_state": sm.to_global(state.opt_state),
            "loss_scale": state.loss_scale._asdict(),
        }

    @staticmethod
    def _from_global(sm: ShardedModel, tree: dict[str, Any], step: int) -> TrainState:
        return TrainState(
            sm.to_storage(tree["params"]),
            sm.to_storage(tree["rest"]),
            sm.to_storage(tree["opt_state"], moments=True),
            LossScale(**tree["loss_scale"]),
            step,
        )
