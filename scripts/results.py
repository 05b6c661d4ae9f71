"""What the result-writing scripts share: the header of a results file (JAX, the machine, the commit), the record of
the sources it was made from, and writing it atomically (a file that is there is whole).

Freshness. A committed result stands for a check only while the code it ran is the code in the tree. `write_json`
records under "sources" the command that made the file and the SHA-256 of every file of this repository the run
read: the modules it imported from moe_jax/ and scripts/ (taken from `sys.modules` when the file is written, so
lazily imported modules count) and the configs, meshes and fixtures it opened (seen by an audit hook installed when
this module is imported, so a script imports it before it reads any). `stale(path)` lists what changed since.
tests/test_results.py fails on a stale file that a test reads in place of running it, naming the file and its
command; `python scripts/results.py` lists every results file with its state, `--rerun` reruns the stale ones.

The record is conservative: a module imported but not used still counts, so a change to it asks for a rerun.
Package versions (jax) are recorded in the header, not hashed: a result is of this repository's code.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a result can depend on besides the modules it imported: the data files it opened under these folders.
DATA_DIRS = ("configs", "meshes", os.path.join("tests", "fixtures"))
_opened: set[str] = set()


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str):
        path = os.path.realpath(args[0])
        if path.startswith(ROOT + os.sep) and os.path.isfile(path):
            rel = os.path.relpath(path, ROOT)
            if rel.startswith(DATA_DIRS):
                _opened.add(rel)


sys.addaudithook(_record_open)


def header() -> dict[str, Any]:
    import jax

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"jax": jax.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "commit": commit.stdout.strip()}  # fmt: skip


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def imported_sources() -> set[str]:
    """This repository's Python files imported by this process (moe_jax/ and scripts/, not tests/)."""
    out = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        path = os.path.realpath(path)
        rel = os.path.relpath(path, ROOT)
        if path.startswith(ROOT + os.sep) and rel.startswith(("moe_jax" + os.sep, "scripts" + os.sep)):
            out.add(rel)
    return out


def sources(command: str | None = None) -> dict[str, Any]:
    """The record written under "sources": the command that made the file (this process's, by default) and the hash
    of every repository file this process imported or opened."""
    if command is None:
        script = os.path.relpath(os.path.realpath(sys.argv[0]), ROOT)
        command = shlex.join(["python", script, *sys.argv[1:]])
    files = {rel: file_hash(os.path.join(ROOT, rel)) for rel in sorted(imported_sources() | _opened)}
    return {"command": command, "sha256": _digest(files), "files": files}


def stale(record: dict[str, Any], root: str = ROOT) -> list[str]:
    """The recorded files that changed or are gone since the record was made (empty: fresh), checked in `root`."""
    if _digest(record["files"]) != record["sha256"]:
        return ["(the record itself was edited)"]
    out = []
    for rel, want in record["files"].items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            out.append(f"{rel} (gone)")
        elif file_hash(path) != want:
            out.append(rel)
    return out


def read_record(path: str, root: str = ROOT) -> dict[str, Any] | None:
    """The "sources" record of the results file at `path` (relative to root), or None if it has none."""
    with open(os.path.join(root, path)) as f:
        return json.load(f).get("sources")


def freshness_error(path: str, root: str = ROOT, record: dict[str, Any] | None = None) -> str | None:
    """One line saying why the results file at `path` (relative to root) is stale and what remakes it; None if
    fresh. `record`: its "sources", if the caller has read them already."""
    record = record or read_record(path, root)
    if record is None:
        return f"{path} records no sources: remake it with its script (it writes them through scripts/results.py)"
    changed = stale(record, root)
    if not changed:
        return None
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return f"{path} is stale: {shown} changed since it was made; rerun `{record['command']}` and commit the result"


def write_json(path: str, obj: Any, command: str | None = None) -> None:
    """Writes obj with its "sources" record (taken now, after the run: every module it imported is loaded)."""
    obj = {**obj, "sources": sources(command)}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="The committed results files and whether each is fresh.")
    ap.add_argument("--rerun", action="store_true", help="rerun the command of every stale file, in turn")
    args = ap.parse_args()
    folder = os.path.join("docs", "results")
    todo = []
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if not name.endswith(".json"):
            continue
        path = os.path.join(folder, name)
        record = read_record(path)
        why = freshness_error(path, record=record)
        print(why or f"{path}: fresh")  # a reason starts with the path
        if why and record:
            todo.append(record["command"])
    if args.rerun:
        for command in dict.fromkeys(todo):
            print(f"$ {command}", flush=True)
            argv = shlex.split(command)
            subprocess.run([sys.executable, *argv[1:]] if argv[0] == "python" else argv, cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
