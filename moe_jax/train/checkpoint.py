"""Orbax checkpoints: every N steps, keep K, written asynchronously (the step goes on while a background thread writes)
and atomically (a temporary directory renamed into place, so a process killed mid-save leaves the previous checkpoint
whole). Saved in global layer order, so a checkpoint restores onto any layout: Orbax reshards into the new layout's
shardings, and circular layouts permute their layer stack after.

Once a save is complete a manifest is written beside it (every file's size): a checkpoint damaged on disk after it was
written (a file truncated or lost) is found on restore and named in one line with its step and file, and `--resume`
takes the latest complete one. A checkpoint without a manifest (one killed between Orbax's commit and the manifest, or
one written before manifests) is taken as whole: Orbax's commit marks it so; damage inside it is reported when
restoring it fails."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moe_jax.config import Config, ConfigError, to_dict
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.train.step import LossScale, TrainState


def _shapes(tree) -> dict[str, list[int]]:
    return {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


MANIFEST = "moe_jax_manifest.json"


def _files(step_dir: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if not rel.startswith(MANIFEST):  # itself, and its temporary file
                out[rel] = os.path.getsize(path)
    return out


def write_manifest(directory: str, step: int) -> None:
    """Records the size of every file of the complete checkpoint `step` (written atomically: whole or absent)."""
    step_dir = os.path.join(directory, str(step))
    path = os.path.join(step_dir, MANIFEST)
    files = _files(step_dir)
    with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "files": files}, f)
    os.replace(path + ".tmp", path)


def damage(directory: str, step: int) -> str | None:
    """What is wrong with checkpoint `step` on disk ("state/d/... is 10 bytes, 4,096 were written"), or None where its
    manifest's files are all there at their sizes (or it has no manifest)."""
    step_dir = os.path.join(directory, str(step))
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return None if os.path.isfile(os.path.join(step_dir, "meta", "metadata")) else "meta/metadata is missing"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for rel, size in sorted(files.items()):
        p = os.path.join(step_dir, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        if os.path.getsize(p) != size:
            return f"{rel} is {os.path.getsize(p):,} bytes, {size:,} were written"
    return None


def saved_steps(directory: str) -> list[int]:
    """The steps Orbax committed in `directory` (a numbered folder; a temporary one of a save in flight is not)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def complete_steps(directory: str) -> tuple[list[int], list[tuple[int, str]]]:
    """(the whole checkpoints' steps, [(step, what is wrong)] for the damaged ones), each in ascending order."""
    whole, damaged = [], []
    for step in saved_steps(directory):
        problem = damage(directory, step)
        (damaged.append((step, problem)) if problem else whole.append(step))
    return whole, damaged


def read_meta(directory: str) -> dict[str, Any] | None:
    """The metadata of the latest complete checkpoint in `directory` (config, shapes, step; an imported one's
    Hugging Face files), read from its JSON file without starting JAX: a command needs the saved config, and so its
    device count, before JAX makes its devices. None where there is no checkpoint."""
    whole, _ = complete_steps(directory)
    if not whole:
        return None
    with open(os.path.join(directory, str(whole[-1]), "meta", "metadata")) as f:
        return json.load(f)


class Checkpoints:
    """`asynchronous` (what `train` uses): `save` returns once the state is copied off the devices and the files are
    written in the background; the next save, `finish` or `close` waits for them and writes the manifest. Otherwise
    `save` returns with the checkpoint complete."""

    def __init__(self, directory: str, every: int = 50, keep: int = 3, asynchronous: bool = False):
        self.directory = os.path.abspath(directory)
        self.asynchronous = asynchronous
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=asynchronous, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # a save in flight: its manifest is written once it is complete
        self.fallbacks: list[str] = []  # one line per damaged checkpoint passed over by `restore` of the latest

    def latest(self) -> int | None:
        """The latest complete checkpoint's step (a damaged one is passed over), or None."""
        whole, _ = complete_steps(self.directory)
        return whole[-1] if whole else None

    def save(self, sm: ShardedModel, cfg: Config, state: TrainState, force: bool = False,
             data: dict[str, Any] | None = None) -> bool:  # fmt: skip
        """Saves `state` at its step (every N steps, or when `force`); `data`: the data source it read and where it
        stands, kept for `--resume`."""
        self.finish()
        tree = self._to_global(sm, state)
        meta = {"config": to_dict(cfg), "shapes": _shapes(tree), "step": state.step}
        if data is not None:
            meta["data"] = data
        saved = self.manager.save(
            state.step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        if saved:
            self._pending = state.step
            if not self.asynchronous:
                self.finish()
        return bool(saved)

    def finish(self) -> None:
        """Waits for a save in flight, then writes its manifest."""
        self.manager.wait_until_finished()
        if self._pending is not None:
            if jax.process_index() == 0 and os.path.isdir(os.path.join(self.directory, str(self._pending))):
                write_manifest(self.directory, self._pending)
            self._pending = None

    def close(self) -> None:
        self.finish()
        self.manager.close()

    def save_weights(self, sm: ShardedModel, cfg: Config, params, rest, extra_meta: dict | None = None) -> None:
        """A weights-only checkpoint at step 0 (what `moe-jax import-hf` writes): parameters and the model's other
        state, no optimizer moments. It restores like any checkpoint, with a fresh optimizer state."""
        tree = {"params": sm.to_global(params), "rest": sm.to_global(rest)}
        meta = {"config": to_dict(cfg), "shapes": _shapes(tree), "step": 0, "weights_only": True, **(extra_meta or {})}
        self.manager.save(
            0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True
        )
        self._pending = 0
        self.finish()

    def saved_config(self, step: int) -> dict[str, dict[str, Any]]:
        """The config (as `to_dict` writes it) the checkpoint of `step` was saved with."""
        return self.saved_meta(step)["config"]

    def saved_meta(self, step: int) -> dict[str, Any]:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - whatever Orbax raises on a damaged file: one line naming the step
            raise _Unreadable(f"checkpoint step {step} in {self.directory}: its metadata is unreadable "
                              f"({_first_line(e)})") from None  # fmt: skip

    def restore(self, sm: ShardedModel, template: TrainState, step: int | None = None,
                set_aside: bool = False) -> TrainState:  # fmt: skip
        """Restores onto `template`'s layout (its shardings); raises ConfigError if the checkpoint is missing, damaged
        or was written for another model. Without `step`, the latest complete one: a damaged checkpoint after it, or
        one that fails to restore, is passed over, each with a line in `fallbacks`; `set_aside` (a run that resumes,
        and will write those steps again) renames each to STEP.damaged, where reading leaves them as they are."""
        if step is not None:
            problem = damage(self.directory, step) if step in saved_steps(self.directory) else "it does not exist"
            if problem:
                raise ConfigError(f"checkpoint {self.directory} step {step} is damaged: {problem}")
            return self._restore(sm, template, step)
        whole, damaged = complete_steps(self.directory)
        if not whole:
            more = f" (damaged: {'; '.join(f'step {s}: {why}' for s, why in damaged)})" if damaged else ""
            raise ConfigError(f"--resume: no {'complete ' if damaged else ''}checkpoint in {self.directory}{more}; "
                              "train without --resume to start one")  # fmt: skip
        self.fallbacks = []
        for s, why in damaged:
            if s > whole[-1]:
                self.fallbacks.append(f"checkpoint step {s} in {self.directory} is damaged ({why}): passed over"
                                      + (f", kept as {self._set_aside(s)}" if set_aside else ""))  # fmt: skip
        for s in reversed(whole):
            try:
                return self._restore(sm, template, s)
            except _Unreadable as e:
                self.fallbacks.append(f"{e}: passed over" + (f", kept as {self._set_aside(s)}" if set_aside else ""))
        raise ConfigError(f"--resume: no checkpoint in {self.directory} could be restored: {'; '.join(self.fallbacks)}")

    def _set_aside(self, step: int) -> str:
        """Renames a damaged checkpoint out of the steps (the run will write that step again), keeping its files for
        a look; returns its new name."""
        name = f"{step}.damaged"
        if jax.process_index() == 0:
            n = 1
            while os.path.exists(os.path.join(self.directory, name)):
                n += 1
                name = f"{step}.damaged-{n}"
            os.replace(os.path.join(self.directory, str(step)), os.path.join(self.directory, name))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moe_jax checkpoint {step} set aside")
        self.manager.reload()
        return name

    def _restore(self, sm: ShardedModel, template: TrainState, step: int) -> TrainState:
        meta = self.saved_meta(step)
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
        try:
            tree = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001 - a file damaged inside (TensorStore's or Orbax's error): one line
            raise _Unreadable(f"checkpoint step {step} in {self.directory} is unreadable ({_first_line(e)})") from None
        tree = tree["state"]
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


class _Unreadable(ConfigError):
    """A checkpoint that fails to restore though its files are all there (damaged inside)."""


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
