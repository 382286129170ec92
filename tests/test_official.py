"""The released TokenFormer checkpoints in and out (tools/convert_checkpoint.py, megatron_tokenformer/official.py).

The proof is an independent reference: `official_logits` below transcribes the official forward pass
(Haiyang-W/TokenFormer, a GPT-NeoX fork; file and function cited at each piece) and imports nothing of
our model. It runs on random weights saved exactly as a released `pytorch_model.bin` is (a plain
torch state dict of the sequential model, fp32), the tool converts that file, and `load_model`'s
logits are compared with the transcription's in float64.

The one intended difference in the forward pass is our eps inside Pattention's row norm
(pattention.EPS; the official code divides by the bare norm). The tests compare twice: with our eps
(the bound 1e-5 holds) and with it set to 0, which leaves rounding alone. The official code's rotary
table is also computed in fp32 and then cast to the parameter dtype (GPT-NeoX's RotaryEmbedding),
ours in the model's dtype: about 1e-9 of the logits here, and the eps=0 comparison removes it too
(`fp32_table=False`) to show that nothing else differs.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, env, launch, losses

TOOL = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=32, proj_tokens=48, ffn_tokens=96, vocab=96)


def tiny_overrides(shape: dict, norm: str = "l2_norm_gelu") -> list[str]:
    return [f"model.{k}={v}" for k, v in shape.items() if k != "vocab"] + [f"model.norm={norm}"]


# ---- the official forward pass, transcribed ------------------------------------------------------------
# Official activations are [seq, batch, hidden] between the blocks (gpt2_model.py, _pre_transformer_block).

def official_norm(scores: torch.Tensor, normalize_type: str) -> torch.Tensor:
    """megatron/model/tokenformer.py, Pattention.nonlinear_norm_func (over the last dim)."""
    n = scores.shape[-1]
    if normalize_type == "softmax":  # exp, then L1 norm, times n: no max subtracted
        e = torch.exp(scores)
        return e / torch.norm(e, p=1, dim=-1, keepdim=True) * n
    if normalize_type == "gelu_l2_norm":
        g = F.gelu(scores)
        return g / torch.norm(g, p=2, dim=-1, keepdim=True) * math.sqrt(n)
    if normalize_type == "l2_norm_gelu":
        return F.gelu(scores / torch.norm(scores, p=2, dim=-1, keepdim=True) * math.sqrt(n))
    raise NotImplementedError(normalize_type)


def official_pattention(x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, norm: str) -> torch.Tensor:
    """tokenformer.py, Pattention.forward: no router, no mask (its attn_bias of ones multiplies by 1),
    scale 1, dropout 0."""
    return official_norm(x @ key.transpose(-2, -1), norm) @ value


def official_rotary(dim: int, seq_len: int, base: float, precision: torch.dtype, fp32_table: bool = True):
    """GPT-NeoX megatron/model/positional_embeddings.py, RotaryEmbedding._prepare_cache: (cos, sin) of
    [seq, 1, 1, dim], computed in fp32 and cast to the parameter dtype (`fp32_table=False`: in `precision`)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(seq_len).type_as(inv_freq)
    if not fp32_table:
        t, inv_freq = t.to(precision), inv_freq.to(precision)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, None, :].to(precision), emb.sin()[:, None, None, :].to(precision)


def official_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """positional_embeddings.py, rotate_half."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


def official_attention(x, sd, p, heads, norm, rotary_pct, base, fp32_table):
    """tokenformer.py, ParallelSelfAttention.forward (model parallel size 1, no cache) with its
    flash_attention: flash_attn_func(q, k, v, causal=True, softmax_scale=None), i.e. a causal softmax of
    q k^T / sqrt(head dim); positional_embeddings.py, apply_rotary_pos_emb (offset 0) on the first
    int(head_dim * rotary_pct) dims."""
    sq, b, h = x.shape
    hn = h // heads
    q, k, v = (official_pattention(x, sd[p + f"attention.{n}.key_param_tokens"],
                                   sd[p + f"attention.{n}.value_param_tokens"], norm).view(sq, b, heads, hn)
               for n in ("query", "key", "value"))
    rot = int(hn * rotary_pct)
    (q_rot, q_pass), (k_rot, k_pass) = (q[..., :rot], q[..., rot:]), (k[..., :rot], k[..., rot:])
    cos, sin = official_rotary(rot, sq, base, x.dtype, fp32_table)
    cos, sin = cos[:sq], sin[:sq]
    q = torch.cat(((q_rot * cos) + (official_rotate_half(q_rot) * sin), q_pass), dim=-1)
    k = torch.cat(((k_rot * cos) + (official_rotate_half(k_rot) * sin), k_pass), dim=-1)
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, np, sq, hn], flash's layout transposed
    scores = (qb @ kb.transpose(-2, -1)) / math.sqrt(hn)
    scores = scores.masked_fill(torch.ones(sq, sq, dtype=torch.bool).triu(1), float("-inf"))
    context = torch.softmax(scores, dim=-1) @ vb                      # [b, np, sq, hn]
    context = context.permute(2, 0, 1, 3).reshape(sq, b, h)          # [sq, b, np, hn] -> [sq, b, hp]
    return official_pattention(context, sd[p + "attention.proj.key_param_tokens"],
                               sd[p + "attention.proj.value_param_tokens"], norm)


def official_logits(sd: dict, ids: torch.Tensor, heads: int, norm: str, dtype=torch.float64, rotary_pct=0.25,
                    base=10000.0, eps=1e-5, fp32_table=True) -> torch.Tensor:
    """The official model: gpt2_model.py, GPT2ModelPipe.init_specs (embedding, blocks, final NormPipe, tied
    head through _logits_helper / parallel_lm_logits = F.linear with the word embeddings); each block
    tokenformer.py, ParallelTokenformerLayer.forward (x + attention(ln(x)), then + mlp(ln(.)), dropout 0,
    mlp bias 0); norms.py: LayerNorm_NonParam in the blocks, torch LayerNorm (final_norm "layernorm",
    layernorm_fusion false) at the end, eps layernorm_epsilon (1e-5); word_embeddings.py,
    Embedding.forward: word embeddings only (rotary: no position embedding), dropout 0."""
    sd = {k: v.to(dtype) for k, v in sd.items()}
    L = sum(1 for k in sd if k.endswith("mlp.key_param_tokens"))
    d = sd["sequential.0.word_embeddings.weight"].shape[1]
    x = F.embedding(ids, sd["sequential.0.word_embeddings.weight"]).transpose(0, 1)  # [s, b, h]
    for i in range(L):
        p = f"sequential.{i + 2}."
        x = official_attention(F.layer_norm(x, (d,), eps=eps), sd, p, heads, norm, rotary_pct, base, fp32_table) + x
        x = official_pattention(F.layer_norm(x, (d,), eps=eps), sd[p + "mlp.key_param_tokens"],
                                sd[p + "mlp.value_param_tokens"], norm) + x
    x = x.transpose(0, 1)
    x = F.layer_norm(x, (d,), sd[f"sequential.{L + 3}.norm.weight"], sd[f"sequential.{L + 3}.norm.bias"], eps)
    return F.linear(x, sd["sequential.0.word_embeddings.weight"])


def official_random_state(num_layers, hidden_size, qkv_tokens, proj_tokens, ffn_tokens, vocab, seed=0,
                          embed_std=0.02, **_):
    """Random weights in the official file's keys and dtype (fp32): keys N(0, 0.1) (larger than the
    init's 0.02, so that softmax rows are far from uniform), values the wang init 2 / (L sqrt(d)),
    embedding N(0, embed_std), final norm weight 1 + N(0, 0.1) and bias N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    L, d = num_layers, hidden_size
    wang = 2.0 / (L * math.sqrt(d))

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    sd = {"sequential.0.word_embeddings.weight": normal(vocab, d, std=embed_std)}
    for i in range(L):
        p = f"sequential.{i + 2}."
        for name, n in (("attention.query", qkv_tokens), ("attention.key", qkv_tokens),
                        ("attention.value", qkv_tokens), ("attention.proj", proj_tokens), ("mlp", ffn_tokens)):
            sd[p + f"{name}.key_param_tokens"] = normal(n, d, std=0.1)
            sd[p + f"{name}.value_param_tokens"] = normal(n, d, std=wang)
    sd[f"sequential.{L + 3}.norm.weight"] = 1 + normal(d, std=0.1)
    sd[f"sequential.{L + 3}.norm.bias"] = normal(d, std=0.1)
    return sd


# ---- helpers --------------------------------------------------------------------------------------------

def convert(*args, check=True):
    """Run the tool as a user does; returns the finished process."""
    proc = subprocess.run([*TOOL, *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"convert_checkpoint {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest elementwise error relative to the largest |logit| (every logit counts)."""
    return ((got - want).abs().max() / want.abs().max()).item()


def import_tiny(tmp_path, norm, shape=TINY):
    """Random official weights of `shape`, saved as pytorch_model.bin and converted by the tool."""
    sd = official_random_state(**shape)
    src = tmp_path / "pytorch_model.bin"
    torch.save(sd, src)
    ckpt = tmp_path / "ckpt"
    convert("--from", "official", "--load", src, "--config", "configs/tiny.yml", *tiny_overrides(shape, norm),
            "--save", ckpt)
    return sd, ckpt


# ---- the official forward, reproduced -------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_imported_model_reproduces_the_official_forward(tmp_path, monkeypatch, norm):
    from megatron_tokenformer import load_model, pattention

    sd, ckpt = import_tiny(tmp_path, norm)
    model, cfg = load_model(ckpt, dtype=torch.float64)
    assert cfg.model.norm == norm and cfg.model.vocab_size == TINY["vocab"]
    ids = torch.randint(0, TINY["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))
    want = official_logits(sd, ids, TINY["num_heads"], norm)
    with torch.no_grad():
        ours = model(ids)
    err = rel_err(ours, want)
    assert err <= 1e-5, f"{norm}: relative error {err:.2e} with our eps {pattention.EPS}"
    # eps 0 and the official rotary table's fp32 rounding removed: what is left is rounding order.
    monkeypatch.setattr(pattention, "EPS", 0.0)
    with torch.no_grad():
        exact = rel_err(model(ids), official_logits(sd, ids, TINY["num_heads"], norm, fp32_table=False))
    assert exact <= 1e-12, f"{norm}: relative error {exact:.2e} with eps 0"
    print(f"{norm}: max relative error {err:.2e} (our eps), {exact:.2e} (eps 0)")


@pytest.mark.slow
def test_imported_150M_shape_reproduces_the_official_forward(tmp_path):
    """configs/150M.yml as released (vocab 50304, 12 x 768, tokens 768/768/3072), 2 x 16 tokens in
    float32 for our model (as it is used) against the transcription in float64."""
    from megatron_tokenformer import load_config, load_model

    m = load_config("configs/150M.yml").model
    shape = dict(num_layers=m.num_layers, hidden_size=m.hidden_size, qkv_tokens=m.qkv_tokens,
                 proj_tokens=m.proj_tokens, ffn_tokens=m.ffn_tokens, vocab=m.vocab_size)
    sd = official_random_state(**shape)
    src = tmp_path / "pytorch_model.bin"
    torch.save(sd, src)
    convert("--from", "official", "--load", src, "--config", "configs/150M.yml", "--save", tmp_path / "ckpt")
    src.unlink()
    model, _ = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, m.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids).double()
    del model
    err = rel_err(ours, official_logits(sd, ids, m.num_heads, m.norm))
    assert err <= 1e-5, f"150M: relative error {err:.2e}"
    print(f"150M (ours in float32): max relative error {err:.2e}")


# ---- ours -> official -> ours ---------------------------------------------------------------------------

def ours_checkpoint(path, seed=3):
    """A checkpoint of ours written from a TokenFormerModel with every parameter random, the final-norm
    gain included (its low bits are the ones a float32 1 + g would lose)."""
    from megatron_tokenformer import TokenFormerModel, load_config
    from megatron_tokenformer.official import write_checkpoint

    cfg = load_config("configs/tiny.yml", tiny_overrides(TINY))
    torch.manual_seed(seed)
    model = TokenFormerModel(cfg.model, TINY["vocab"])
    with torch.no_grad():
        model.final_norm.weight.normal_(std=1e-3)
        model.final_norm.bias.normal_(std=0.1)
    return write_checkpoint(model.state_dict(), cfg, TINY["vocab"], path)


def test_round_trip_ours_official_ours_is_bit_exact(tmp_path):
    from megatron_tokenformer import load_config
    from megatron_tokenformer.checkpoint import global_state
    from megatron_tokenformer.official import export_official, import_official, load_state_file, official_keys

    ours_checkpoint(tmp_path / "a")
    bin_file = tmp_path / "out" / "pytorch_model.bin"
    convert("--to", "official", "--load", tmp_path / "a", "--save", bin_file)
    official = load_state_file(bin_file)
    assert list(official) == official_keys(TINY["num_layers"])
    convert("--from", "official", "--load", bin_file, "--config", "configs/tiny.yml", *tiny_overrides(TINY),
            "--save", tmp_path / "b")
    # and through safetensors (the library calls the tool makes)
    export_official(tmp_path / "b", tmp_path / "out" / "model.safetensors")
    import_official(tmp_path / "out" / "model.safetensors", load_config("configs/tiny.yml", tiny_overrides(TINY)),
                    tmp_path / "c")
    want, _, _ = global_state(tmp_path / "a")
    for other in ("b", "c"):
        got, _, meta = global_state(tmp_path / other)
        assert set(got) == set(want)
        for name, w in want.items():
            if isinstance(w, torch.Tensor):
                assert got[name].dtype == w.dtype and torch.equal(got[name], w), (other, name)
            else:
                assert got[name] == w, (other, name)  # tau
        assert meta["step"] == 0 and meta["moments"] is False and meta["source"]["format"] == "official"


def test_grown_model_with_kept_tau_is_refused(tmp_path):
    from megatron_tokenformer.growth import GrowthOptions, expand_checkpoint
    from megatron_tokenformer.official import export_official

    _, ckpt = import_tiny(tmp_path, "l2_norm_gelu")
    # Growth reads the weights-only checkpoint (no Adam moments to carry) and writes one too.
    grown, _ = expand_checkpoint(ckpt, tmp_path / "grown", {"ffn_tokens": 192}, GrowthOptions())
    out = tmp_path / "grown.bin"
    proc = convert("--to", "official", "--load", grown, "--save", out, check=False)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "blocks.0.ffn has tau=9.79796 for its 192 tokens" in proc.stderr and "--tau sqrt-n" in proc.stderr
    # Grown the official way (tau follows the token count), it exports.
    paper, _ = expand_checkpoint(ckpt, tmp_path / "paper", {"ffn_tokens": 192}, GrowthOptions(tau="sqrt-n"))
    export_official(paper, out)
    assert out.is_file()


# ---- bad input: one line, exit 2, nothing written ---------------------------------------------------------

class _RunsCode:
    """Pickles as a call of os.mkdir: loading it unrestricted would create the marker directory."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _bad_inputs(tmp_path):
    """name -> (file to --load, extra arguments, what the error line must say)."""
    sd = official_random_state(**TINY)
    cases = {}
    page = tmp_path / "page.bin"
    page.write_text("<!DOCTYPE html><html>Repository not found</html>\n")
    cases["not_a_state_dict"] = (page, [], "is not a torch state dict file")
    code = tmp_path / "code.bin"
    torch.save({**sd, "sequential.1.hook": _RunsCode(tmp_path / "ran")}, code)
    cases["pickle_with_code"] = (code, [], "is a pickle that carries code (it calls posix.mkdir); refused, nothing in "
                                           "it was run")
    keys = tmp_path / "keys.bin"
    torch.save({**{k: v for k, v in sd.items() if k != "sequential.3.mlp.value_param_tokens"},
                "sequential.2.attention.rotary_emb.inv_freq": torch.ones(4)}, keys)
    cases["missing_and_extra_keys"] = (keys, [], "missing sequential.3.mlp.value_param_tokens; unexpected "
                                                 "sequential.2.attention.rotary_emb.inv_freq")
    good = tmp_path / "pytorch_model.bin"
    torch.save(sd, good)
    cases["shape"] = (good, ["model.ffn_tokens=128"], "sequential.2.mlp.key_param_tokens has shape (96, 64), the "
                                                      "config gives (128, 64) (model.ffn_tokens=128); set "
                                                      "model.ffn_tokens=96")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine\n")
    cases["save_dir_not_empty"] = (good, ["--save", full], f"{full} already holds something")
    bad_tok = tmp_path / "tokenizer.json"
    bad_tok.write_text("{not json")
    cases["tokenizer_does_not_parse"] = (good, ["--tokenizer", bad_tok], "is not a Hugging Face tokenizers file")
    return cases


@pytest.mark.parametrize("case", ["not_a_state_dict", "pickle_with_code", "missing_and_extra_keys", "shape",
                                  "save_dir_not_empty", "tokenizer_does_not_parse"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    src, extra, says = _bad_inputs(tmp_path)[case]
    save = tmp_path / "ckpt"
    overrides = tiny_overrides(TINY) + [a for a in extra if "=" in str(a)]
    extra = [a for a in extra if "=" not in str(a)]
    args = ["--from", "official", "--load", src, "--config", "configs/tiny.yml", *overrides]
    proc = convert(*args, *(extra if "--save" in extra else ["--save", save, *extra]), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert says in proc.stderr, proc.stderr
    assert not save.exists() and not (tmp_path / "ran").exists()  # nothing written, nothing run
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]


def test_checks_name_the_tensor_and_the_config_key(tmp_path):
    """The same checks in-process, for the cases not worth a process each."""
    from megatron_tokenformer.config import ModelConfig
    from megatron_tokenformer.official import OfficialFormatError, check_official, load_state_file

    sd = official_random_state(**TINY)
    model = ModelConfig(**{k: v for k, v in TINY.items() if k != "vocab"})
    assert check_official(sd, model) == TINY["vocab"]
    with pytest.raises(OfficialFormatError, match=r"holds 2 TokenFormer blocks \(sequential.2 to sequential.3\), "
                                                  r"the config model.num_layers=3; set model.num_layers=2"):
        check_official(sd, ModelConfig(**{**model.__dict__, "num_layers": 3}))
    with pytest.raises(OfficialFormatError, match=r"sequential.0.word_embeddings.weight has shape \(96, 64\), the "
                                                  r"config gives \(96, 128\) \(model.hidden_size=128\)"):
        check_official(sd, ModelConfig(**{**model.__dict__, "hidden_size": 128}))
    with pytest.raises(OfficialFormatError, match=r"has shape \(96, 64\), the config gives \(100, 64\) "
                                                  r"\(model.vocab_size=100\); set model.vocab_size=96"):
        check_official(sd, ModelConfig(**{**model.__dict__, "vocab_size": 100}))
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(OfficialFormatError, match=r"list.bin holds a list, not a state dict"):
        load_state_file(tmp_path / "list.bin")
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "nested.bin")
    with pytest.raises(OfficialFormatError, match=r"not a plain state dict: 'module' holds a dict, not a tensor"):
        load_state_file(tmp_path / "nested.bin")


# ---- a converted checkpoint trains at TP=2 ----------------------------------------------------------------

@pytest.mark.slow
def test_converted_checkpoint_trains_at_tp2_from_its_weights(corpus, tmp_path):
    """checkpoint.load=DIR on 2 gloo ranks with tensor parallelism: the first step's loss is the loss the
    converted weights give on that batch, computed on one process by load_model."""
    from helpers import SMALL
    from megatron_tokenformer import load_config, load_model
    from megatron_tokenformer.data import SampleSet, TrainBatches, load_meta

    shape = dict(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=64, proj_tokens=64, ffn_tokens=128, vocab=512)
    src = tmp_path / "pytorch_model.bin"
    torch.save(official_random_state(**shape, embed_std=0.3), src)  # loss far from a fresh model's ln(512)
    ckpt = tmp_path / "ckpt"
    # The corpus's tokenizer goes in, so the run's check of checkpoint against data passes.
    convert("--from", "official", "--load", src, "--config", "configs/tiny.yml", *tiny_overrides(shape),
            "--tokenizer", corpus / "tokenizer.model", "--save", ckpt)
    assert (ckpt / "step_00000000" / "tokenizer.model").is_file()
    run = tmp_path / "run"
    over = [*SMALL, f"data.path={corpus}", f"log.dir={run}", f"checkpoint.load={ckpt}", "parallel.tensor=2",
            "train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=4"]
    out = launch(over, nproc=2)
    assert f"resumed from {ckpt / 'step_00000000'} at step 0" in out.stdout + out.stderr
    run_cfg = load_config(run / "config.yml")  # the run's own: its sequence length, seed and split
    samples = SampleSet(load_meta(corpus), run_cfg.model.seq_length, "train", run_cfg.data.valid_fraction)
    batch = TrainBatches(samples, run_cfg.train.seed, 4, 4, 0, 1).next_step()[0]
    model, _ = load_model(ckpt)
    with torch.no_grad():
        want = model(batch[:, :-1], batch[:, 1:]).item()
    got = losses(run)[1]
    assert abs(got - want) <= 1e-5 * want and abs(want - math.log(512)) > 0.5, (got, want)
    print(f"TP=2 first loss {got:.6f}, load_model {want:.6f}")


@pytest.mark.slow
def test_imported_model_exported_to_transformers_reproduces_the_official_forward(corpus, tmp_path):
    """Released file -> our checkpoint -> Hugging Face export: AutoModelForCausalLM computes the official
    forward (float64, within 1e-5 as above)."""
    from transformers import AutoModelForCausalLM

    shape = dict(TINY, vocab=512)  # the corpus tokenizer's 512 ids: the export carries it
    sd = official_random_state(**shape)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    convert("--from", "official", "--load", tmp_path / "pytorch_model.bin", "--config", "configs/tiny.yml",
            *tiny_overrides(shape), "--save", tmp_path / "ckpt", "--tokenizer", corpus / "tokenizer.model")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "--load", str(tmp_path / "ckpt"),
                          "--format", "hf", "--out", str(tmp_path / "hf")], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                 dtype=torch.float64).eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = rel_err(model(ids).logits, official_logits(sd, ids, TINY["num_heads"], "l2_norm_gelu"))
    assert err <= 1e-5, err
