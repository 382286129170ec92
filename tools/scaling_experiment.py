"""Incremental scaling against training from scratch, over seeds: how many training FLOPs each way
of growing needs to reach the losses the from-scratch run reaches.

    python tools/scaling_experiment.py --config configs/tiny.yml --out runs/growth_matrix

Arms (each run once per seed, --seeds; seed = train.seed: init and data order):
  scratch        the config's size (the final size) for --steps steps;
  exact          the config's size x --factors[0], growing in place (the `growth` list) to each next
                 factor at --grow-at fractions of --steps: zero new keys, tau kept, moments carried,
                 a fresh LR schedule per stage with train.warmup_steps of warmup; trained on at the
                 final size until its training FLOPs equal the scratch run's;
  official       the same growths with the reference code's recipe: key_init normal, tau sqrt-n,
                 reset_optimizer;
  freeze         exact, with the old tokens frozen for --freeze-steps steps after each growth;
  rewarm-0, rewarm-short
                 exact, with an LR re-warmup of 0 and --short-warmup steps after each growth
                 (exact itself re-warms as long as the first warmup);
  start-size     a control: the first stage's size trained from scratch without growing, for the
                 scratch run's FLOPs (if it does as well, growth saved nothing the final size needed).
Accounting: for each target validation loss (the scratch runs' loss at --targets fractions of their
FLOPs, the highest over seeds, so every scratch seed reaches it) the FLOPs each run needs to reach it,
interpolated linearly between evaluations, as a ratio to the same seed's scratch run; mean, min and
max over seeds. The evaluation interval bounds how well a crossing is known: the summary gives the
widest bracket (evaluation interval / crossing FLOPs) over all crossings.
Writes <out>/summary.json, <out>/summary.md and <out>/growth_matrix.png (mean validation loss against
training FLOPs per arm, a band from the lowest to the highest seed). Finished runs are reused
(delete a run's directory to redo it). The plot needs matplotlib (`pip install -e '.[experiments]'`),
checked before any run starts; `--no-plot` leaves it out.
"""
import argparse
import concurrent.futures
import importlib.util
import json
import os
import queue
import subprocess
import sys
from pathlib import Path

from megatron_tokenformer.config import TOKEN_KEYS, load_config, padded_vocab_size
from megatron_tokenformer.data import load_meta
from megatron_tokenformer.model import model_flops_per_token
from megatron_tokenformer.monitor import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def _train(name: str, run: Path, args, overrides: list[str], gpus=None) -> None:
    steps = int(next(o for o in overrides if o.startswith("train.steps=")).split("=")[1])
    if any(r.get("step") == steps and "valid_loss" in r for r in read_metrics(run)):
        print(f"{name}: reusing {run}", flush=True)
        return
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", args.config, *overrides,
           f"log.dir={run}", f"log.run_name=growth-{name}"]
    print(f"{name}: {' '.join(cmd[2:])}", flush=True)
    run.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    gpu = gpus.get() if gpus else None  # one GPU of --gpus per run
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        with open(run / "stdout.log", "a") as log:
            subprocess.run(["nice", "-n", str(args.nice), *cmd], cwd=ROOT, check=True, stdout=log,
                           stderr=subprocess.STDOUT, env=env)
    finally:
        if gpu is not None:
            gpus.put(gpu)
    print(f"{name}: done", flush=True)


def _curve(run: Path, stages: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    """(step, cumulative training FLOPs, validation loss) at each evaluation; `stages`: (first step
    of the stage, training FLOPs per step), the first stage starting at 0."""
    def per_step(step: int) -> float:  # the model size during step `step` (1-based)
        return [f for at, f in stages if at < step][-1]

    out, total, done = [], 0.0, 0
    for r in read_metrics(run):
        if "valid_loss" not in r:
            continue
        total += sum(per_step(s) for s in range(done + 1, r["step"] + 1))
        done = r["step"]
        out.append((r["step"], total, r["valid_loss"]))
    return out


def _crossing(curve, target: float):
    """(FLOPs where the validation loss first reaches `target`, linearly interpolated between the
    evaluations around it; that bracket's width relative to it), or None."""
    prev = None
    for _, f, v in curve:
        if v <= target:
            if prev is None:
                return f, 1.0
            f0, v0 = prev
            x = f0 + (v0 - target) / (v0 - v) * (f - f0)
            return x, (f - f0) / x
        prev = (f, v)
    return None


def _at(curve, flops: float) -> float:
    """The validation loss at `flops`, linearly interpolated (the curve's first or last value outside it)."""
    pts = [(f, v) for _, f, v in curve]
    if flops <= pts[0][0]:
        return pts[0][1]
    for (f0, v0), (f1, v1) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            return v0 + (v1 - v0) * (flops - f0) / (f1 - f0)
    return pts[-1][1]


def _stats(xs: list[float]) -> dict:
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)} if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yml"), help="the final size")
    ap.add_argument("--steps", type=int, default=300, help="steps of the from-scratch runs")
    ap.add_argument("--factors", default="0.25,0.5,1", help="token counts of the growth stages, x the config's")
    ap.add_argument("--grow-at", default="0.25,0.5", help="growth steps as fractions of --steps")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--arms", default="scratch,exact,official,freeze,rewarm-0,rewarm-short,start-size")
    ap.add_argument("--freeze-steps", type=int, default=25, help="freeze_old_steps of the freeze arm")
    ap.add_argument("--short-warmup", type=int, default=5, help="warmup_steps after growth of rewarm-short")
    ap.add_argument("--targets", default="0.5,0.75,1", help="target losses: the scratch runs' at these FLOPs fractions")
    ap.add_argument("--eval-interval", type=int, default=2)
    ap.add_argument("--eval-steps", type=int, default=3,
                    help="validation batches (of train.global_batch_size samples) per evaluation")
    ap.add_argument("--out", default=str(ROOT / "runs" / "growth_matrix"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--gpus", help="GPU ids, e.g. 0,1,2,3: each run gets one (use --jobs up to their number)")
    ap.add_argument("--no-plot", action="store_true", help="write no growth_matrix.png (needs no matplotlib)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = ap.parse_args()
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:  # before hours of training, not after
        print("error: the plot (growth_matrix.png) needs matplotlib: pip install -e '.[experiments]', or pass "
              "--no-plot", file=sys.stderr)
        return 2

    cfg = load_config(args.config, args.overrides)
    vocab = padded_vocab_size(cfg, load_meta(cfg.data.path, recipe=cfg.data.prepare, tokenizer=cfg.data.tokenizer).vocab_size)
    factors = [float(f) for f in args.factors.split(",")]
    sizes = [{k: int(getattr(cfg.model, k) * f) for k in TOKEN_KEYS} for f in factors]
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    step_flops = [model_flops_per_token(cfg.model.__class__(**{**cfg.model.__dict__, **s}), vocab) * tokens_per_step
                  for s in sizes]
    at = [round(args.steps * float(x)) for x in args.grow_at.split(",")]
    assert len(at) == len(sizes) - 1, "--grow-at needs one step per growth (len(--factors) - 1)"
    # the grown runs train on at the final size until their FLOPs equal the scratch run's
    before = sum((b - a) * f for a, b, f in zip([0, *at], at, step_flops))
    grown_steps = at[-1] + round((args.steps * step_flops[-1] - before) / step_flops[-1])
    stages = list(zip([0, *at], step_flops))
    small_steps = round(args.steps * step_flops[-1] / step_flops[0])  # start-size: the scratch run's FLOPs
    opts = {"exact": {}, "official": {"key_init": "normal", "tau": "sqrt-n", "reset_optimizer": True},
            "freeze": {"freeze_old_steps": args.freeze_steps}, "rewarm-0": {"warmup_steps": 0},
            "rewarm-short": {"warmup_steps": args.short_warmup}}
    arms = args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [*args.overrides, f"eval.interval={args.eval_interval}", f"eval.steps={args.eval_steps}",
              "checkpoint.interval=0", "checkpoint.keep_last=1", "log.wandb_mode=disabled", "log.progress=false",
              "log.interval=10"]
    out = Path(args.out)
    jobs = []
    for seed in seeds:  # seed-major: a finished seed gives a paired comparison early
        for arm in arms:
            if arm == "scratch":
                ov = [f"model.{k}={v}" for k, v in sizes[-1].items()] + [f"train.steps={args.steps}"]
            elif arm == "start-size":
                ov = [f"model.{k}={v}" for k, v in sizes[0].items()] + [f"train.steps={small_steps}"]
            else:
                growth = [dict(at_step=a, **s, **opts[arm]) for a, s in zip(at, sizes[1:])]
                ov = [f"model.{k}={v}" for k, v in sizes[0].items()] + [f"train.steps={grown_steps}",
                                                                      "growth=" + json.dumps(growth)]
            jobs.append((f"{arm}-s{seed}", common + ov + [f"train.seed={seed}"]))
    gpus = None
    if args.gpus:
        gpus = queue.Queue()
        for g in args.gpus.split(","):
            gpus.put(g)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(_train, name, out / name, args, ov, gpus) for name, ov in jobs]:
            f.result()

    flat = {"scratch": [(0, step_flops[-1])], "start-size": [(0, step_flops[0])]}
    curves = {arm: {s: _curve(out / f"{arm}-s{s}", flat.get(arm, stages)) for s in seeds} for arm in arms}
    total = args.steps * step_flops[-1]
    fractions = [float(x) for x in args.targets.split(",")]
    targets = [max(_at(curves["scratch"][s], fr * total) for s in seeds) for fr in fractions]
    widest = 0.0
    config = Path(args.config).resolve()
    summary = {"config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else args.config, "overrides": args.overrides, "seeds": seeds, "sizes": sizes,
               "growth_steps": at, "scratch_steps": args.steps, "grown_steps": grown_steps,
               "start_size_steps": small_steps,
               "flops_per_step": step_flops, "scratch_flops": total, "eval_interval": args.eval_interval,
               "eval_steps": args.eval_steps, "freeze_steps": args.freeze_steps, "short_warmup": args.short_warmup,
               "targets": [{"fraction_of_scratch_flops": fr, "valid_loss": t} for fr, t in zip(fractions, targets)],
               "arms": {}}
    for arm in arms:
        per_target = []
        for t in targets:
            ratios, flops = [], []
            for s in seeds:
                mine, ref = _crossing(curves[arm][s], t), _crossing(curves["scratch"][s], t)
                if mine and ref:
                    ratios.append(mine[0] / ref[0])
                    flops.append(mine[0])
                    widest = max(widest, mine[1], ref[1])
            per_target.append({"valid_loss": t, "flops_ratio": _stats(ratios), "flops": _stats(flops),
                               "seeds_reached": len(ratios), "per_seed": ratios})
        finals = [_at(curves[arm][s], total) for s in seeds]
        summary["arms"][arm] = {"targets": per_target, "loss_at_scratch_flops": _stats(finals),
                                "loss_at_scratch_flops_per_seed": finals}
    if "exact" in arms:  # at equal FLOPs, paired by seed: below 0 is better than exact growth
        ref = summary["arms"]["exact"]["loss_at_scratch_flops_per_seed"]
        for arm in arms:
            mine = summary["arms"][arm]["loss_at_scratch_flops_per_seed"]
            summary["arms"][arm]["loss_minus_exact"] = _stats([a - b for a, b in zip(mine, ref)])
    summary["widest_crossing_bracket"] = widest
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    def cell(st, fmt="{:.2f}"):
        return "not reached" if st is None else (fmt.format(st["mean"]) + " (" + fmt.format(st["min"]) + " to "
                                                 + fmt.format(st["max"]) + ")")

    head = "| arm | " + " | ".join(f"to {t:.3f} ({fr:g} of scratch)" for fr, t in zip(fractions, targets)) \
           + " | valid loss at the scratch FLOPs | minus exact's (same seed) |"
    lines = ["Sizes (qkv, proj, ffn tokens): " + " -> ".join(str(tuple(s.values())) for s in sizes)
             + f"; growth at steps {at}; scratch {args.steps} steps, grown runs {grown_steps} steps (equal "
             f"training FLOPs, {total:.3g}); seeds {seeds}; evaluation every {args.eval_interval} steps "
             f"(widest crossing bracket {widest:.1%} of its FLOPs).", "",
             "FLOPs to reach each target validation loss, as a ratio to the same seed's scratch run: mean "
             "(min to max) over seeds; last columns: validation loss at the scratch run's total FLOPs, and its "
             "difference to the exact arm's, seed by seed.", "",
             head, "|" + "---|" * (len(targets) + 3)]
    for arm in arms:
        a = summary["arms"][arm]
        cells = [cell(x["flops_ratio"]) + ("" if x["seeds_reached"] == len(seeds) else
                                           f" [{x['seeds_reached']}/{len(seeds)} seeds]") for x in a["targets"]]
        diff = a.get("loss_minus_exact")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {cell(a['loss_at_scratch_flops'], '{:.3f}')} | "
                     + (cell(diff, "{:+.3f}") if diff else "") + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    wrote = [out / "summary.json", out / "summary.md"]
    if not args.no_plot:
        _plot(out / "growth_matrix.png", curves, targets, total, stages, at)
        wrote.append(out / "growth_matrix.png")
    print("wrote " + ", ".join(map(str, wrote)))
    return 0


def _plot(path: Path, curves: dict, targets: list[float], total: float, stages, at) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lowest = min(targets)
    for arm, by_seed in curves.items():
        start = max(c[0][1] for c in by_seed.values())
        end = min(c[-1][1] for c in by_seed.values())
        grid = [start + (end - start) * i / 200 for i in range(201)]
        vals = [[_at(c, f) for c in by_seed.values()] for f in grid]
        mean = [sum(v) / len(v) for v in vals]
        lowest = min(lowest, *(min(v) for v in vals))
        line, = ax.plot(grid, mean, lw=1.2, label=f"{arm} (mean of {len(by_seed)} seeds)")
        ax.fill_between(grid, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2)
    f = 0.0  # where the grown runs grow
    for (a, per), b in zip(stages, at):
        f += (b - a) * per
        ax.axvline(f, color="gray", lw=0.5, ls=":")
    for t in targets:
        ax.axhline(t, color="gray", lw=0.6, ls="--")
    ax.set_ylim(lowest - 0.05, max(targets) + 1.0)
    ax.set_xlim(0, total * 1.01)
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("TokenFormer growth vs training from scratch (band: min-max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
