"""`moe-jax` as a user runs it: every bad input is one line and exit status 2, refused before any work is done; the
mesh pictures show every word; train's --stop-at and --resume keep one schedule."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from moe_jax import cli
from moe_jax.layouts import load_pair
from moe_jax.load import load_config
from moe_jax.mesh import assignment
from moe_jax.plan.hardware import get_hardware
from moe_jax.plan.search import candidates, layout_counts


def one_line_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moe-jax {argv[0]}: error: "), err
    return err


@pytest.fixture
def regular_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("not a directory")
    return f


@pytest.mark.parametrize(
    "argv,message",
    [
        (["mesh", "--json", "/proc/x/a.json"], "--json='/proc/x/a.json': cannot write there: making a file in /proc"),
        (["mesh", "--png", "{file}/m.png"], "--png='{file}/m.png': cannot write there: {file} is a file"),
        (["hlo", "--out", "/proc/x"], "--out='/proc/x': cannot write there: making a file in /proc"),
        (["compile", "--dump", "{file}"], "--dump='{file}': is a file, not a directory"),
        (["train", "--checkpoint-dir", "{file}/ck"], "--checkpoint-dir='{file}/ck': cannot write there: {file} is a file"),
        (["train", "--metrics", "{dir}"], "--metrics='{dir}': is a directory; give a file path"),
        (["train", "--profile", "{file}"], "--profile='{file}': is a file, not a directory"),
        (["demo", "--out", "{file}/demo"], "--out='{file}/demo': cannot write there: {file} is a file"),
        (["plan", "--json", "/proc/x/p.json"], "--json='/proc/x/p.json': cannot write there"),
        (["audit", "--out", "/proc/x/a.md"], "--out='/proc/x/a.md': cannot write there"),
        (["schedule", "--pp", "2", "--microbatches", "2", "--png", "{dir}"], "--png='{dir}': is a directory"),
    ],
)  # fmt: skip
def test_an_output_that_cannot_be_written_is_refused_before_any_work(argv, message, regular_file, tmp_path, capsys):
    fill = {"file": str(regular_file), "dir": str(tmp_path)}
    err = one_line_error([a.format(**fill) for a in argv], capsys)
    assert message.format(**fill) in err
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # nothing was created on the way


def test_a_device_count_far_from_the_layouts_is_refused_at_once(capsys):
    # Before this check, JAX was asked for 100000 fake devices first (minutes, then killed).
    err = one_line_error(["compile", "--devices", "100000"], capsys)
    assert "devices=100000: layout pp x dp x ep x tp = 4 x 1 x 16 x 2 = 128 devices" in err
    assert "argument --devices: 0: valid: an integer >= 1" in one_line_error(["compile", "--devices", "0"], capsys)


def test_search_without_any_layout_says_why_and_which_counts_have_one(capsys):
    # 7 devices have one since uneven stages (pp 7: stages of 3, 3, 2, 2, 2, 2, 2 layers); 17 (prime, more than the
    # 16 layers, and no other axis takes a factor of 17) has none
    err = one_line_error(["plan", "--devices", "17", "--search"], capsys)
    assert (
        "--devices=17: no layout of 17 devices exists for this model and batch: pp must be at most model.layers=16"
        in err
    )
    assert "the nearest device counts with layouts: 16 and 18 (at most 2048)" in err
    assert "argument --devices: 0: valid: an integer >= 1" in one_line_error(["plan", "--devices", "0", "--search"],
                                                                              capsys)  # fmt: skip
    err = one_line_error(["plan", "--devices", "4096", "--search"], capsys)
    assert "nearest device counts with layouts: 2048 (at most 2048)" in err


def test_search_where_no_layout_fits_names_the_smallest(capsys):
    err = one_line_error(["plan", "--devices", "1", "--search", "run.seq_len=10240"], capsys)
    assert "--devices=1: none of the" in err and "fits seed's 64 GB per device; the smallest" in err


def test_layout_counts_are_exactly_the_counts_the_search_finds_layouts_for():
    """The cheap count rule behind the error message agrees with the search's own candidates, count by count."""
    cfg = load_config("configs/tiny.yaml", None, check=False)
    counts = set(layout_counts(cfg))
    hw = get_hardware("seed")
    assert {n for n in range(1, 200) if candidates(cfg, n, hw.devices_per_host)} == {c for c in counts if c < 200}
    assert 7 not in counts and 8 in counts


@pytest.mark.parametrize("name", ["cpu8-pp2-ep2-tp2", "seed-128", "seed-512"])
def test_mesh_picture_keeps_every_word_inside(name):
    import matplotlib.pyplot as plt

    from moe_jax.viz import mesh_figure

    fig = mesh_figure(assignment(load_pair(name)))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    texts = [ax.title, *ax.texts]
    assert "tp rank" in ax.title.get_text()
    for t in texts:
        box = t.get_window_extent(renderer)
        inside = fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
        assert inside, f"{name}: {t.get_text()[:40]!r} at {box.bounds} leaves the figure {fig.bbox.bounds}"
    plt.close(fig)


def _readme_commands() -> list[str]:
    """The commands of the README's block that follows the demo (each line: a command, then `# what it does`)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("<!-- commands checked by tests/test_cli.py -->", 1)[1].split("```bash\n", 1)[1]
    return [line.split("#")[0].strip() for line in block.split("```")[0].splitlines() if line.strip()]


def _as_run(command: str) -> list[str]:
    """'moe-jax ARGS' as printed -> argv: the installed entry point beside this Python (or the module)."""
    words = shlex.split(command)
    assert words[0] == "moe-jax", command
    script = os.path.join(os.path.dirname(sys.executable), "moe-jax")
    return ([script] if os.path.exists(script) else [sys.executable, "-m", "moe_jax.cli"]) + words[1:]


def run(command: str, cwd, timeout: int = 600) -> str:
    proc = subprocess.run(_as_run(command), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_demo_and_every_command_it_and_the_readme_print_run_as_printed(tmp_path):
    """In a fresh folder holding the repository's configs/ and meshes/ (a user's checkout): `moe-jax demo`, the
    generate command it prints, then the README's command block after the demo and the demo's `next:` lines (the
    same commands). Each runs as written and prints what it says. One test, so nothing waits on another worker."""
    user_dir = tmp_path
    for name in ("configs", "meshes"):
        os.symlink(os.path.join(ROOT, name), user_dir / name)
    demo = run("moe-jax demo", user_dir)
    assert "equal" in demo.split("1. the sharded first step against one device")[1].splitlines()[1]
    assert (user_dir / "out/demo/mesh.png").stat().st_size > 10_000
    assert (user_dir / "out/demo/loss.png").stat().st_size > 10_000
    rows = [json.loads(x) for x in (user_dir / "out/demo/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 150 and rows[-1]["loss"] < rows[0]["loss"] - 3.0
    right, total = map(int, re.search(r"held-out continuations: (\d+) of (\d+) tokens right", demo).groups())
    assert right > 0.75 * total, demo  # the trained model does the task (chance: 1 token in 97)
    example = re.search(r"e\.g\. rule \d+: (\[[\d, ]+\]) -> (\[[\d, ]+\])", demo)
    prompt, continuation = json.loads(example.group(1)), json.loads(example.group(2))
    command = re.search(r"continue a prompt with it: (moe-jax generate .*)", demo).group(1).strip()
    assert f"--prompt-tokens {','.join(map(str, prompt))}" in command

    from moe_jax.demo import DEMO_NEXT
    from moe_jax.train.data import SyntheticTask

    commands = _readme_commands()
    assert commands[0] == command  # the README shows the command the demo prints
    assert [c.split("   (")[0] for c in DEMO_NEXT] == commands[1:]
    assert [line.split("next: ")[1] for line in demo.splitlines() if "  next: " in line] == list(DEMO_NEXT)
    outputs = {c: run(c, user_dir) for c in commands}

    generate = commands[0]
    assert "weights: checkpoint out/demo/checkpoint at step 150" in outputs[generate]
    assert f"{prompt} -> {continuation}" in outputs[generate]  # the same greedy continuation as the demo's
    prompt = [int(x) for x in re.search(r"--prompt-tokens ([\d,]+)", generate).group(1).split(",")]
    task = SyntheticTask(97, 12)
    rule, x, want = prompt[0], prompt[-1], []
    for _ in range(9):
        x = int((task.a[rule] * x + task.b[rule]) % 97)
        want.append(x)
    got = json.loads(re.search(rf"{re.escape(str(prompt))} -> (\[[\d, ]+\])", outputs[generate]).group(1))
    assert sum(g == w for g, w in zip(got, want, strict=True)) >= 7, (got, want)  # it continues the rule
    assert str(want[:3])[1:-1] in open(os.path.join(ROOT, "README.md")).read()  # the tokens the README names

    assert "placement check: 12 parameters x 128 devices = 1536 shards" in outputs["moe-jax mesh"]
    assert "the seed's 128-device layout (pp4, ep16, tp2, m8) ranks" in outputs["moe-jax plan --devices 128 --search"]
    compiled = outputs["moe-jax compile --layout meshes/seed-128.yaml"]
    assert "collective audit: equal to the expected set" in compiled
    readme = open(os.path.join(ROOT, "README.md")).read()
    gib = re.search(r"total \(argument \+ output \+ temp - alias\) ([\d.]+) GiB", compiled).group(1)
    assert f"{float(gib):.2f} GiB per device" in readme  # the figure the README states
    assert (user_dir / "docs/seed-audit.md").read_text() == open(os.path.join(ROOT, "docs/seed-audit.md")).read()


def test_the_readme_deepseek_command(cli):
    """The README's DeepSeek-V3 plan: the published architecture's count and the per-GPU figure it states, which does
    not fit the H800's 80 GB: the plan is printed whole, then one line says so and the exit status is 2."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("<!-- deepseek command checked by tests/test_cli.py -->", 1)[1].split("```bash\n", 1)[1]
    (line,) = [line for line in block.split("```")[0].splitlines() if line.strip()]
    out = cli(*shlex.split(line.split("#")[0])[1:])
    assert out.returncode == 2 and "671,026,404,352 total" in out.stdout
    gb = re.search(r"total ([\d.]+) GB of 80 GB", out.stdout).group(1)
    assert f"{gb} GB/GPU" in line and "exits 2, does not fit" in line  # what the README states
    assert out.stderr.strip().splitlines() == [
        f"moe-jax plan: error: does not fit: needs {float(gb):.1f} GB per device, has 80"
    ]


def test_the_readme_family_commands(cli):
    """The README's three Mixtral commands: the plan prints the published counts and the figure the README states;
    the tiny Mixtral verifies against one device (in this process's 8 devices). The middle one, `plan --check` of
    the preset on its 64 devices, is test_full_size.py's test_presets_on_64_fake_devices (the same config and
    layout, compiled once there)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("<!-- family commands checked by tests/test_cli.py -->", 1)[1].split("```bash\n", 1)[1]
    lines = [line for line in block.split("```")[0].splitlines() if line.strip()]
    plan, check, verify = (shlex.split(line.split("#")[0]) for line in lines)
    out = cli(*plan[1:])
    assert out.returncode == 0, out.stderr
    assert "46,702,792,704 total" in out.stdout and "12,879,925,248 active per token" in out.stdout
    gb = re.search(r"total ([\d.]+) GB", out.stdout).group(1)
    assert f"{gb} GB/device" in lines[0]  # the figure the README states
    assert check[1:] == ["plan", "--config", "configs/models/mixtral-8x7b.yaml", "--check"]
    from moe_jax.layouts import config_for, load_pair

    assert config_for("mixtral-8x7b-64").endswith(check[3])  # the preset test_full_size compiles on its layout
    # Each preset's model config carries its 64-device layout (what `plan --config` plans): the mesh file's, field
    # for field.
    for preset in ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"):
        embedded = load_config(f"configs/models/{preset}.yaml").layout
        assert dataclasses.replace(load_pair(f"{preset}-64").layout, name="", description="") == embedded, preset
    out = cli(*verify[1:])
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------- user paths no other test runs as a user would


def test_hlo_prints_its_collectives_and_a_clean_audit(tmp_path):
    """`moe-jax hlo` as a process: the train step's collective table, the audit clean, the HLO written."""
    j, d = tmp_path / "h.json", tmp_path / "hlo"
    out = run(
        f"moe-jax hlo --config configs/tiny.yaml --layout meshes/cpu8-pp2-ep2-tp2.yaml --json {j} --out {d}", ROOT
    )
    assert "audit: the collectives equal the expected set exactly" in out
    result = json.loads(j.read_text())
    assert result["ok"] and not result["unexpected"]
    kinds = {(r["kind"], tuple(r["axes"])) for r in result["collectives"]}
    assert {("all-to-all", ("ep",)), ("collective-permute", ("pp",))} <= kinds, kinds
    assert "all-to-all" in (d / "after_optimizations.hlo.txt").read_text()


def test_mesh_full_lists_every_group():
    """`moe-jax mesh --full` as a process: every group of seed-128 listed, none elided; the pp rings are the ids
    k, k + 32, k + 64, k + 96 (pp outermost of (pp 4, ep 16, tp 2))."""
    out = run("moe-jax mesh --full", ROOT)
    assert "more)" not in out and "placement check: 12 parameters x 128 devices" in out
    flat = out.replace("\n", " ")
    for k in range(32):
        assert f"[{k},{k + 32},{k + 64},{k + 96}]" in flat, k
    assert " ".join(f"[{i}]" for i in range(128)) in " ".join(flat.split())  # dp: 128 groups of one


def test_a_qwen3_demo_then_sampling_export_and_training_from_the_export(tmp_path, cli):
    """A user's path through a family other than the seed's, in one process (its compiled programs shared): `demo
    --config configs/tiny-qwen3.yaml` trains and checks against one device; `generate` samples from its checkpoint
    with --temperature and --top-k (top-k 1 is greedy whatever the temperature); `export-hf --dtype bfloat16
    --max-shard-size` writes several bf16 safetensors shards and an index; `train --init-from-hf` starts from them (its
    first loss is the trained model's, not a fresh one's)."""
    demo = cli("demo", "--config", "configs/tiny-qwen3.yaml", "--steps", "20", "--out", str(tmp_path / "demo"))
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "equal" in demo.stdout.split("1. the sharded first step against one device")[1].splitlines()[1]
    trained = [json.loads(x)["loss"] for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert len(trained) == 20 and trained[-1] < trained[0] - 0.3
    checkpoint = str(tmp_path / "demo" / "checkpoint")

    def generate(*extra):
        args = ["--checkpoint", checkpoint, "--config", "configs/tiny-qwen3.yaml", "--prompt-tokens", "2,67,32",
                "--max-new", "6", "--seed", "3", *extra]  # fmt: skip
        proc = cli("generate", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(re.search(r"\[2, 67, 32\] -> (\[[\d, ]+\])", proc.stdout).group(1))

    greedy = generate()
    assert generate("--temperature", "0.8", "--top-k", "1") == greedy
    sampled = generate("--temperature", "1.5", "--top-k", "50")
    assert len(sampled) == 6 and all(0 <= t < 151 for t in sampled)
    assert generate("--temperature", "1.5", "--top-k", "50") == sampled  # the seed fixes the draw

    hf = tmp_path / "hf"
    proc = cli("export-hf", checkpoint, "--out", str(hf), "--dtype", "bfloat16", "--max-shard-size", "200KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(hf.glob("*.safetensors"))
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    for shard in shards:
        raw = shard.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}, shard.name
    assert json.loads((hf / "config.json").read_text())["model_type"] == "qwen3_moe"

    m = tmp_path / "m.jsonl"
    proc = cli("train", "--init-from-hf", str(hf), "--config", "configs/tiny-qwen3.yaml", "--layout",
               "meshes/cpu8-pp2-ep2-tp2.yaml", "--steps", "2", "--metrics", str(m))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = [json.loads(x)["loss"] for x in m.read_text().splitlines()]
    assert len(started) == 2 and started[0] < trained[0] - 0.3, (started, trained)
