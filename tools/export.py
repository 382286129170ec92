"""Export a checkpoint of any layout for use outside training.

    python tools/export.py --load runs/tiny/checkpoints --out exported/tiny                  # native
    python tools/export.py --load runs/tiny/checkpoints --format hf --out exported/tiny-hf   # transformers

native: one safetensors file plus config.json holding the resolved training config, the vocab
size, the step and each Pattention's tau (a per-layer constant that is part of the function).
Load it with `megatron_tokenformer.load_model` (checkpoints) or `safetensors.torch.load_file` +
TokenFormerModel.

hf: a transformers model directory (megatron_tokenformer/hf_export.py) with the checkpoint's
tokenizer; `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)` load it without this package. Needs `pip install -e '.[hf]'`.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from megatron_tokenformer.checkpoint import CheckpointError, global_state_dict
from megatron_tokenformer.checkpoint.files import save_safetensors
from megatron_tokenformer.errors import UserError
from megatron_tokenformer.fileio import umask_mode, write_failure_fix


def export(load: str, out: str) -> Path:
    """The native export: model.safetensors + config.json in `out`, a new or empty directory. It
    appears complete or not at all (as the hf export): the files are written into a temporary sibling
    that is renamed to `out` at the end, so a failure (a full disk, a kill) leaves no half export."""
    dst = Path(out)
    check_out(dst)
    state, meta = global_state_dict(load)
    tensors = {k: v.contiguous() for k, v in state.items() if hasattr(v, "contiguous")}
    tau = {k.removesuffix("._extra_state"): v["tau"] for k, v in state.items() if k.endswith("._extra_state")}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        save_safetensors(tensors, tmp / "model.safetensors", {})  # mode 0644 (under umask 022), like config.json
        (tmp / "config.json").write_text(json.dumps({"config": meta["config"], "vocab_size": meta["vocab_size"],
                                                      "step": meta["step"], "tau": tau,
                                                      "source_layout": meta["layout"]}, indent=1))
        tmp.chmod(umask_mode(executable=True))  # mkdtemp makes it private; an ordinary directory's mode
        check_out(dst)  # still free (the rename replaces an empty directory, never a full one)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def check_out(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new --out")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint.dir of a run, or one step_* directory in it")
    ap.add_argument("--out", required=True, help="a new (or empty) directory")
    ap.add_argument("--format", choices=("native", "hf"), default="native",
                    help="native (this package's) or hf (Hugging Face transformers, with the tokenizer)")
    args = ap.parse_args()
    try:
        if args.format == "hf":
            from megatron_tokenformer.hf_export import export_hf

            print(f"wrote {export_hf(args.load, args.out)}")
        else:
            print(f"wrote {export(args.load, args.out)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a denied directory: nothing of the export is left
        print(f"error: could not write {args.out}: {e}; {write_failure_fix(e, '--out')}", file=sys.stderr)
        return 2
    except ImportError as e:  # the hf format's transformers (or its tokenizer converter's protobuf)
        print(f"error: --format hf needs transformers ({e}); pip install -e '.[hf]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
