"""Pictures: the mesh map (devices laid out by pp/dp rows and ep x tp columns, coloured by stage, experts labelled,
hosts outlined)."""

from __future__ import annotations

import textwrap
from typing import Any

from moe_jax.mesh import ranges_text


def _matplotlib():
    """(pyplot on the Agg backend, Rectangle): imported when a picture is drawn, lazily on purpose: matplotlib takes
    about half a second to import and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    return plt, Rectangle


def _span(ids: list[int]) -> str:
    return f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"


def draw_mesh(table: dict[str, Any], path: str) -> None:
    plt, _ = _matplotlib()
    fig = mesh_figure(table)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def mesh_figure(table: dict[str, Any]):
    """The mesh map as a matplotlib figure, laid out so that every text lies inside it (tests check this)."""
    plt, Rectangle = _matplotlib()

    lay = table["layout"]
    pp, dp, ep, tp = lay["pp"], lay["dp"], lay["ep"], lay["tp"]
    rows, cols = pp * dp, ep * tp
    cell_w = 0.55 if cols <= 32 else 0.16
    fig_w = min(60.0, max(8.0, 2.5 + cols * cell_w))
    fig_h = max(3.0, 1.6 + rows * 0.9)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    cmap = plt.get_cmap("tab10")
    by_pos = {d["position"]: d for d in table["devices"]}

    for d in by_pos.values():
        c = d["coords"]
        row, col = c["pp"] * dp + c["dp"], c["ep"] * tp + c["tp"]
        shade = 0.55 + 0.45 * (c["tp"] / max(1, tp - 1)) if tp > 1 else 1.0
        rgb = tuple(min(1.0, x * shade + (1 - shade) * 0.3) for x in cmap(c["pp"] % 10)[:3])
        ax.add_patch(Rectangle((col, rows - 1 - row), 1, 1, facecolor=rgb, edgecolor="white", linewidth=0.5))
        if cols <= 64:
            ax.text(
                col + 0.5, rows - 0.5 - row, str(d["id"]), ha="center", va="center", fontsize=7 if cols <= 32 else 4
            )

    # Expert ranges above each ep group (folded, layout.expert_tp=1: above each device, whose experts are its own),
    # on the top row; layers at the left of each row.
    folded = lay.get("expert_tp") == "1" and tp > 1
    experts_at = {
        c["ep"] * tp + c["tp"] if folded else c["ep"]: d["experts"] for d in table["devices"] for c in [d["coords"]]
    }
    groups, width = (ep * tp, 1) if folded else (ep, tp)
    label_every = max(1, groups // 32)
    for e in range(0, groups, label_every):
        ax.text(
            e * width + width / 2,
            rows + 0.1,
            "E" + _span(experts_at[e]),
            ha="center",
            va="bottom",
            fontsize=7 if groups <= 16 else 5,
            rotation=0 if groups <= 16 else 90,
        )
    for row in range(rows):
        stage, replica = divmod(row, dp)
        d = next(x for x in table["devices"] if x["coords"]["pp"] == stage and x["coords"]["dp"] == replica)
        label = f"pp{stage}" + (f" dp{replica}" if dp > 1 else "") + f"\nlayers {ranges_text(d['layers'])}"
        ax.text(-0.3, rows - 0.5 - row, label, ha="right", va="center", fontsize=8)

    # Hosts: each host's cells within a row form a contiguous run of columns; outline each run.
    runs: dict[tuple[int, int], list[int]] = {}
    for d in table["devices"]:
        c = d["coords"]
        runs.setdefault((d["host"], c["pp"] * dp + c["dp"]), []).append(c["ep"] * tp + c["tp"])
    for (host, row), cs in runs.items():
        lo, hi = min(cs), max(cs) + 1
        ax.add_patch(Rectangle((lo, rows - 1 - row), hi - lo, 1, fill=False, edgecolor="black", linewidth=1.4))
        if cols <= 64 and hi - lo >= 2:
            ax.text(lo + 0.05, rows - 1 - row + 0.05, f"h{host}", fontsize=5, ha="left", va="bottom")

    ax.set_xlim(-0.2, cols + 0.2)
    ax.set_ylim(-0.2, rows + 1.0)
    ax.set_aspect("auto")
    ax.axis("off")
    title = (
        f"{lay.get('name') or 'layout'}: pp {pp} x dp {dp} x ep {ep} x tp {tp} = {lay['devices']} devices, "
        f"{lay['hosts']} host{'s' if lay['hosts'] > 1 else ''} of {lay['devices_per_host']} (outlined); colour = pipeline stage, shade = tp rank"
    )
    model = table["model"]
    if folded:
        title += f"; experts folded over ep x tp: {model['experts'] // (ep * tp)} whole expert(s) per device"
    if model.get("kv_heads", model["heads"]) != model["heads"]:
        title += f"; {model['heads']} query heads, {model['kv_heads']} K/V heads {model['kv_heads_placement']}"
    if model.get("dense_layers"):
        title += f"; dense layers 0-{model['dense_layers'] - 1} on every stage, run by pp0"
    ax.set_title(_wrap(title, fig_w, 9), fontsize=9)
    fig.tight_layout()
    return fig


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Breaks a title into lines that fit a figure `width_in` inches wide (an average glyph is about 0.55 em)."""
    chars = max(20, int(width_in * 72 / (0.55 * fontsize)) - 4)
    return "\n".join(textwrap.wrap(text, chars))


def draw_schedule(sched, path: str) -> None:
    """Stages against ticks: the forward pass, then the backward pass (the same scan in reverse); bubbles blank.
    1F1B: each tick's forward slot above its backward slot, and each stage's stash at its peak."""
    if sched.kind == "1f1b":
        return _draw_1f1b(sched, path)
    plt, Rectangle = _matplotlib()

    t_all = sched.ticks
    fig_w = min(40.0, 2.0 + 0.32 * 2 * t_all)
    fig, ax = plt.subplots(figsize=(fig_w, 1.2 + 0.45 * sched.pp))
    cmap = plt.get_cmap("tab20")
    for s in range(sched.pp):
        y = sched.pp - 1 - s
        for t in range(t_all):
            w = sched.work(s, t)
            for x, backward in ((t, False), (2 * t_all - 1 - t + 1, True)):
                if w is None:
                    ax.add_patch(Rectangle((x, y), 1, 1, facecolor="white", edgecolor="0.8", linewidth=0.5))
                    continue
                _slot(ax, Rectangle, cmap, (x, y), w, sched.repeats, backward, "")
        ax.text(-0.3, y + 0.5, f"stage {s}", ha="right", va="center", fontsize=8)
    ax.axvline(t_all + 0.5, color="black", linewidth=1)
    ax.text(t_all / 2, sched.pp + 0.15, "forward ticks", ha="center", fontsize=8)
    ax.text(t_all + 1 + t_all / 2, sched.pp + 0.15, "backward ticks (the scan in reverse)", ha="center", fontsize=8)
    ax.set_xlim(-0.2, 2 * t_all + 1.2)
    ax.set_ylim(-0.2, sched.pp + 0.6)
    ax.axis("off")
    title = (
        f"pp {sched.pp}, {sched.microbatches} microbatches, {sched.repeats} repeat(s): {sched.ticks} ticks, "
        f"utilisation {sched.useful_ticks}/{sched.ticks} = {sched.utilization:.1%}; cell = microbatch"
        + (".repeat" if sched.repeats > 1 else "")
    )
    ax.set_title(_wrap(title, fig_w, 9), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _draw_1f1b(sched, path: str) -> None:
    plt, Rectangle = _matplotlib()

    t_all = sched.ticks
    fig_w = min(40.0, 3.0 + 0.36 * t_all)
    fig, ax = plt.subplots(figsize=(fig_w, 1.4 + 0.8 * sched.pp))
    cmap = plt.get_cmap("tab20")
    in_flight = sched.activation_slots()["in_flight"]
    for s in range(sched.pp):
        y0 = 2 * (sched.pp - 1 - s)
        for t in range(t_all):
            for dy, w, backward in ((1, sched.work(s, t), False), (0, sched.backward_work(s, t), True)):
                if w is None:
                    ax.add_patch(Rectangle((t, y0 + dy), 1, 1, facecolor="white", edgecolor="0.85", linewidth=0.5))
                    continue
                _slot(ax, Rectangle, cmap, (t, y0 + dy), w, sched.repeats, backward, "b" if backward else "")
        ax.text(-0.3, y0 + 1, f"stage {s}\nF / B", ha="right", va="center", fontsize=8)
        ax.text(t_all + 0.3, y0 + 1, f"peak stash {in_flight[s]}", ha="left", va="center", fontsize=8)
    ax.set_xlim(-2.5, t_all + 4)
    ax.set_ylim(-0.2, 2 * sched.pp + 0.6)
    ax.axis("off")
    kind = "interleaved 1F1B" if sched.repeats > 1 else "1F1B"
    title = (
        f"{kind}: pp {sched.pp}, {sched.microbatches} microbatches, {sched.repeats} repeat(s): {t_all} ticks of a "
        f"forward slot (top) and a backward slot (hatched), empty slots skipped, so {sched.time_ticks} ticks in "
        f"time; utilisation {sched.useful_ticks}/{sched.time_ticks} = {sched.utilization:.1%}; stash ring "
        f"{sched.stash_slots} slots; cell = microbatch" + (".repeat" if sched.repeats > 1 else "")
    )
    ax.set_title(_wrap(title, fig_w, 9), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def draw_loss(records: list[dict], path: str, title: str, chance: float | None = None) -> None:
    """Loss (and its cross-entropy part) against step, with chance level if given."""
    plt, _ = _matplotlib()

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(steps, [r["loss"] for r in records], label="loss (cross-entropy + router terms)")
    ax.plot(steps, [r["ce"] for r in records], label="cross-entropy", linestyle="--")
    if chance is not None:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label=f"chance, log V = {chance:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _slot(ax, rectangle, cmap, xy, work, repeats: int, backward: bool, mark: str) -> None:
    """One tick's cell of a schedule chart: microbatch j (repeat r) coloured by j, hatched when backward."""
    j, r = work
    ax.add_patch(rectangle(xy, 1, 1, facecolor=cmap(j % 20), edgecolor="white", linewidth=0.5,
                           hatch="//" if backward else None, alpha=0.6 if backward else 1.0))  # fmt: skip
    label = mark + (f"{j}" if repeats == 1 else f"{j}.{r}")
    ax.text(xy[0] + 0.5, xy[1] + 0.5, label, ha="center", va="center", fontsize=6)
