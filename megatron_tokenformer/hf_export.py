"""Export a checkpoint as a Hugging Face transformers model directory (needs `pip install -e '.[hf]'`).

    out/config.json                TokenFormerConfig: shape, vocab, each Pattention's tau, auto_map
    out/generation_config.json     end-of-document id as EOS (and pad); the padding rows above the
                                   tokenizer's vocab as suppress_tokens, so generate() never emits them
    out/model.safetensors          the weights, by the wrapper's parameter names (`model.` + ours)
    out/modeling_tokenformer.py    the wrapper, and the package's own modules it imports, verbatim:
    out/configuration_tokenformer.py, model.py, pattention.py, mappings.py, seeding.py, vocab_parallel.py
    out/tokenizer.json, tokenizer_config.json   a `tokenizers` tokenizer for AutoTokenizer

The model code is copied, not rewritten: which files go is what transformers' own loader finds by
following the relative imports of modeling_tokenformer.py (`get_relative_import_files`), so the
export ships exactly what `from_pretrained(..., trust_remote_code=True)` will load.

A sentencepiece tokenizer is converted to a `tokenizers` BPE with transformers' converter, which
follows the model's own normaliser settings; `split_special_tokens` keeps text like "</s>" plain
text, as sentencepiece does. Each export checks that the two encode a sample alike.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import CheckpointError, checkpoint_tokenizer, global_state_dict
from .checkpoint.files import save_safetensors
from .errors import UserError
from .tokenizer import Tokenizer

PACKAGE = Path(__file__).resolve().parent
ENTRY = "modeling_tokenformer.py"
AUTO_MAP = {"AutoConfig": "configuration_tokenformer.TokenFormerConfig",
            "AutoModelForCausalLM": "modeling_tokenformer.TokenFormerForCausalLM"}
# Encoded both ways at every export: whitespace runs, newlines and tabs, digits, accents, CJK, emoji
# (byte fallback), and a special token's text.
SAMPLE = ("  To be, or not to be:\n\n\tthat is the question.  1603 Ünïcödé — “quotes” 日本語 🤖 "
          "</s> <s> <unk> <|endoftext|> end")


class ExportError(UserError):
    """An export that cannot be written as asked; the message says what to change."""


def model_files() -> list[Path]:
    """The package files an export ships: the wrapper and every module it reaches by relative
    imports, found the way transformers' loader finds them."""
    from transformers.dynamic_module_utils import get_relative_import_files

    found = [PACKAGE / ENTRY, *map(Path, get_relative_import_files(PACKAGE / ENTRY))]
    return sorted(set(found))


def check_out_dir(out: str | Path) -> Path:
    """The output directory, which must not exist or be empty (an export never mixes with other files)."""
    dst = Path(out)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ExportError(f"{dst} exists and is not an empty directory; choose a new --out")
    return dst


def save_tokenizer(tok: Tokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json for AutoTokenizer, giving `tok.encode`'s ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tok.kind == "hf":
        fast = PreTrainedTokenizerFast(tokenizer_file=str(tok.path), model_max_length=max_length)
        eos = fast.convert_ids_to_tokens(tok.eod_id)
        fast.add_special_tokens({"eos_token": eos})  # already an added token: the vocab does not change
    else:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
            raise ExportError("this transformers cannot convert a sentencepiece model faithfully; "
                              "upgrade it (pip install -U transformers)")
        proto = import_protobuf().ModelProto()
        proto.ParseFromString(tok.path.read_bytes())
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
        sp = tok._impl
        specials = {"eos_token": sp.id_to_piece(tok.eod_id), "unk_token": sp.id_to_piece(sp.unk_id())}
        if sp.bos_id() >= 0:
            specials["bos_token"] = sp.id_to_piece(sp.bos_id())
        # sentencepiece reads "</s>" in text as characters; so must the fast tokenizer.
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length,
                                       split_special_tokens=True, **specials)
    fast.save_pretrained(str(out))
    # transformers 5 names its class TokenizersBackend, which 4.x lacks; both read this name.
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    got = AutoTokenizer.from_pretrained(str(out)).encode(SAMPLE, add_special_tokens=False, verbose=False)
    if got != tok.encode(SAMPLE):
        raise ExportError(f"the exported tokenizer encodes differently from {tok.path}: refusing to export a "
                          "tokenizer that does not give the model's ids")


def export_hf(load: str | Path, out: str | Path) -> Path:
    """Write checkpoint `load` (any layout) as a transformers model directory `out`.

    The directory appears complete or not at all: it is written next to `out` and renamed."""
    from transformers import GenerationConfig

    from .configuration_tokenformer import MODEL_FIELDS, TokenFormerConfig

    dst = check_out_dir(out)
    state, meta = global_state_dict(load)
    tok = checkpoint_tokenizer(load)
    rows, model_cfg = meta["vocab_size"], meta["config"]["model"]
    if tok.vocab_size > rows:
        raise CheckpointError(f"the checkpoint's tokenizer has {tok.vocab_size} ids but the model only {rows} "
                              "embedding rows")
    tensors = {f"model.{k}": v.contiguous() for k, v in state.items() if not k.endswith("._extra_state")}
    tau = {k.removesuffix("._extra_state"): v["tau"] for k, v in state.items() if k.endswith("._extra_state")}
    config = TokenFormerConfig(vocab_size=rows, tokenizer_vocab_size=tok.vocab_size, tau=tau,
                               **{k: model_cfg[k] for k in MODEL_FIELDS}, eos_token_id=tok.eod_id,
                               pad_token_id=tok.eod_id, architectures=["TokenFormerForCausalLM"])
    config.auto_map = dict(AUTO_MAP)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        save_tokenizer(tok, tmp, model_cfg["seq_length"])  # first: its check reads config.json if there is one
        config.save_pretrained(str(tmp))
        GenerationConfig(eos_token_id=tok.eod_id, pad_token_id=tok.eod_id,
                         suppress_tokens=list(range(tok.vocab_size, rows)) or None).save_pretrained(str(tmp))
        save_safetensors(tensors, tmp / "model.safetensors", {})
        for f in model_files():
            shutil.copyfile(f, tmp / f.name)
        tmp.chmod(0o755)  # mkdtemp makes it private
        check_out_dir(dst)  # still free (rename replaces an empty directory)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
