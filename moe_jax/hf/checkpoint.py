"""Hugging Face checkpoint directories in and out, shard by shard.

Import: every parameter is built with `jax.make_array_from_callback`, whose callback runs once per device this process
holds and reads only that device's slice of the HF tensors (`safe_open(...).get_slice`), stacking the per-layer and
per-expert tensors of that slice alone. Each read opens the file, maps it and closes it again, so the pages of the
file never stay mapped: a process holds what its devices hold plus one slice in flight. bf16 tensors become fp32
master weights exactly (every bf16 value is an fp32 value).

Export: the parameters in global layer order, one layer's slice at a time fetched to the host, transposed back to
[out, in], cast to the chosen dtype and written into safetensors shards of at most `max_shard_bytes`, with
`model.safetensors.index.json` when there are several; all of it in a temporary directory renamed into place.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from moe_jax.config import ConfigError, ModelConfig
from moe_jax.hf.families import GLOBAL, Family, family_of, hf_config
from moe_jax.model.transformer import abstract_model, param_table

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def read_hf_config(directory: str) -> dict[str, Any]:
    """A checkpoint directory's config.json (or `directory` itself where it is that file: planning needs no weights)."""
    path = os.path.join(directory, "config.json")
    if os.path.isfile(directory):
        path = directory
    elif not os.path.isdir(directory):
        raise ConfigError(f"{directory}: no such directory (expected a Hugging Face checkpoint directory)")
    if not os.path.isfile(path):
        raise ConfigError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Shape rules: "HK,D -> DHK"


def parse_rule(rule: str) -> tuple[list[str], str]:
    hf, ours = (s.strip() for s in rule.split("->"))
    return hf.split(","), ours


def hf_shape(rule: str, sizes: dict[str, int]) -> tuple[int, ...]:
    groups, _ = parse_rule(rule)
    return tuple(int(np.prod([1 if c == "1" else sizes[c] for c in g])) for g in groups)


def read_box(read, name: str, rule: str, sizes: dict[str, int], box: dict[str, tuple[int, int]]) -> np.ndarray:
    """Our block `box` (letter -> [start, stop)) of one HF tensor (or one per expert where ours has E and HF not).
    read(name, index) -> the HF tensor's slice."""
    groups, ours = parse_rule(rule)
    hf_letters = [c for g in groups for c in g if c != "1"]
    stacked = [c for c in ours if c not in hf_letters]  # indexed by the name ({e})
    if stacked:
        (letter,) = stacked
        lo, hi = box[letter]
        parts = [read_box(read, name.format(e=i), rule.replace(letter, "", 1), sizes, box) for i in range(lo, hi)]
        return np.stack(parts, axis=ours.index(letter))
    index, shape = [], []
    for g in groups:
        if g == "1":
            index.append(slice(0, 1))
            continue
        inner = int(np.prod([sizes[c] for c in g[1:]]))
        lo, hi = box[g[0]]
        index.append(slice(lo * inner, hi * inner))  # the leading letter's range, inner letters whole
        shape += [hi - lo] + [sizes[c] for c in g[1:]]
    x = np.asarray(read(name, tuple(index))).reshape(shape)
    inner_cut = []
    for c in hf_letters:
        lo, hi = box[c]
        inner_cut.append(slice(lo, hi) if c not in [g[0] for g in groups] else slice(None))
    x = x[tuple(inner_cut)]
    return x.transpose([hf_letters.index(c) for c in ours])


def write_form(x: np.ndarray, rule: str, sizes: dict[str, int]) -> np.ndarray:
    """Our per-layer array (one expert's when the HF side is per expert) -> the HF tensor."""
    groups, ours = parse_rule(rule)
    hf_letters = [c for g in groups for c in g if c != "1"]
    ours = "".join(c for c in ours if c in hf_letters)
    return x.transpose([ours.index(c) for c in hf_letters]).reshape(hf_shape(rule, sizes))


# ---------------------------------------------------------------------------------------------------------------------
# The tensors of a directory


class HFTensors:
    """Names -> (file, shape, dtype) of a checkpoint directory's safetensors files (an index, one file, or several),
    read from the headers only. `read` opens the file for each slice and closes it again."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f"{index}: not a safetensors index (expected a JSON object with a weight_map)"
                ) from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
            weight_map = None
        if not files:
            raise ConfigError(f"{directory}: no *.safetensors files (moe_jax reads safetensors checkpoints only)")
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConfigError(f"{index}: names {name}, which is not in {directory}")
            size = os.path.getsize(path)
            try:
                with safe_open(path, "np") as f:
                    for key in f.keys():
                        s = f.get_slice(key)
                        self.where[key] = path
                        self.shapes[key] = tuple(s.get_shape())
                        self.dtypes[key] = s.get_dtype()
            except Exception as e:  # the header is unreadable or promises more bytes than the file has
                raise ConfigError(
                    f"{path}: not a readable safetensors file ({size} bytes): {str(e).splitlines()[0][:200]}"
                ) from None
        if weight_map is not None:
            stray = sorted(k for k, f in weight_map.items() if self.where.get(k) != os.path.join(directory, f))
            if stray:
                raise ConfigError(
                    f"{index}: tensor {stray[0]} is mapped to {weight_map[stray[0]]}, which does not hold it"
                )

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        with safe_open(self.where[name], "np") as f:
            return f.get_slice(name)[index]

    def total_elements(self, below_layer: int | None = None) -> int:
        """Elements of every tensor, or of those not in layers from `below_layer` on (an MTP module left unread)."""
        return sum(int(np.prod(s)) for n, s in self.shapes.items() if below(n, below_layer))


def below(name: str, layer: int | None) -> bool:
    """Whether an HF tensor is read: every one when `layer` is None, else all but those of layers from `layer` on."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return layer is None or not m or int(m.group(1)) < layer


# ---------------------------------------------------------------------------------------------------------------------
# Our parameters <-> HF tensors


STACKS = ("prologue", "blocks", "dense_blocks")


def path_of(key_path) -> str:
    return "/".join(str(k.key) for k in key_path if hasattr(k, "key"))


def layer_ids(m: ModelConfig, stack: str, index: tuple[int, ...]) -> int:
    """The HF layer of a stack position (global order): prologue i; unit u's MoE layer; unit u's j-th dense layer."""
    if stack == "prologue":
        return index[0]
    u = index[0]
    first = m.dense_layers + u * m.moe_every
    return first + (m.moe_every - 1 if stack == "blocks" else index[1])


def hf_name(m: ModelConfig, name: str, stack: str | None, pos: tuple[int, ...]) -> str:
    """The HF name pattern of a row at a stack position (global order): {L} filled, {e} left for the expert."""
    return name.replace("{L}", str(layer_ids(m, stack, pos))) if stack else name


def one_expert(rule: str) -> str:
    """The rule of one expert's tensor: the stacked E (indexed by the name) taken out of our side."""
    return rule.replace("E", "", 1)


def rule_for(family: Family, path: str, rows: dict | None = None) -> tuple[str, str, str | None, int]:
    """(HF name pattern, shape rule, stack, stacked axes) of our parameter `path` (or, `rows` = family.rest, of a
    state that is not a parameter: DeepSeek-V3's routing bias)."""
    stack = path.split("/")[0]
    table = family.layer if rows is None else rows
    if stack in STACKS:
        rel = path.split("/", 1)[1]
        if rel not in table:
            raise ConfigError(f"the {family.model_type} table has no row for {path}: this model is not that family")
        name, rule = table[rel]
        return "model.layers.{L}." + name, rule, stack, (2 if stack == "dense_blocks" else 1)
    if path not in GLOBAL:
        raise ConfigError(f"the {family.model_type} table has no row for {path}: this model is not that family")
    name, rule = GLOBAL[path]
    return name, rule, None, 0


def letter_sizes(rule: str, shape: tuple[int, ...]) -> dict[str, int]:
    _, ours = parse_rule(rule)
    return dict(zip(ours, shape, strict=True))


def expected_tensors(m: ModelConfig, family: Family, shapes: dict[str, tuple[int, ...]],
                     rows: dict | None = None) -> dict[str, tuple]:  # fmt: skip
    """Every HF tensor the model needs -> (its shape, our path). shapes: our paths -> global shapes."""
    out = {}
    for path, shape in shapes.items():
        name, rule, stack, n = rule_for(family, path, rows)
        sizes = letter_sizes(rule, shape[n:])
        for pos in np.ndindex(*shape[:n]):
            base = hf_name(m, name, stack, pos)
            if "{e}" in base:
                out.update({base.format(e=e): (hf_shape(one_expert(rule), sizes), path) for e in range(sizes["E"])})
            else:
                out[base] = (hf_shape(rule, sizes), path)
    return out


def check_tensors(tensors: HFTensors, expected: dict[str, tuple], beyond_layers: int | None = None) -> None:
    """Missing, extra or misshapen tensors: the first of each named, with both shapes. `beyond_layers`: tensors of
    layers from this index on are a multi-token-prediction module (DeepSeek-V3's layer 61) and are left unread."""
    for name, (shape, path) in expected.items():
        if name not in tensors.shapes:
            raise ConfigError(f"{tensors.directory}: tensor {name} missing (needed for {path}, shape {shape})")
        dtype = str(tensors.dtypes[name]).lower()
        if not dtype.startswith(("f", "bf")):  # F32, BF16, F16, F8_*: a weight; an integer or bool tensor is not
            raise ConfigError(f"{tensors.directory}: tensor {name} is {tensors.dtypes[name]}; a weight must be "
                              "floating point (F32, BF16 or F16), and moe_jax does not cast it silently")  # fmt: skip
        if tensors.shapes[name] != shape:
            raise ConfigError(f"{tensors.directory}: tensor {name} has shape {tensors.shapes[name]}, the config "
                              f"needs {shape} (for {path})")  # fmt: skip
    extra = [n for n in sorted(set(tensors.shapes) - set(expected)) if below(n, beyond_layers)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConfigError(f"{tensors.directory}: tensor {extra[0]}{more} is not part of this model; moe_jax would "
                          "drop it (rotary inv_freq buffers and MTP layers are not read: remove them)")  # fmt: skip


def load_params(sm, family: Family, tensors: HFTensors, rest: bool = False):
    """The model's parameters (or, `rest`, the family's non-parameter state) read from `tensors` into their shards
    on sm's mesh, in the layout's storage order."""
    m = sm.cfg.model
    order = sm.layer_order()  # storage position -> global unit
    shardings = sm.shardings(sm.rest_specs if rest else sm.param_specs)
    rows = family.rest if rest else None

    def build(key_path, leaf, sharding):
        path = path_of(key_path)
        name, rule, stack, n = rule_for(family, path, rows)
        sizes = letter_sizes(rule, leaf.shape[n:])
        _, ours = parse_rule(rule)
        # The vocabulary split over tp is stored padded (config.padded_vocab): the padding rows read as zeros.
        stored_v = sizes.get("V", 0)
        if stored_v:
            sizes["V"] = m.vocab
        seen: dict[tuple, np.ndarray] = {}  # replicated slices are read once for all the devices that hold them

        def block(index):
            key = tuple((s.start, s.stop) for s in index)
            if key not in seen:
                ranges = [range(*s.indices(dim)) for s, dim in zip(index, leaf.shape, strict=True)]
                box = {c: (r.start, r.stop) for c, r in zip(ours, ranges[n:], strict=True)}

                pad = 0
                if stored_v and box["V"][1] > m.vocab:
                    pad = box["V"][1] - max(box["V"][0], m.vocab)
                    box["V"] = (min(box["V"][0], m.vocab), m.vocab)

                def one(pos):
                    gpos = pos if stack in (None, "prologue") else (int(order[pos[0]]), *pos[1:])
                    x = read_box(tensors.read, hf_name(m, name, stack, gpos), rule, sizes, box)
                    if pad:
                        widths = [(0, 0)] * x.ndim
                        widths[ours.index("V")] = (0, pad)
                        x = np.pad(x, widths)
                    return x

                if n == 0:
                    x = one(())
                else:
                    x = np.stack(
                        [np.stack([one((u, j)) for j in ranges[1]]) if n == 2 else one((u,)) for u in ranges[0]]
                    )
                seen.clear()
                seen[key] = x.astype(np.float32)
            return seen[key]

        return jax.make_array_from_callback(leaf.shape, sharding, block)

    return jax.tree_util.tree_map_with_path(build, sm.abstract_rest if rest else sm.abstract_params, shardings)


def rest_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The model's non-parameter state (the routing bias) by path, global shapes."""
    _, _, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    return {"/".join(map(str, k)): tuple(v.shape) for k, v in nnx.to_flat_state(rest)}


def import_params(sm, directory: str):
    """config.json's family and the safetensors of `directory`, checked against sm's model, then read into shards."""
    params, _, tensors = import_state(sm, directory)
    return params, tensors


def import_state(sm, directory: str, seed: int = 0):
    """(params, rest, tensors): the parameters and, where the family stores it (DeepSeek-V3's
    e_score_correction_bias), the routing bias; otherwise the rest is freshly initialised (zero bias)."""
    family = family_of(read_hf_config(directory), os.path.join(directory, "config.json"))
    tensors = HFTensors(directory)
    _, shapes = param_table(sm.cfg)
    expected = expected_tensors(sm.cfg.model, family, shapes)
    rest_rows = rest_shapes(sm.cfg) if family.rest else {}
    with_rest = bool(rest_rows)
    if with_rest:
        expected.update(expected_tensors(sm.cfg.model, family, rest_rows, family.rest))
    check_tensors(tensors, expected, sm.cfg.model.layers if family.extra_layers_ok else None)
    rest = load_params(sm, family, tensors, rest=True) if with_rest else sm.init_rest(seed)
    return load_params(sm, family, tensors), rest, tensors


def host_slice(arr, lead: tuple[int, ...]) -> np.ndarray:
    """arr[lead] on the host, assembled from the shards this process holds (one copy of each replicated piece)."""
    n = len(lead)
    out = np.empty(arr.shape[n:], arr.dtype)
    filled = np.zeros(arr.shape[n:], bool) if arr.ndim > n else np.zeros((), bool)
    for shard in arr.addressable_shards:
        index = [range(*s.indices(dim)) for s, dim in zip(shard.index, arr.shape, strict=True)]
        if not all(p in r for p, r in zip(lead, index, strict=False)):
            continue
        inner = tuple(slice(r.start, r.stop) for r in index[n:])
        if filled[inner].all():
            continue  # a replica of a piece already copied
        data = np.asarray(shard.data)[tuple(p - r.start for p, r in zip(lead, index, strict=False))]
        out[inner] = data
        filled[inner] = True
    if not filled.all():
        raise ConfigError("export-hf: this process does not hold the whole model; export from one process")
    return out


def hf_tensors_of(sm, params, family: Family, dtype, rows: dict | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every tensor, one stack position's slice of a parameter fetched at a time."""
    m = sm.cfg.model
    inverse = sm.layer_order(inverse=True)  # global unit -> storage position
    for key_path, arr in jax.tree_util.tree_leaves_with_path(params):
        path = path_of(key_path)
        name, rule, stack, n = rule_for(family, path, rows)
        sizes = letter_sizes(rule, arr.shape[n:])
        _, ours = parse_rule(rule)
        for gpos in np.ndindex(*arr.shape[:n]):
            spos = gpos if stack in (None, "prologue") else (int(inverse[gpos[0]]), *gpos[1:])
            x = host_slice(arr, spos)
            if sizes.get("V", m.vocab) > m.vocab:  # the vocabulary split over tp: its padding is not exported
                sizes["V"] = m.vocab
                x = np.take(x, np.arange(m.vocab), axis=ours.index("V"))
            base = hf_name(m, name, stack, gpos)
            if "{e}" in base:
                axis = ours.index("E")
                for e in range(x.shape[axis]):
                    one = np.take(x, e, axis=axis)
                    yield base.format(e=e), write_form(one, one_expert(rule), sizes).astype(dtype)
            else:
                yield base, write_form(x, rule, sizes).astype(dtype)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '64KB', '1000' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|B)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size={text!r}: expected a size like 5GB, 500MB or 64KB")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[(match.group(2) or "B").upper()]
    return int(float(match.group(1)) * scale)


def prepare_out(out: str, force: bool, source: str | None = None, source_flag: str = "the input") -> None:
    """Refuses an --out that exists and is not an empty directory (unless `force`), or that is, holds or lies inside
    `source` (what the command reads: replacing it would delete the input), `--force` or not."""
    if source is not None:
        o, s = os.path.realpath(out), os.path.realpath(source)
        if o == s or o.startswith(s + os.sep) or s.startswith(o + os.sep):
            how = "is" if o == s else "lies inside" if o.startswith(s + os.sep) else "contains"
            raise ConfigError(f"--out={out!r}: {how} {source_flag} {source!r}; writing there would replace what is "
                              "read; choose another directory")  # fmt: skip
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out={out!r}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ConfigError(f"--out={out!r}: exists and is not empty; choose another or pass --force to replace it")


def replace_dir(tmp: str, out: str) -> None:
    """Moves the finished `tmp` to `out`, replacing what was there only once the new one is complete."""
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export(
    sm,
    params,
    out: str,
    family: Family,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 10**9,
    base_config: dict | None = None,
    extra_files: dict[str, str] | None = None,
    force: bool = False,
    rest=None,
) -> dict:
    """Writes config.json and the safetensors (sharded above max_shard_bytes, with the index) into `out`, atomically:
    a temporary directory beside it, renamed into place when complete. Returns a summary."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: valid: {', '.join(DTYPES)}")
    prepare_out(out, force)
    np_dtype = DTYPES[dtype]
    if np_dtype == "bfloat16":
        np_dtype = ml_dtypes.bfloat16
    out = os.path.abspath(out.rstrip("/"))
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files: list[str] = []
        weight_map: dict[str, str] = {}
        shard: dict[str, np.ndarray] = {}
        shard_bytes = total = 0

        def flush():
            name = f"part-{len(files):05d}.safetensors"  # renamed once the number of shards is known
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            files.append(name)
            shard.clear()

        tensors = hf_tensors_of(sm, params, family, np_dtype)
        if family.rest and rest is not None:  # the routing bias (V3's e_score_correction_bias); none: no tensor
            tensors = itertools.chain(tensors, hf_tensors_of(sm, rest, family, np_dtype, family.rest))
        for name, x in tensors:
            if shard and shard_bytes + x.nbytes > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard[name] = np.ascontiguousarray(x)
            shard_bytes += x.nbytes
            total += x.nbytes
        flush()
        n = len(files)
        final = {
            f: "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            for i, f in enumerate(files)
        }
        for a, b in final.items():
            os.rename(os.path.join(tmp, a), os.path.join(tmp, b))
        weight_map = {k: final[f] for k, f in sorted(weight_map.items())}
        if n > 1:
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        config = hf_config(sm.cfg.model, family, dtype, base_config)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "files": sorted(final.values()),
        "tensors": len(weight_map),
        "bytes": total,
        "model_type": family.model_type,
    }
