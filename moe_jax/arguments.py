"""`moe-jax`'s arguments: one parser, a subcommand per command (commands.py maps each name to its function), and the
check of every output path before any work. Light on purpose: nothing here imports JAX."""

from __future__ import annotations

import argparse
import math
import os
import tempfile

from moe_jax.config import ConfigError
from moe_jax.plan.hardware import PROFILES


class UsageError(Exception):
    """A mistake in the command line, as one line: cli.main prints it and returns 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (argparse prints its usage first, a screen of it for some
    commands): `moe-jax train: error: argument --steps: 'x' is not an integer; valid: an integer >= 1`."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def at_least(lo: int):
    """An argparse type: an integer >= lo, or one line naming the value and what is valid."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; valid: an integer >= {lo}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value}: valid: an integer >= {lo}")
        return value

    return parse


def number(lo: float, inclusive: bool = True):
    """An argparse type: a finite number >= lo (> lo unless `inclusive`)."""
    valid = f"a finite number {'>=' if inclusive else '>'} {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: {valid}") from None
        if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"{text}: valid: {valid}")
        return value

    return parse


POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)


def _args(p: argparse.ArgumentParser, *specs) -> None:
    """Adds each spec: a flag name, (a name, a help text), or (a name, a dict of add_argument's keywords)."""
    for spec in specs:
        name, extra = (spec, None) if isinstance(spec, str) else spec
        kw = extra if isinstance(extra, dict) else {"help": extra} if extra else {}
        p.add_argument(name, **kw)


def _config_args(p, config_help="model/run YAML (default: the seed's model, embedded)",
                 layout_help="layout YAML from meshes/ (default: the config's layout, else seed-128)") -> None:  # fmt: skip
    _args(p, ("--config", config_help), ("--layout", layout_help),
          ("overrides", {"nargs": "*", "metavar": "key=value", "help": "e.g. model.top_k=1 layout.ep=4 run.batch=64"}))  # fmt: skip


def _hf_args(p) -> None:
    _args(p, ("--hf", {"metavar": "DIR", "help": "a Hugging Face model's directory (or its config.json): the model "
                       "from config.json, no weights read; --config then gives run and layout only (so does a "
                       "config.json given as --config)"}))  # fmt: skip


def _device_args(p) -> None:
    _args(p, ("--devices", {"type": POSITIVE, "help": "number of fake CPU devices (default: the layout's device count); "
                                                 "ignored with --real"}),
          ("--real", {"action": "store_true", "help": "use this machine's accelerators instead of fake CPU devices"}))  # fmt: skip


def _target_args(p) -> None:
    _args(p, ("--target", {"default": "cpu", "help": "what to compile for: cpu (XLA:CPU's fake devices, at most 2048), "
                           "or a TPU topology compiled by libtpu here without a TPU: v5p:AxBxC, v4:AxBxC, v5e:AxB, "
                           "v6e:AxB (pip install -e '.[tpu]')"}),
          ("--slices", {"type": POSITIVE, "default": 1, "help": "TPU slices of --target's topology (multi-slice over DCN)"}))  # fmt: skip


def _distributed_args(p) -> None:
    g = p.add_argument_group("several processes (one per host; see docs/launch.md)")
    _args(g, ("--coordinator", "HOST:PORT of process 0's coordinator"), ("--num-processes", {"type": POSITIVE}),
          ("--process-id", {"type": NON_NEGATIVE}),
          ("--distributed", {"action": "store_true", "help": "let jax.distributed detect the cluster (Slurm, TPU)"}),
          ("--local-devices", {"type": POSITIVE, "help": "fake CPU devices in this process (local multi-process runs)"}),
          ("--init-timeout", {"type": POSITIVE, "default": 60, "help": "seconds to wait for every process to join"}),
          ("--heartbeat-timeout", {"type": POSITIVE, "default": 20, "help": "seconds of silence before a peer is lost"}))  # fmt: skip


def _flag(text: str) -> dict:
    return {"action": "store_true", "help": text}


def _command(sub, name: str, text: str, outputs: dict[str, bool] | None = None, **defaults):
    """A subcommand; `outputs`: its output path options (dest -> is a directory), checked before any work."""
    p = sub.add_parser(name, help=text)
    p.set_defaults(outputs=outputs or {}, **defaults)
    return p


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = Parser(prog="moe-jax", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    json_out, steps = ("--json", "write the result here as JSON"), ("train", "prefill", "decode")

    p = _command(sub, "mesh", "the exact device assignment of a layout: table, JSON and picture",
                 {"json": False, "png": False})  # fmt: skip
    _config_args(p), _hf_args(p), _device_args(p), _target_args(p), _distributed_args(p)
    _args(p, ("--json", "write the assignment JSON here"), ("--png", "draw the mesh picture here"),
          ("--full", _flag("list every group instead of the first and last few")),
          ("--no-check", _flag("skip the check against JAX's placement of every parameter")),
          ("--width", {"type": at_least(40), "help": "terminal width for the table"}))  # fmt: skip

    p = _command(sub, "verify", "one train step sharded and on one device: loss, router terms, gradients",
                 {"json": False})  # fmt: skip
    _config_args(p), _hf_args(p), _device_args(p)
    _args(
        p,
        ("--json", "write the errors here"),
        ("--seed", {"type": NON_NEGATIVE, "default": 0}),
        ("--perturb", {"type": float, "help": argparse.SUPPRESS}),
    )  # self-test: shows the check can fail

    p = _command(sub, "train", "train on the mesh: synthetic task by default, or --data token files",
                 {"metrics": False, "checkpoint_dir": True, "profile": True})  # fmt: skip
    _config_args(p), _device_args(p), _distributed_args(p)
    _args(p, ("--steps", {"type": POSITIVE, "help": "the run's length, run.steps: it also sets the learning-rate schedule"}),
          ("--stop-at", {"type": POSITIVE, "metavar": "STEP", "help": "end this invocation at STEP (checkpointed) without "
                         "changing the run; --resume continues it"}),
          ("--allow-config-change", _flag("with --resume: accept a model or run config that differs from the "
                                          "checkpoint's")),
          ("--data", "token file: .npy, or .bin of uint16 / uint32 (default: the synthetic task)"),
          ("--data-dtype", {"default": "uint16", "help": "token dtype of a .bin file: uint16 or uint32"}),
          ("--metrics", "write one JSON line per step here"), "--checkpoint-dir",
          ("--checkpoint-every", {"type": POSITIVE, "default": 50}),
          ("--keep", {"type": POSITIVE, "default": 3, "help": "checkpoints to keep"}),
          ("--resume", _flag("continue from the latest checkpoint in --checkpoint-dir")),
          ("--init-from-hf", {"metavar": "DIR", "help": "start from a Hugging Face checkpoint's weights (its "
                              "config.json is the model)"}),
          ("--profile", "write a jax.profiler trace of steps 3-5 here"))  # fmt: skip

    p = _command(sub, "demo", "the main job: assignment, a check against one device, training, generation, pictures",
                 {"out": True})  # fmt: skip
    _config_args(p, "default: the tiny config", "a layout name from meshes/ (default: cpu8-pp2-ep2-tp2, 8 devices)")
    _device_args(p)
    _args(p, ("--steps", {"type": POSITIVE, "default": 150, "help": "training steps (150 learn the task to about 94%%)"}),
          ("--out", {"default": "out/demo", "help": "pictures and metrics go here"}))  # fmt: skip

    p = _command(sub, "generate", "prefill a prompt and decode on the mesh, greedy or sampled")
    _config_args(p, "default: the weights' own model (the tiny config's for the demo checkpoint)",
                 "default: one device with --hf, the checkpoint's own, else the demo's layout")  # fmt: skip
    _device_args(p), _distributed_args(p)
    _args(p, ("--checkpoint", "a checkpoint directory of `moe-jax train` or `import-hf` (default: the demo's, if any)"),
          ("--hf", {"metavar": "DIR", "help": "a Hugging Face checkpoint directory, read straight into the shards"}),
          ("--prompt", "text, tokenized with the checkpoint's tokenizer.json; the output is text"),
          ("--prompt-tokens", "token ids, e.g. 3,14,15"), ("--max-new", {"type": POSITIVE, "default": 16}),
          ("--temperature", {"type": number(0), "default": 0.0, "help": "0: greedy"}),
          ("--top-k", {"type": NON_NEGATIVE, "default": 0}),
          ("--batch", {"type": POSITIVE, "help": "sequences (copies of the prompt); default: the layout's minimum"}),
          ("--show", {"type": NON_NEGATIVE, "default": 4, "help": "rows to print"}), ("--seed", {"type": NON_NEGATIVE, "default": 0}))  # fmt: skip

    p = _command(sub, "import-hf", "a Hugging Face checkpoint (Mixtral, Qwen3-MoE, OLMoE, Qwen1.5/2-MoE) -> a "
                 "moe_jax checkpoint, each device reading only its own slices", {"out": True})  # fmt: skip
    _args(p, ("dir", "the Hugging Face directory: config.json and *.safetensors (an index if sharded)"),
          ("--out", {"required": True, "help": "the checkpoint directory to write"}),
          ("--force", _flag("replace --out if it exists and is not empty")))  # fmt: skip
    _config_args(p, "a run section to keep with the weights (default: config.json's dtype)",
                 "the layout whose shards are read (default: one device)")  # fmt: skip
    _device_args(p), _distributed_args(p)

    p = _command(sub, "export-hf", "a moe_jax checkpoint -> a Hugging Face directory that transformers loads",
                 {"out": True})  # fmt: skip
    _args(p, ("checkpoint", "a checkpoint directory of `moe-jax train` or `import-hf`"),
          ("--out", {"required": True, "help": "the directory to write: config.json, safetensors (+ index)"}),
          ("--force", _flag("replace --out if it exists and is not empty")),
          ("--dtype", {"default": "float32", "choices": ("float32", "bfloat16", "float16")}),
          ("--max-shard-size", {"default": "5GB", "help": "split the safetensors above this size (default 5GB)"}),
          ("--model-type", {"choices": ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe"), "help": "the family to write "
                            "(default: the imported one, else the one the architecture matches)"}))  # fmt: skip
    _config_args(p, argparse.SUPPRESS, "the layout to restore onto (default: the checkpoint's own)")
    _device_args(p)

    p = _command(sub, "compile", "compile a step for the layout on fake devices or a TPU topology: memory, FLOPs, "
                 "collectives", {"dump": True, "json": False})  # fmt: skip
    _config_args(p), _hf_args(p), _device_args(p), _target_args(p)
    _args(p, ("--step", {"default": "train", "choices": steps}), json_out,
          ("--dump", "write the HLO before and after optimisation and XLA's buffer assignment here"))  # fmt: skip

    p = _command(sub, "plan", "the analytic plan of a layout, or --search every layout of --devices N",
                 {"json": False}, real=False)  # fmt: skip
    _config_args(p), _hf_args(p)
    _args(p, ("--hardware", {"default": "seed", "help": ", ".join(PROFILES)}),
          ("--step", {"default": "train", "choices": steps}),
          ("--devices", {"type": POSITIVE, "help": "the device count (checked against the layout; needed by --search)"}),
          ("--search", {"action": "store_true"}), ("--top", {"type": POSITIVE, "default": 15}),
          ("--check", _flag("compile the layout on fake devices and print plan and compiler side by side, part by "
                            "part; exit 1 when a part, the total or the FLOPs differ by more than --tolerance")),
          ("--tolerance", {"type": number(0, inclusive=False), "default": 5.0, "help": "percent, for --check (default 5)"}), json_out)  # fmt: skip
    _target_args(p)

    p = _command(sub, "audit", "check every claim of the design seed; writes docs/seed-audit.md",
                 {"out": False})  # fmt: skip
    _args(p, ("--out", {"default": "docs/seed-audit.md"}))

    p = _command(sub, "schedule", "a pipeline schedule: ticks, utilisation, memory, and its chart",
                 {"json": False, "png": False})  # fmt: skip
    _args(p, ("--pp", {"type": POSITIVE, "required": True}), ("--microbatches", {"type": POSITIVE, "required": True}),
          ("--repeats", {"type": POSITIVE, "default": 1, "help": "circular repeats v (default 1: contiguous stages)"}),
          ("--layers", {"type": POSITIVE, "help": "layers, for the per-tick memory figures"}),
          ("--remat", {"default": "layer", "choices": ("none", "tick", "layer")}),
          ("--schedule", {"default": "gpipe", "choices": ("gpipe", "1f1b"), "help": "gpipe, or 1f1b (interleaved "
                          "with --repeats > 1)"}), json_out, ("--png", "draw the chart here"))  # fmt: skip

    p = _command(sub, "hlo", "the train step's HLO and the audit of its collectives against the expected set",
                 {"out": True, "json": False})  # fmt: skip
    _config_args(p), _hf_args(p), _device_args(p), _target_args(p)
    _args(p, ("--out", "write before/after_optimizations.hlo.txt here"),
          ("--json", "write the collective table and the audit here"))  # fmt: skip
    return parser


POSITIONALS = {("import-hf", "dir"): "DIR", ("export-hf", "checkpoint"): "CHECKPOINT"}


def check_not_empty(args: argparse.Namespace) -> None:
    """Refuses a path or name given as '' (a shell variable that was not set): taken as absent it would run the
    default job, and as a path it would be the current directory."""
    for dest, value in vars(args).items():
        if value == "":
            name = POSITIONALS.get((args.command, dest), "--" + dest.replace("_", "-"))
            raise ConfigError(f"{name}='': empty; give a value (see moe-jax {args.command} --help)")


def check_output(path: str, field: str, directory: bool) -> None:
    """Refuses an output path that cannot be written, before any work is done and without creating anything: the
    deepest part of the path that exists must be a directory in which a probe file can be made (and is removed)."""
    full = os.path.abspath(path)
    if directory and os.path.exists(full) and not os.path.isdir(full):
        raise ConfigError(f"{field}={path!r}: is a file, not a directory")
    if not directory and os.path.isdir(full):
        raise ConfigError(f"{field}={path!r}: is a directory; give a file path")
    existing = full if directory else os.path.dirname(full)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{field}={path!r}: cannot write there: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".moe-jax-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"{field}={path!r}: cannot write there: making a file in {existing} fails ({e.strerror or e})"
        ) from None
