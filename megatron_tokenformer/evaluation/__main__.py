"""lm-eval's command line with the `megatron_tokenformer` model registered:

    python -m megatron_tokenformer.evaluation --model megatron_tokenformer \
        --model_args path=runs/tiny/checkpoints,batch_size=16 --tasks piqa,hellaswag

takes every argument `lm_eval` takes and keeps lm-eval's own models (`--model hf --model_args
pretrained=EXPORT,trust_remote_code=True` scores a `tools/export.py --format hf` export). lm-eval
0.4.13 finds models only in its own registry (it reads no entry points), so its `lm_eval` command
cannot see a model registered by another package; this module imports the backend first, then runs
that command. Add `--include_path` with the package's
task directory (printed by `python -c "from megatron_tokenformer.evaluation.offline import task_dir;
print(task_dir())"`) to run the offline copies of the paper's tasks instead of the Hub's.
"""
import sys

from . import lm_backend  # noqa: F401  (registers the model name)


def main() -> int:
    from lm_eval.__main__ import cli_evaluate

    from ..errors import UserError

    sys.argv[0] = "lm_eval"
    try:
        cli_evaluate()
    except UserError as e:  # a bad checkpoint path or model argument: one line, as our tools print it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
