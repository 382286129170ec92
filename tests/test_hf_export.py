"""Export to Hugging Face transformers, and generation through tools/generate.py, from a real
checkpoint (a few training steps on the built-in corpus, embedding rows padded above the vocab).

The exported directory is loaded in a subprocess where `import megatron_tokenformer` fails, from a
directory outside the repository and without it on PYTHONPATH: only transformers and the files
the export ships are there."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, SMALL, env, launch
from megatron_tokenformer.checkpoint import checkpoint_tokenizer, global_state_dict, load_model
from megatron_tokenformer.checkpoint.integrity import write_manifest
from megatron_tokenformer.generation import Sampling, generate, generate_text

ROWS = 640  # embedding rows; the corpus tokenizer has 512 ids, so 128 rows are padding
PROMPT = [5, 17, 42, 9, 100, 7, 300, 11]
EDGE_TEXTS = ["  leading spaces\n\n\ttabs\r\n", "</s> <s> <unk> as text", "Ünïcödé — “quotes” 日本語 🤖 1603", " ",
              "a  b   c"]


def tool(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "tools" / args[0]), *map(str, args[1:])], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def ckpt(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("hf") / "run"
    launch(SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=6", f"model.vocab_size={ROWS}"],
           launcher="python")
    return run / "checkpoints"


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-hf"
    done = tool("export.py", "--load", ckpt, "--format", "hf", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def text(corpus) -> str:
    """Real text: the start of three of the corpus's works (about 300k characters), and edge cases."""
    works = sorted((corpus / "raw").glob("*.txt"))[:3]
    return "".join(w.read_text(encoding="utf-8")[:100_000] for w in works)


# Runs where megatron_tokenformer cannot be imported; writes its results next to the logits.
OUTSIDE = textwrap.dedent("""
    import sys
    sys.modules["megatron_tokenformer"] = None  # any import of the package fails
    import json, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, prompt, texts, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(open(sys.argv[3]).read()), sys.argv[4]
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    # Without trust_remote_code: transformers asks whether to run the config's code (on stdout; no
    # terminal here, so the answer is no) and falls back to a plain config; the tokenizer needs none.
    tok = AutoTokenizer.from_pretrained(d)
    x = torch.arange(2 * 64).view(2, 64) * 7 % 512
    with torch.no_grad():
        res = model(x, labels=x)
    save_file({"logits": res.logits.contiguous(), "x": x}, out)
    p = torch.tensor([prompt])
    greedy = lambda ids, **kw: model.generate(ids, max_new_tokens=40, do_sample=False, **kw)[0, ids.shape[1]:].tolist()
    pad = torch.tensor([[tok.eos_token_id] * 3 + prompt] * 2)
    mask = torch.tensor([[0] * 3 + [1] * len(prompt)] * 2)
    def sample(**kw):  # hot sampling, to reach the padding rows if anything can
        torch.manual_seed(0)
        return model.generate(p, max_new_tokens=60, do_sample=True, temperature=3.0, **kw)[0, p.shape[1]:].tolist()
    try:
        model.generate(pad, attention_mask=torch.tensor([[0] * 3 + [1] * 8, [0] * 4 + [1] * 7]), max_new_tokens=2)
        mixed = None
    except ValueError as e:
        mixed = str(e)
    open(out + ".json", "w").write(json.dumps({"module": type(model).__module__, "loss": res.loss.item(),
                      "cached": greedy(p), "uncached": greedy(p, use_cache=False),
                      "padded": model.generate(pad, attention_mask=mask, max_new_tokens=40, do_sample=False)[:, 11:].tolist(),
                      "mixed_padding": mixed, "sampled": sample(), "unsuppressed": sample(suppress_tokens=[]), "ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                      "encode": tok.encode(texts[0]), "eos": tok.eos_token_id}))
""")


@pytest.fixture(scope="module")
def outside(exported, text, tmp_path_factory):
    """Results of loading the export where the package cannot be imported."""
    tmp = tmp_path_factory.mktemp("outside")
    (tmp / "texts.json").write_text(json.dumps([text, *EDGE_TEXTS]))
    e = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    e["HF_MODULES_CACHE"] = str(tmp / "hf_modules")  # transformers copies the remote code here
    done = subprocess.run([sys.executable, "-c", OUTSIDE, str(exported), json.dumps(PROMPT), str(tmp / "texts.json"),
                           str(tmp / "logits.safetensors")], cwd=tmp, env=e, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp / "logits.safetensors.json").read_text())
    res.update(load_file(tmp / "logits.safetensors"))
    return res


@pytest.mark.slow
def test_export_ships_the_package_modules_verbatim(ckpt, exported, outside):
    files = {p.name for p in exported.iterdir()}
    code = {"modeling_tokenformer.py", "configuration_tokenformer.py", "model.py", "pattention.py", "mappings.py",
            "seeding.py", "vocab_parallel.py"}
    assert files == code | {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json"}
    for name in code:  # one source: the exported code is the package's, byte for byte
        assert (exported / name).read_bytes() == (ROOT / "megatron_tokenformer" / name).read_bytes()
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_tokenformer.TokenFormerConfig",
                                  "AutoModelForCausalLM": "modeling_tokenformer.TokenFormerForCausalLM"}
    state, meta = global_state_dict(ckpt)
    assert config["tau"] == {k.removesuffix("._extra_state"): v["tau"] for k, v in state.items()
                             if k.endswith("._extra_state")}
    assert config["vocab_size"] == ROWS and config["tokenizer_vocab_size"] == 512
    assert outside["module"].startswith("transformers_modules.")  # loaded from the export, not the package


@pytest.mark.slow
def test_logits_equal_load_model(ckpt, outside):
    model, _ = load_model(ckpt)
    with torch.no_grad():
        ref = model(outside["x"])
    torch.testing.assert_close(outside["logits"], ref, rtol=0, atol=1e-5)  # every row, padding included
    x = outside["x"]
    loss = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ROWS), x[:, 1:].reshape(-1))
    assert abs(outside["loss"] - loss.item()) < 1e-5


@pytest.mark.slow
def test_generate_with_cache_equals_without_and_ours(ckpt, outside):
    assert outside["cached"] == outside["uncached"]
    model, _ = load_model(ckpt)
    tok = checkpoint_tokenizer(ckpt)
    ours = generate(model, PROMPT, 40, Sampling(greedy=True), vocab_size=tok.vocab_size, eod_id=tok.eod_id)
    hf = outside["cached"]
    assert hf[:len(ours.tokens)] == ours.tokens and (ours.stopped == "length" or hf[len(ours.tokens)] == tok.eod_id)
    # The same left padding in every row gives the unpadded continuation; different padding is refused.
    assert outside["padded"] == [hf, hf]
    assert "same left padding" in outside["mixed_padding"]


@pytest.mark.slow
def test_generate_never_produces_padding_rows(exported, outside):
    assert json.loads((exported / "generation_config.json").read_text())["suppress_tokens"] == list(range(512, ROWS))
    assert max(outside["sampled"]) < 512
    assert max(outside["unsuppressed"]) >= 512  # without the list it would (the rows are untrained)


@pytest.mark.slow
def test_tokenizer_gives_the_checkpoints_ids(ckpt, text, outside):
    tok = checkpoint_tokenizer(ckpt)
    assert tok.kind == "sentencepiece" and outside["eos"] == tok.eod_id
    for t, ids in zip([text, *EDGE_TEXTS], outside["ids"]):
        assert ids == tok.encode(t), t[:40]
    assert outside["encode"] == tok.encode(text)  # encode() adds nothing either
    assert len(outside["ids"][0]) > 50_000


def test_gpt_neox_tokenizer_exports_as_is(text, tmp_path):
    from transformers import AutoTokenizer

    from megatron_tokenformer.assets import gpt_neox_tokenizer_file
    from megatron_tokenformer.hf_export import save_tokenizer
    from megatron_tokenformer.tokenizer import load_tokenizer

    tok = load_tokenizer(gpt_neox_tokenizer_file())
    save_tokenizer(tok, tmp_path, 2048)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == tok.eod_id and len(hf) == tok.vocab_size
    for t in [text[:50_000], *EDGE_TEXTS, "<|endoftext|>x"]:
        assert hf(t)["input_ids"] == tok.encode(t)


@pytest.mark.slow
def test_export_refuses_bad_output_and_missing_tokenizer(ckpt, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    done = tool("export.py", "--load", ckpt, "--format", "hf", "--out", busy)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    assert "not an empty directory" in done.stderr and [p.name for p in busy.iterdir()] == ["notes.txt"]
    # A checkpoint without its tokenizer (written before checkpoints carried one) is refused.
    step = tmp_path / "old" / "step_00000006"
    shutil.copytree(next(Path(ckpt).glob("step_*")), step)
    (step / "tokenizer.model").unlink()
    write_manifest(step)
    out = tmp_path / "out"
    for args in (["export.py", "--load", step, "--format", "hf", "--out", out],
                 ["generate.py", "--load", step, "--prompt", "To be"]):
        done = tool(*args)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stderr.startswith("error: ") and "carries no tokenizer" in done.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["busy", "old"]  # nothing half-done


@pytest.mark.slow
def test_generate_tool(ckpt):
    done = tool("generate.py", "--load", ckpt, "--prompt", "To be, or not", "--greedy", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    model, _ = load_model(ckpt)
    ours = generate_text(model, checkpoint_tokenizer(ckpt), "To be, or not", 12, Sampling(greedy=True))
    assert done.stdout == ours.text + "\n"
    assert "tokens/s (KV cache" in done.stderr and f"{len(ours.tokens)} new tokens" in done.stderr
    done = tool("generate.py", "--load", ckpt, "--prompt", "word " * 100)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("error: the prompt has") and "context of 64" in done.stderr
