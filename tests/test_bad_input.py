"""Bad input as a new user types it: each case one line on stderr, exit status 2, no traceback, nothing deleted or
half-written (issue 32's twelve defects, each a test); tables sent to a file keep every character; and a fuzz over
every command's options and overrides."""

import argparse
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from conftest import ROOT

from moe_jax import cli
from moe_jax.arguments import POSITIVE, build_parser

HF = os.path.join(ROOT, "tests", "fixtures", "hf")
jax.devices()  # JAX starts here with conftest's 8 devices, whichever command below runs first (import-hf takes 1 of them)
TINY = [f"--config={ROOT}/configs/tiny.yaml", f"--layout={ROOT}/meshes/cpu8-ep8.yaml"]


def one_line(argv, capsys) -> str:
    """Runs `moe-jax ARGV` here; asserts exit 2 and one line on stderr; returns it."""
    capsys.readouterr()
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err[-2000:])
    assert err.count("\n") == 1 and err.startswith("moe-jax") and "Traceback" not in err, (argv, err[-2000:])
    return err


def tree(path) -> dict[str, int]:
    """Every file under `path` with its size: what must be left as it was."""
    return {os.path.relpath(os.path.join(r, f), path): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(path) for f in fs}  # fmt: skip


@pytest.fixture
def mixtral(tmp_path):
    """A copy of the Mixtral fixture (never the committed one: these cases try to delete what they read)."""
    d = tmp_path / "mixtral"
    shutil.copytree(os.path.join(HF, "mixtral"), d)
    return d


@pytest.fixture
def mixtral_ckpt(tmp_path, mixtral, capsys):
    out = tmp_path / "ck"
    assert cli.main(["import-hf", str(mixtral), "--out", str(out), f"--layout={ROOT}/meshes/cpu8-ep8.yaml"]) == 0
    capsys.readouterr()
    return out


def test_export_as_a_family_whose_tensors_the_checkpoint_lacks(mixtral_ckpt, tmp_path, capsys):
    for family, lacks in (("olmoe", "q/k norms over the projection"), ("qwen3_moe", "per-head q/k norms"),
                          ("qwen2_moe", "q/k/v biases")):  # fmt: skip
        err = one_line(
            ["export-hf", str(mixtral_ckpt), "--out", str(tmp_path / family), "--model-type", family], capsys
        )
        assert f"--model-type={family}: {family} models have {lacks}" in err and "exports as mixtral" in err
        assert not (tmp_path / family).exists()


def test_an_output_that_is_holds_or_lies_inside_the_input_is_refused_even_with_force(mixtral, mixtral_ckpt, tmp_path,
                                                                                      capsys):  # fmt: skip
    before, before_ck = tree(mixtral), tree(mixtral_ckpt)
    for out, how in ((mixtral, "is"), (mixtral / "sub", "lies inside"), (tmp_path, "contains")):
        err = one_line(["import-hf", str(mixtral), "--out", str(out), "--force"], capsys)
        assert f"{how} the Hugging Face directory" in err
    for out, how in ((mixtral_ckpt, "is"), (mixtral_ckpt / "x", "lies inside"), (tmp_path, "contains")):
        err = one_line(["export-hf", str(mixtral_ckpt), "--out", str(out), "--force"], capsys)
        assert f"{how} the checkpoint" in err
    assert tree(mixtral) == before and tree(mixtral_ckpt) == before_ck


def test_empty_data_files(tmp_path, capsys):
    for name in ("empty.npy", "empty.bin"):
        (tmp_path / name).write_bytes(b"")
        err = one_line(["train", *TINY, "--data", str(tmp_path / name)], capsys)
        assert "the file is empty (0 bytes)" in err


def test_a_config_json_value_of_the_wrong_type_or_range_names_its_key(mixtral, tmp_path, capsys):
    config = json.loads((mixtral / "config.json").read_text())
    for key, value, message in (
        ("num_local_experts", "eight", "num_local_experts='eight': expected an integer"),
        ("num_experts_per_tok", 99, f"num_experts_per_tok=99: must be in 1..model.experts={config['num_local_experts']} "
                                    "(moe_jax's model.top_k)"),
    ):  # fmt: skip
        (mixtral / "config.json").write_text(json.dumps({**config, key: value}))
        err = one_line(["import-hf", str(mixtral), "--out", str(tmp_path / "o")], capsys)
        assert f"{mixtral}/config.json: {message}" in err, err
        assert not (tmp_path / "o").exists()


def test_generate_refuses_nan_temperature_and_negative_show(capsys):
    assert "argument --temperature: nan: valid: a finite number >= 0" in one_line(
        ["generate", "--prompt-tokens", "1,2", "--temperature", "nan"], capsys
    )
    assert "argument --show: -1: valid: an integer >= 0" in one_line(
        ["generate", "--prompt-tokens", "1,2", "--show", "-1"], capsys
    )


def test_generate_checkpoint_says_what_the_directory_is(mixtral, tmp_path, capsys):
    assert f"--checkpoint='{mixtral}': a Hugging Face checkpoint (it has a config.json), not a moe_jax one; read it " \
           f"with --hf {mixtral}" in one_line(["generate", "--checkpoint", str(mixtral), "--prompt-tokens", "1"], capsys)  # fmt: skip
    assert "no such directory" in one_line(["generate", "--checkpoint", str(tmp_path / "no"), "--prompt-tokens", "1"],
                                           capsys)  # fmt: skip
    assert "no complete moe_jax checkpoint in it" in one_line(
        ["generate", "--checkpoint", str(tmp_path), "--prompt-tokens", "1"], capsys
    )


def test_a_failed_train_leaves_no_empty_checkpoint_dir(mixtral, tmp_path, capsys):
    for extra in (["--resume"], ["model.attention_impl=cudnn"]):
        ck = tmp_path / "ck"
        one_line(["train", *TINY, "--steps", "2", "--checkpoint-dir", str(ck), *extra], capsys)
        assert not ck.exists(), extra
    ck = tmp_path / "ck"
    one_line(["train", "--init-from-hf", str(mixtral), *TINY, "--checkpoint-dir", str(ck)], capsys)
    assert not ck.exists()


def test_a_model_section_beside_a_hugging_face_model_is_refused(mixtral, tmp_path, capsys):
    err = one_line(["import-hf", str(mixtral), "--out", str(tmp_path / "o"), "--config", f"{ROOT}/configs/tiny.yaml"],
                   capsys)  # fmt: skip
    assert f"--config='{ROOT}/configs/tiny.yaml': model.vocab=97, but the model is {mixtral}/config.json, which gives " \
           "133" in err  # fmt: skip


def test_a_model_config_or_an_assignment_given_as_layout(capsys):
    err = one_line(["plan", "--layout", f"{ROOT}/configs/tiny.yaml"], capsys)
    assert "a model config (sections" in err and "pass it as --config" in err and len(err) < 300
    err = one_line(["plan", "--layout", f"{ROOT}/meshes/cpu8-ep8.json"], capsys)
    assert "an assignment file (what `moe-jax mesh --json` writes), not a layout" in err and len(err) < 300


def test_negative_token_ids_are_refused_at_load_naming_data(tmp_path, capsys):
    np.save(tmp_path / "neg.npy", np.array([3, -1] * 50, np.int32))
    err = one_line(["train", *TINY, "--data", str(tmp_path / "neg.npy")], capsys)
    assert f"--data='{tmp_path}/neg.npy': token id -1 is negative" in err


def test_an_integer_weight_in_a_checkpoint_is_refused_not_cast(mixtral, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    path = mixtral / "model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith("block_sparse_moe.gate.weight"))
    tensors[name] = tensors[name].astype(np.int32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    err = one_line(["import-hf", str(mixtral), "--out", str(tmp_path / "o"), f"--layout={ROOT}/meshes/cpu8-ep8.yaml"],
                   capsys)  # fmt: skip
    assert f"tensor {name} is I32; a weight must be floating point" in err


@pytest.mark.parametrize("argv", [["mesh"], ["plan"], ["plan", "--search", "--devices", "128"]])
def test_tables_sent_to_a_file_keep_every_character(argv, tmp_path):
    """A real process whose stdout is a file: no cell cut to an ellipsis, every range of the assignment whole."""
    import subprocess
    import sys

    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "moe_jax.cli", *argv], cwd=ROOT, stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="80"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "…" not in text and "\x1b[" not in text  # plain text: no cut cell, no colour codes
    if argv == ["mesh"]:  # the seed-128 assignment: experts 4 per device, the vocabulary's halves, every range whole
        assert "16000:32000" in text and "1024:2048" in text and "0:1 +16j, j<8" in text
        assert re.search(r"\b60-63\b", text)


# --------------------------------------------------------------------------------------------------- the fuzz

BAD_INTS = ["0", "-1", "x", "1.5", "", "nan", "1e9999", "--", "0x10", "2 3"]
BAD_FLOATS = ["nan", "inf", "-1", "x", ""]
BAD_OVERRIDES = [
    "model.top_k=0", "model.top_k=x", "model.experts=-1", "model.d_model=1.5", "layout.pp=0", "layout.ep=3",
    "run.lr=-1", "run.lr=nan", "run.dtype=fp8", "run.nonfinite=maybe", "run.max_skips=0", "model.bogus=1", "bogus",
    "=1", "model.=1", "run.batch=[1, 2]", "model.ffn=", "layout.remat=sometimes", "run.seq_len=-5",
]  # fmt: skip


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser("")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _cases() -> list[tuple[str, list[str]]]:
    """(command, argv) for every command: bad values of each typed option, of each choice, missing and unwritable
    paths, and bad overrides where the command takes them."""
    cases = []
    # What each command needs besides the bad value; the tiny model where a command takes a config, so that a bad
    # value that got through would run a small job (and fail the test), not the seed's on 128 devices.
    needs = {"import-hf": [os.path.join(HF, "mixtral"), "--out", "/tmp/moe-jax-fuzz-never-written"],
             "export-hf": ["/nonexistent-checkpoint", "--out", "/tmp/moe-jax-fuzz-never-written"],
             "schedule": ["--pp", "2", "--microbatches", "4"], "generate": ["--prompt-tokens", "1", *TINY],
             "demo": [f"--config={ROOT}/configs/tiny.yaml"], "audit": []}  # fmt: skip
    for name, p in _commands().items():
        base = [name, *needs.get(name, TINY)]
        takes_overrides = any(a.dest == "overrides" for a in p._actions)
        for a in p._actions:
            if not a.option_strings or a.option_strings[0] in ("-h", "--perturb"):
                continue
            flag = a.option_strings[0]
            if a.choices:
                cases.append((name, [*base, flag, "bogus"]))
            elif a.type is float or getattr(a.type, "__qualname__", "").startswith("number"):
                cases += [(name, [*base, flag, v]) for v in BAD_FLOATS]
            elif a.type is not None:  # 0 is good where the option takes it (--process-id, --seed)
                cases += [(name, [*base, flag, v]) for v in BAD_INTS if v != "0" or a.type in (POSITIVE,)]
            elif a.nargs == 0:
                continue
            elif flag in ("--config", "--layout", "--data", "--hf", "--init-from-hf", "--checkpoint"):
                cases += [(name, [*base, flag, "/nonexistent/x.yaml"]), (name, [*base, flag, "/proc"])]
            elif flag in ("--json", "--png", "--metrics", "--out", "--dump", "--profile", "--checkpoint-dir"):
                cases += [(name, [*base, flag, v]) for v in ("/proc/forbidden/x", "/proc", "", "/dev/null/x")]
            elif flag == "--target":
                cases += [(name, [*base, flag, v]) for v in ("v9:4x4", "v5p:0x4x4", "v5p", "tpu")]
            elif flag == "--hardware":
                cases += [(name, [*base, flag, "h1000"])]
        if takes_overrides and name not in ("audit", "schedule"):
            cases += [(name, [*base, o]) for o in BAD_OVERRIDES]
    return cases


def test_every_command_refuses_generated_bad_input_in_one_line(capsys):
    """30 or more bad values per command (audit, whose one option is its output path, gets 4), each refused before any
    work: the whole fuzz takes seconds."""
    cases = _cases()
    per_command = {}
    for name, _ in cases:
        per_command[name] = per_command.get(name, 0) + 1
    assert len(per_command) == len(_commands()), per_command
    assert all(n >= 30 for name, n in per_command.items() if name != "audit") and per_command["audit"] >= 4
    failures = []
    for _, argv in cases:
        capsys.readouterr()
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
        except Exception as e:  # noqa: BLE001 - a traceback is the failure being looked for
            rc = f"{type(e).__name__}: {e}"
        err = capsys.readouterr().err
        if rc != 2 or err.count("\n") != 1 or not err.startswith("moe-jax") or "Traceback" in err:
            failures.append((argv, rc, err[-300:]))
    assert not os.path.exists("/tmp/moe-jax-fuzz-never-written")
    assert not failures, f"{len(failures)} of {len(cases)} cases: " + "\n".join(map(str, failures[:20]))


def test_an_unsupported_config_json_names_the_supported_families(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4", "hidden_size": 5120}))
    for argv in (["plan", "--hf", str(tmp_path)], ["plan", "--config", str(tmp_path / "config.json")]):
        err = one_line(argv, capsys)
        assert "model_type='llama4': not supported; supported: mixtral, qwen3_moe, olmoe, qwen2_moe" in err
