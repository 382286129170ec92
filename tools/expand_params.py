"""Grow a trained TokenFormer checkpoint with new key-value parameter tokens, exactly.

    python tools/expand_params.py --load runs/small/checkpoints --save runs/big/init \\
        --qkv-tokens 256 --proj-tokens 256 --ffn-tokens 1024
    deepspeed launch/pretrain.py --config configs/big.yml checkpoint.load=runs/big/init

The source may be of any layout; the result resumes at any layout chosen at launch. New tokens are
spread evenly over the source's tensor shards. By default the grown model computes the same
function (new keys zero, new values from the value init, tau kept), carries the Adam moments of
the old tokens (zero for the new ones) and the step count; the LR schedule restarts from the
grown run's config; the data position continues. --scale F multiplies every token count by F.
The reference code's recipe: --key-init normal --tau sqrt-n --reset-optimizer. --freeze-old-steps K:
the run started from the result (checkpoint.load) keeps the old tokens fixed for its first K steps.
"""
import argparse
import sys
import warnings

from megatron_tokenformer.checkpoint import read_meta, resolve
from megatron_tokenformer.config import TOKEN_KEYS
from megatron_tokenformer.errors import UserError
from megatron_tokenformer.growth import KEY_INITS, TAUS, VALUE_INITS, GrowthError, GrowthOptions, expand_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint.dir of a run, or one step_* directory in it")
    ap.add_argument("--save", required=True, help="new checkpoint directory (must not hold this step yet)")
    for key in TOKEN_KEYS:
        ap.add_argument("--" + key.replace("_", "-"), type=int, help=f"new model.{key} (default: unchanged)")
    ap.add_argument("--scale", type=float, help="multiply every token count by this factor")
    ap.add_argument("--key-init", choices=KEY_INITS, default="zero", help="new keys (zero: exact)")
    ap.add_argument("--value-init", choices=VALUE_INITS, default="normal", help="new values (normal: trainable)")
    ap.add_argument("--tau", choices=TAUS, default="keep", help="keep (exact) or sqrt-n (the paper's code)")
    ap.add_argument("--reset-optimizer", action="store_true", help="zero all Adam moments and the step count")
    ap.add_argument("--seed", type=int, help="seed of the new tokens (default: train.seed + step)")
    ap.add_argument("--freeze-old-steps", type=int, default=0, metavar="K",
                    help="the grown run keeps the old tokens (weights and Adam moments) fixed for its first K "
                         "steps (recorded in meta.json as freeze_old; not with pipeline parallelism)")
    args = ap.parse_args()
    opts = GrowthOptions(key_init=args.key_init, value_init=args.value_init, tau=args.tau,
                         reset_optimizer=args.reset_optimizer, seed=args.seed,
                         freeze_old_steps=args.freeze_old_steps)
    try:
        counts = {k: getattr(args, k) for k in TOKEN_KEYS}
        if args.scale is not None:
            if any(v is not None for v in counts.values()):
                raise GrowthError("give either --scale or token counts, not both")
            model = read_meta(*resolve(args.load))["config"]["model"]
            counts = {k: round(model[k] * args.scale) for k in TOKEN_KEYS}
        elif all(v is None for v in counts.values()):
            raise GrowthError("give --qkv-tokens, --proj-tokens, --ffn-tokens or --scale")
        for w in opts.warnings(read_meta(*resolve(args.load))["config"]["model"]["norm"]):
            warnings.warn(w, stacklevel=1)
        dst, entry = expand_checkpoint(args.load, args.save, counts, opts)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before, after = entry["tokens_before"], entry["tokens_after"]
    print(f"wrote {dst}: step {entry['step']}, " + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in TOKEN_KEYS)
          + f", {entry['params_before']:,} -> {entry['params_after']:,} parameters")
    # A name of its own: the parent's and the step it grew at, so that neither the parent nor a run
    # grown in launch (README: another name) is resumed by mistake.
    name = f"{entry['parent_name'] or 'run'}-grown-{entry['step']}"
    overrides = " ".join(f"model.{k}={after[k]}" for k in TOKEN_KEYS)
    print("train it with the parent's config and these overrides (a new run directory, so the parent's "
          "is not resumed):\n"
          f"  {overrides} checkpoint.load={dst.parent} log.run_name={name} log.dir=runs/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
