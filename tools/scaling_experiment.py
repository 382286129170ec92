"""Incremental scaling against training from scratch, on the real-text corpus.

    python tools/scaling_experiment.py --config configs/tiny.yml --steps 450 --out runs/scaling

Two runs of the same data and optimiser settings:
  scratch  the final size (token counts x the last factor) trained for --steps steps;
  grown    the config's size x the first factor, growing in place (the `growth` config list: exact,
           zero keys, moments carried, a fresh LR schedule per stage) to each next factor at
           equal fractions of --steps, then trained on at the final size up to --grown-steps.
Writes <out>/scaling.png (validation loss against cumulative training FLOPs), <out>/summary.json
and <out>/summary.md: the FLOPs each run needs to reach the from-scratch run's final validation
loss. Finished runs are reused (delete their directory to redo one). Needs matplotlib
(`pip install -e '.[experiments]'`).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_tokenformer.config import TOKEN_KEYS, load_config, padded_vocab_size
from megatron_tokenformer.data import load_meta
from megatron_tokenformer.model import model_flops_per_token

ROOT = Path(__file__).resolve().parent.parent


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _train(name: str, run: Path, args, overrides: list[str]) -> None:
    steps = int(next(o for o in overrides if o.startswith("train.steps=")).split("=")[1])
    if any(r.get("step") == steps and "valid_loss" in r for r in _rows(run)):
        print(f"{name}: reusing {run}")
        return
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", args.config, *overrides,
           f"log.dir={run}", f"log.run_name=scaling-{name}"]
    print(f"{name}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))


def _curve(run: Path, stages: list[tuple[int, dict]], cfg, vocab: int) -> list[tuple[int, float, float]]:
    """(step, cumulative training FLOPs, validation loss) at each evaluation."""
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length

    def flops_per_step(step: int) -> float:  # the model size during step `step` (1-based)
        counts = [c for at, c in stages if at < step][-1]
        model = cfg.model.__class__(**{**cfg.model.__dict__, **counts})
        return model_flops_per_token(model, vocab) * tokens_per_step

    out, total, done = [], 0.0, 0
    for r in _rows(run):
        if "valid_loss" not in r:
            continue
        total += sum(flops_per_step(s) for s in range(done + 1, r["step"] + 1))
        done = r["step"]
        out.append((r["step"], total, r["valid_loss"]))
    return out


def _reach(curve, target: float):
    return next(((s, f) for s, f, v in curve if v <= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yml"))
    ap.add_argument("--steps", type=int, default=450, help="steps of the from-scratch run")
    ap.add_argument("--grown-steps", type=int, help="total steps of the grown run (default 1.5 x --steps)")
    ap.add_argument("--factors", default="1,2,4", help="token-count multipliers of the growth stages")
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "runs" / "scaling"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="section.key=value for both runs")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    factors = [float(f) for f in args.factors.split(",")]
    grown_steps = args.grown_steps or int(1.5 * args.steps)
    sizes = [{k: int(getattr(cfg.model, k) * f) for k in TOKEN_KEYS} for f in factors]
    at = [round(args.steps * i / len(factors)) for i in range(len(factors))]  # 0, N/3, 2N/3 for three stages
    common = [*args.overrides, f"eval.interval={args.eval_interval}", "eval.steps=8", "checkpoint.interval=0",
              "log.wandb_mode=disabled", "log.progress=false", f"log.interval={args.eval_interval}"]
    out = Path(args.out)
    _train("scratch", out / "scratch", args,
           common + [f"model.{k}={v}" for k, v in sizes[-1].items()] + [f"train.steps={args.steps}"])
    growth = [dict(at_step=a, **s) for a, s in zip(at[1:], sizes[1:])]
    _train("grown", out / "grown", args,
           common + [f"model.{k}={v}" for k, v in sizes[0].items()] + [f"train.steps={grown_steps}",
                                                                          "growth=" + json.dumps(growth)])

    vocab = padded_vocab_size(cfg, load_meta(cfg.data.path, recipe=cfg.data.prepare).vocab_size)
    scratch = _curve(out / "scratch", [(0, sizes[-1])], cfg, vocab)
    grown = _curve(out / "grown", list(zip(at, sizes)), cfg, vocab)
    target = scratch[-1][2]
    reached = {"scratch": _reach(scratch, target), "grown": _reach(grown, target)}
    summary = {"config": args.config, "steps": args.steps, "grown_steps": grown_steps, "sizes": sizes,
               "growth_steps": at[1:], "target_valid_loss": target,
               "reached": {k: ({"step": v[0], "flops": v[1]} if v else None) for k, v in reached.items()},
               "final": {"scratch": scratch[-1], "grown": grown[-1]}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    def row(name, curve):
        hit = reached[name]
        return (f"| {name} | {curve[-1][0]} | {curve[-1][2]:.3f} | {curve[-1][1]:.3g} | "
                + (f"{hit[0]} | {hit[1]:.3g} | {hit[1] / reached['scratch'][1]:.2f} |" if hit else "not reached | | |"))

    table = "\n".join([
        f"Target: the from-scratch run's final validation loss, {target:.3f}. Sizes (qkv, proj, ffn tokens): "
        + " -> ".join(str(tuple(s.values())) for s in sizes) + f", growing at steps {at[1:]}.",
        "",
        "| run | steps | final valid loss | total FLOPs | step reaching target | FLOPs to target | vs scratch |",
        "|---|---|---|---|---|---|---|",
        row("scratch", scratch), row("grown", grown)])
    (out / "summary.md").write_text(table + "\n")
    print(table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in (("from scratch (final size)", scratch), ("grown " + " -> ".join(f"x{f:g}" for f in factors),
                                                                 grown)):
        ax.plot([f for _, f, _ in curve], [v for _, _, v in curve], marker=".", label=name)
    for a in at[1:]:
        f = next((f for s, f, _ in grown if s >= a), None)
        if f is not None:
            ax.axvline(f, color="gray", lw=0.5, ls=":")
    ax.axhline(target, color="gray", lw=0.8, ls="--", label="from-scratch final loss")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("TokenFormer: incremental scaling vs training from scratch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    print(f"wrote {out / 'scaling.png'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
