"""`moe-jax` and its subcommands: parse, call, print.

Mistakes in configs and inputs end as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from moe_jax.config import Config, ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="model/run YAML (default: the seed's model, embedded)")
    p.add_argument("--layout", help="layout YAML from meshes/ (default: the config's layout, else seed-128)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.top_k=1 layout.ep=4 run.batch=64")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--devices",
        type=int,
        help="number of fake CPU devices (default: the layout's device count); ignored with --real",
    )
    p.add_argument("--real", action="store_true", help="use this machine's accelerators instead of fake CPU devices")


def _config(args) -> Config:
    return load_config(args.config, args.layout, args.overrides)


def _setup_devices(args, cfg: Config):
    """Fake CPU devices unless --real; returns the mesh of the layout."""
    from moe_jax.mesh import make_mesh, use_fake_devices

    if not args.real:
        if args.devices is not None and args.devices < 1:
            raise ConfigError(f"--devices={args.devices}: must be a positive integer")
        use_fake_devices(args.devices if args.devices is not None else cfg.layout.devices)
    return make_mesh(cfg.layout)


def _write_json(path: str, data: Any) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ commands


def cmd_mesh(args) -> int:
    from rich.console import Console

    from moe_jax.mesh import assignment, check_placement
    from moe_jax.report import print_assignment

    cfg = _config(args)
    mesh = _setup_devices(args, cfg)
    table = assignment(cfg, mesh)
    console = Console(width=args.width or max(Console().width, 100))
    print_assignment(console, table, full=args.full)
    if not args.no_check:
        from moe_jax.model.transformer import param_table

        names, shapes = param_table(cfg)
        n = check_placement(cfg, mesh, names, shapes)
        console.print(
            f"placement check: {len(names)} parameters x {cfg.layout.devices} devices = {n} shards, each equal to "
            "JAX's devices_indices_map"
        )
    if args.json:
        _write_json(args.json, table)
        console.print(f"wrote {args.json}")
    if args.png:
        from moe_jax.viz import draw_mesh

        draw_mesh(table, args.png)
        console.print(f"wrote {args.png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mesh", help="the exact device assignment of a layout: table, JSON and picture")
    _add_config_args(p)
    _add_device_args(p)
    p.add_argument("--json", help="write the assignment JSON here")
    p.add_argument("--png", help="draw the mesh picture here")
    p.add_argument("--full", action="store_true", help="list every group instead of the first and last few")
    p.add_argument("--no-check", action="store_true", help="skip the check against JAX's placement of every parameter")
    p.add_argument("--width", type=int, help="terminal width for the table")
    p.set_defaults(func=cmd_mesh)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"moe-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
