"""`moe-jax` and its subcommands: parse, call, print.

Mistakes in configs and inputs end as one line on stderr and exit status 2."""

from __future__ import annotations

import sys

from moe_jax.arguments import UsageError, build_parser, check_not_empty, check_output
from moe_jax.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value overrides after an option that follows a positional (import-hf DIR --out X key=value)
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = [*args.overrides, *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        check_not_empty(args)
        for dest, directory in getattr(args, "outputs", {}).items():
            if getattr(args, dest, None):
                check_output(getattr(args, dest), "--" + dest.replace("_", "-"), directory)
        # Imported once the arguments are read, on purpose: the commands import JAX and the whole package (2 s), which
        # `--help` and a mistyped option do not need (0.1 s).
        from moe_jax.commands import COMMANDS

        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"moe-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that could not be read or written after the checks (full disk, removed directory)
        where = f" {e.filename!r}:" if e.filename else ""
        print(f"moe-jax {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
