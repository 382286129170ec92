#!/usr/bin/env python
"""Draw a run from its metrics.jsonl alone (no W&B needed): the loss against tokens and against
model FLOPs with the growth steps marked, tokens/s, the step-time breakdown, and the parameter-token
usage (README "Monitoring"). One run: RUN_DIR/plot.png; several: one comparison figure.

    python tools/plot_run.py runs/tiny
    python tools/plot_run.py runs/small runs/grown --out compare.png

Needs matplotlib (`pip install -e '.[experiments]'`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_tokenformer.monitor import read_metrics

PARTS = ("data", "forward_backward", "optimizer", "other")


def read_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(the logged rows, the growth events) of a run directory."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_run.py: {path} does not exist: give the run directory (log.dir) of a run")
    rows = read_metrics(run_dir)
    return [r for r in rows if "event" not in r], [r for r in rows if r.get("event") == "growth"]


def series(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def at_step(rows: list[dict], step: int, key: str):
    """`key` of the last row at or before `step` (where a growth sits on a tokens or FLOPs axis)."""
    vals = [r[key] for r in rows if r["step"] <= step and key in r]
    return vals[-1] if vals else None


def draw(runs: dict[str, tuple[list[dict], list[dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (ax_tok, ax_flops, ax_tps), (ax_time, ax_eff, ax_share) = axes
    several = len(runs) > 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, (rows, growths)) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        train = [r for r in rows if "loss" in r]
        ax_tok.plot(*series(train, "train_tokens", "loss"), color=c, label=name)
        ax_flops.plot(*series(train, "train_flops", "loss"), color=c, label=name)
        ax_tps.plot(*series(train, "step", "tokens_per_sec"), color=c, label=name)
        # the step-time breakdown: stacked for one run, a line per part (and run) for several
        timed = [r for r in train if "step_ms" in r]
        if timed and not several:
            steps = [r["step"] for r in timed]
            ax_time.stackplot(steps, *[[r[f"step_ms/{p}"] for r in timed] for p in PARTS], labels=PARTS, alpha=0.8)
        else:
            for p, style in zip(PARTS, ("-", "--", ":", "-.")):
                ax_time.plot(*series(timed, "step", f"step_ms/{p}"), color=c, linestyle=style, label=f"{name} {p}")
        # token usage: per projection, the mean over layers of the effective number of tokens, and the
        # share of the attention on tokens added by the growths (all stages after the first)
        projs = sorted({k.split("/")[2] for r in rows for k in r if k.startswith("tokens/mean/")})
        for j, proj in enumerate(projs):
            style = ("-", "--", ":", "-.", (0, (1, 3)))[j % 5]
            label = f"{name} {proj}" if several else proj
            ax_eff.plot(*series(rows, "step", f"tokens/mean/{proj}/effective"), color=c if several else None,
                        linestyle=style if several else "-", marker=".", label=label)
            added = [[v for k, v in r.items() if k.startswith(f"tokens/mean/{proj}/share_stage")
                      and not k.endswith("share_stage0")] for r in rows]
            shares = [(r["step"], sum(a)) for r, a in zip(rows, added) if a]  # a projection that grew
            if shares:
                ax_share.plot(*zip(*shares), color=c if several else None, linestyle=style if several else "-",
                              marker=".", label=label)
        for g in growths:
            for ax, key in ((ax_tok, "train_tokens"), (ax_flops, "train_flops")):
                x = at_step(train, g["step"], key)
                if x is not None:
                    ax.axvline(x, color=c, linestyle=":", alpha=0.7)
            for ax in (ax_tps, ax_time, ax_eff, ax_share):
                ax.axvline(g["step"], color=c, linestyle=":", alpha=0.7)
    titles = [(ax_tok, "tokens", "training loss", "loss vs tokens (dotted: growths)"),
              (ax_flops, "model FLOPs", "training loss", "loss vs FLOPs"),
              (ax_tps, "step", "tokens/s", "throughput"),
              (ax_time, "step", "ms per step", "step-time breakdown"),
              (ax_eff, "step", "parameter tokens", "effective tokens used (mean over layers)"),
              (ax_share, "step", "share of attention", "share on tokens added by growth")]
    for ax, xlabel, ylabel, title in titles:
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (log.dir), each with a metrics.jsonl")
    ap.add_argument("--out", type=Path, help="the PNG (default: RUN_DIR/plot.png; several runs: "
                                             "the first's directory/compare.png)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_run.py needs matplotlib: pip install -e '.[experiments]'", file=sys.stderr)
        return 2
    try:
        runs = {str(d): read_run(d) for d in args.runs}
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    out = args.out or args.runs[0] / ("compare.png" if len(runs) > 1 else "plot.png")
    draw(runs, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
