"""Convert between the released TokenFormer checkpoints (Haiyang-W/TokenFormer) and ours.

    python tools/convert_checkpoint.py --from official --load released/150M/pytorch_model.bin \\
        --config configs/150M.yml --save checkpoints/tokenformer-150M --tokenizer released/150M/tokenizer.json
    python tools/convert_checkpoint.py --to official --load checkpoints/tokenformer-150M --save out/pytorch_model.bin

--from official reads a plain state dict of the official model (torch file, or .safetensors),
unpickling nothing but tensors, checks every tensor against the config (with any `section.key=value`
overrides) and writes a checkpoint of ours at step 0 holding the weights (no Adam moments). Train
it with `checkpoint.load=DIR` at any layout, grow it with tools/expand_params.py, or read it with
`load_model`. --tokenizer stores the model's tokenizer file in the checkpoint.
--to official writes a checkpoint of any layout as the official state dict (torch file, or
safetensors by suffix). Bad input prints one line `error: ...` and exits 2, writing nothing.
"""
import argparse
import sys

from megatron_tokenformer.errors import UserError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    way = ap.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="src", choices=["official"], help="import a released checkpoint")
    way.add_argument("--to", dest="dst", choices=["official"], help="export one of ours")
    ap.add_argument("--load", required=True, help="--from: the official state dict file; --to: checkpoint.dir "
                                                  "of a run, or one step_* directory in it")
    ap.add_argument("--save", required=True, help="--from: a new checkpoint directory; --to: a new file "
                                                  "(.safetensors for safetensors, else a torch file)")
    ap.add_argument("--config", help="--from: the config of the model (e.g. configs/150M.yml)")
    ap.add_argument("--tokenizer", help="--from: the model's tokenizer file (tokenizer.json or tokenizer.model), "
                                        "stored in the checkpoint")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="--from: config overrides")
    args = ap.parse_args(argv)
    try:
        if args.src:
            return _import(args)
        return _export(args)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _import(args) -> int:
    from megatron_tokenformer.config import ConfigError, load_config
    from megatron_tokenformer.official import import_official

    if args.config is None:
        raise ConfigError("--from official needs --config, the config of the model's shape (e.g. configs/150M.yml "
                          "for TokenFormer-150M); the tensors are checked against it")
    cfg = load_config(args.config, args.overrides)
    dst = import_official(args.load, cfg, args.save, args.tokenizer)
    m = cfg.model
    print(f"wrote {dst}: {m.num_layers} blocks, width {m.hidden_size}, tokens qkv {m.qkv_tokens} / proj "
          f"{m.proj_tokens} / ffn {m.ffn_tokens}, norm {m.norm}, step 0, weights only"
          + (f", tokenizer {args.tokenizer}" if args.tokenizer else ""))
    print(f"train it with checkpoint.load={args.save} (any parallel layout), or read it with "
          f"megatron_tokenformer.load_model('{args.save}')")
    return 0


def _export(args) -> int:
    from megatron_tokenformer.config import ConfigError
    from megatron_tokenformer.official import export_official

    if args.config or args.overrides or args.tokenizer:
        raise ConfigError("--to official reads the config from the checkpoint; drop --config, --tokenizer and "
                          "overrides")
    dst, meta = export_official(args.load, args.save)
    m = meta["config"]["model"]
    print(f"wrote {dst} (step {meta['step']})")
    # The file holds tensors only; the official config must give the same shape and settings.
    print("official config: " + ", ".join(
        f"{k}: {v}" for k, v in [("num_layers", m["num_layers"]), ("hidden_size", m["hidden_size"]),
                                 ("num_attention_heads", m["num_heads"]), ("qkv_slot_num", m["qkv_tokens"]),
                                 ("proj_slot_num", m["proj_tokens"]), ("ffn_slot_num", m["ffn_tokens"]),
                                 ("norm_activation_type", m["norm"]), ("rotary_pct", m["rotary_pct"]),
                                 ("rotary_emb_base", m["rotary_base"]), ("layernorm_epsilon", m["norm_eps"]),
                                 ("norm", "layernorm_nonparam"), ("final_norm", "layernorm")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
