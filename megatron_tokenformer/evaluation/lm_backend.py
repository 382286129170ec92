"""The lm-eval backend `megatron_tokenformer`: any checkpoint of ours, scored as lm-eval's HF backend scores.

    from lm_eval.api.registry import get_model
    import megatron_tokenformer.evaluation.lm_backend  # registers the name
    lm = get_model("megatron_tokenformer").create_from_arg_string("path=runs/tiny/checkpoints,batch_size=16")

    python -m megatron_tokenformer.evaluation --model megatron_tokenformer \
        --model_args path=CKPT,batch_size=16 --tasks piqa,hellaswag       # lm_eval's CLI, name registered

Model arguments: `path` (a checkpoint directory or one step_* in it; the model and the tokenizer it
carries are read from it), `batch_size` (16), `device` (cuda if present, else cpu), `dtype`
(float32, bfloat16 or float16), `max_gen_toks` (256, generate_until's default).

The class inherits lm-eval's `TemplateLM.loglikelihood`, so the text-to-token rules are lm-eval's own
code; the token-level scoring is scoring.py. Evaluation during training builds the same class
around a model already in memory (`model=`, `tokenizer=`), with `rank`/`world_size` set so that
lm-eval's evaluator splits the documents over the processes.
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401  (before register_model below: see the note there)
import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..errors import UserError
from . import scoring

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvalError(UserError, ValueError):
    """A bad evaluation input (argument, task, data); the message names the fix."""


# lm-eval 0.4.13's get_model() imports lm_eval.models, which registers its own backends (hf, vllm,
# ...), only while the model registry is empty. Registering our name first would leave it non-empty
# and hide them all ("no model for this name found! Supported model names: megatron_tokenformer"),
# so lm_eval.models is imported above, before the decorator (harmless where it registers eagerly).
@register_model("megatron_tokenformer")
class TokenFormerLM(TemplateLM):
    """lm-eval's `LM` API over a TokenFormerModel on one process."""

    def __init__(self, path: str | None = None, batch_size: int | str = 16, device: str | None = None,
                 dtype: str = "float32", max_gen_toks: int = 256, model=None, tokenizer=None,
                 rank: int = 0, world_size: int = 1, progress: bool = True, **unknown):
        super().__init__()
        unknown.pop("max_batch_size", None)  # lm-eval's CLI passes it for its "auto" batch size search
        if unknown:
            raise EvalError(f"unknown model argument(s) {', '.join(unknown)}; this backend takes path, batch_size, "
                            "device, dtype, max_gen_toks")
        if dtype not in DTYPES:
            raise EvalError(f"dtype={dtype} is not one of {', '.join(DTYPES)}")
        if batch_size in (None, "auto"):  # lm-eval's "auto" probes memory; a fixed size is what we offer
            batch_size = 16
        try:
            self.batch_size = int(str(batch_size).split(":")[0])
        except ValueError:
            raise EvalError(f"batch_size={batch_size} is not a whole number") from None
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's CLI passes device=cuda:0 unless told otherwise; like its HF backend, fall back
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            if path is None:
                raise EvalError("give the checkpoint as path=..., e.g. --model_args path=runs/tiny/checkpoints")
            from ..checkpoint import load_model
            from ..checkpoint.reader import checkpoint_tokenizer

            tokenizer = checkpoint_tokenizer(path)  # first: a checkpoint without one fails before the weights load
            model, _ = load_model(path, device=device, dtype=DTYPES[dtype])
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = torch.device(device)
        self._rank, self._world_size = rank, world_size
        self.max_length = model.cfg.seq_length
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress and rank == 0

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's constructor path; `--model_args batch_size=16` wins over the CLI's own
        --batch_size (which lm-eval always passes, 1 by default)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- what TemplateLM asks for ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of a string; our tokenizers add no special tokens."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's TemplateLM.loglikelihood (its text-to-token rules), without its "Tokenizing inputs"
        bar: the scoring bar below is the one a run shows."""
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings, context ids, continuation ids), as TemplateLM makes them."""
        pieces = sum(-(-len(t) // self.max_length) for _, _, t in requests)  # long continuations: several
        with self._bar(pieces, "loglikelihood") as bar:
            out = scoring.score_continuations(self._forward, [(c, t) for _, c, t in requests], self.max_length,
                                              self.batch_size, self._device, bar.update)
        for (strings, _, _), answer in zip(requests, out):
            if strings is not None:  # lm-eval's --use_cache stores each answer under its strings
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole string, in rolling windows of the model's context with the
        EOD token as the first window's context."""
        seqs = [self.tok_encode(req.args[0]) for req in requests]
        windows = sum(len(scoring.rolling_windows(s, self.eot_token_id, self.max_length)) for s in seqs)
        with self._bar(windows, "loglikelihood_rolling (windows)") as bar:
            out = scoring.score_rolling(self._forward, seqs, self.eot_token_id, self.max_length, self.batch_size,
                                        self._device, bar.update)
        for req, value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (left-truncated to leave room for max_gen_toks) with
        generation.generate until a stop string, the EOD token, max_gen_toks or the model's context."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from ..generation import Sampling, generate

        out = []
        for req in tqdm(requests, desc="generate_until", disable=not self.progress):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=None)
            max_new = kw.pop("max_gen_toks")
            sampling = Sampling(greedy=not kw.get("do_sample"), temperature=float(kw.get("temperature") or 1.0),
                                top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 1.0),
                                seed=kw.get("seed"))
            # HF keeps max_length - max_gen_toks context tokens; at least one when generation would fill
            # the whole context (decoding then ends at the context, stopped="context").
            budget = max(1, self.max_length - max_new)
            ids = self.tok_encode(context)[-budget:] or [self.eot_token_id]

            def stop(new, until=until):
                text = self.tok_decode(new)
                return any(s and s in text for s in until)

            gen = generate(self.model, ids, max_new, sampling, vocab_size=self.tokenizer.vocab_size,
                           eod_id=self.eot_token_id, stop=stop if until else None)
            text = postprocess_generated_text(self.tok_decode(gen.tokens), until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    # ---- several processes (evaluation during training) -----------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier()

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "tokenizer": str(self.tokenizer.path), "max_length": self.max_length}
