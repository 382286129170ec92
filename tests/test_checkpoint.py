"""Checkpoints: atomic and verified, newest good one resumed, clean failures, read back from any layout."""
import json
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import ROOT, env, launch, metrics
from megatron_tokenformer import load_model
from megatron_tokenformer.checkpoint import (CheckpointError, checkpoint_tokenizer, global_state_dict, newest_good,
                                             verify)

pytestmark = pytest.mark.slow  # every test here starts training processes or several ranks

DEEP = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.qkv_tokens=64",
        "model.proj_tokens=64", "model.ffn_tokens=128", "model.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=8", "log.interval=1", "log.progress=false", "eval.interval=0",
        "log.wandb_mode=disabled", "train.steps=3", "checkpoint.interval=2", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The same training at three layouts: one process, PP=2, and TP=2 x PP=2."""
    out = {}
    for name, over, nproc in (("single", ["log.wandb_mode=offline"], 1), ("pp2", ["parallel.pipeline=2"], 2),
                              ("tp2pp2", ["parallel.tensor=2", "parallel.pipeline=2"], 4)):
        run = tmp_path_factory.mktemp(name)
        launch(DEEP + [f"data.path={corpus}", f"log.dir={run}", *over], nproc=nproc, extra_env={"WANDB_API_KEY": SECRET})
        out[name] = run / "checkpoints"
    return out


SECRET = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key


def test_checkpoints_hold_no_pickles_and_no_secrets(corpus, runs):
    """Tensors are safetensors, the rest JSON or the data's tokenizer (a sentencepiece protobuf):
    loading unpickles nothing. The W&B key in the environment appears in no file of the run
    (checkpoints, config dump, W&B's offline run)."""
    for name, ckpt in runs.items():
        for f in (ckpt / "step_00000003").iterdir():
            assert f.suffix in (".safetensors", ".json") or f.name == "tokenizer.model", f
        # the checkpoint carries the tokenizer it was trained with: it alone suffices to generate
        assert checkpoint_tokenizer(ckpt).path.read_bytes() == (Path(corpus) / "tokenizer.model").read_bytes()
        for f in ckpt.parent.rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f
    assert list(runs["single"].parent.rglob("*.wandb"))  # the W&B run was written, and checked above


def test_load_model_from_any_layout_and_export(runs, tmp_path):
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    ref_model, cfg = load_model(runs["single"])
    assert cfg.model.num_layers == 4 and not ref_model.training
    with torch.no_grad():
        ref = ref_model(ids)
        for name in ("pp2", "tp2pp2"):
            got = load_model(runs[name])[0](ids)
            err = (got - ref).abs().max() / ref.abs().max()
            # the layouts train the same model: the README's 1e-5 (7e-7 here after 3 steps: fp32 sums in
            # another order across tensor and pipeline ranks)
            assert err < 1e-5, (name, err.item())
    # export: one safetensors file + config.json, read back into the same logits
    out = subprocess.run([sys.executable, "tools/export.py", "--load", str(runs["tp2pp2"]), "--out",
                          str(tmp_path / "exp")], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "exp").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # one ordinary mode for both (umask's)
    from safetensors.torch import load_file

    from megatron_tokenformer import TokenFormerModel
    from megatron_tokenformer.config import config_from_dict

    info = json.loads((tmp_path / "exp" / "config.json").read_text())
    model = TokenFormerModel(config_from_dict(info["config"]).model, info["vocab_size"])
    state = load_file(str(tmp_path / "exp" / "model.safetensors"))
    state.update({f"{k}._extra_state": {"tau": v} for k, v in info["tau"].items()})
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), load_model(runs["tp2pp2"])[0](ids), rtol=0, atol=0)
    again = subprocess.run([sys.executable, "tools/export.py", "--load", str(runs["tp2pp2"]), "--out",
                            str(tmp_path / "exp")], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damage_is_detected_and_the_newest_good_one_is_taken(runs, tmp_path):
    ckpt = _copy(runs["single"], tmp_path / "ckpt")
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert verify(ckpt / "step_00000003") is None and newest_good(ckpt) == "step_00000003"
    model_file = ckpt / "step_00000003" / "layer_002-tp00-dp00.safetensors"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    model_file.write_bytes(bytes(data))
    assert "checksum" in verify(ckpt / "step_00000003")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000003.*checksum"):
        assert newest_good(ckpt) == "step_00000002"
    with pytest.raises(CheckpointError, match="damaged.*checksum"):
        global_state_dict(ckpt / "step_00000003")
    model_file.write_bytes(bytes(data[:1000]))
    assert "truncated" in verify(ckpt / "step_00000003")
    model_file.unlink()
    assert "missing" in verify(ckpt / "step_00000003")
    (ckpt / "step_00000004.partial").mkdir()  # a write killed midway is never taken
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert newest_good(ckpt) == "step_00000002"
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        global_state_dict(tmp_path)
    # a checkpoint of another format version (e.g. DeepSpeed's pickles, version 1) is refused by name
    from megatron_tokenformer.checkpoint import write_manifest

    meta_path = ckpt / "step_00000002" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 1}))
    write_manifest(ckpt / "step_00000002")
    with pytest.raises(CheckpointError, match="format version 1; this version reads 2 and 3. Train into a new"):
        global_state_dict(ckpt / "step_00000002")


def test_resume_skips_a_broken_checkpoint(corpus, runs, tmp_path):
    run = tmp_path / "run"
    _copy(runs["single"], run / "checkpoints")
    victim = run / "checkpoints" / "step_00000003" / "layer_002-tp00-dp00.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    out = launch(DEEP + [f"data.path={corpus}", f"log.dir={run}", "train.steps=4"], launcher="python")
    text = out.stdout + out.stderr
    assert "skipping checkpoint" in text and "step_00000003" in text
    assert "at step 2" in text
    assert [m["step"] for m in metrics(run)] == [3, 4]


@pytest.mark.parametrize("background", [False, True], ids=["direct", "async_save"])
def test_failed_write_stops_cleanly_and_keeps_the_previous(corpus, runs, tmp_path, background):
    """A file-size limit (RLIMIT_FSIZE) set on the running trainer makes its next checkpoint write fail
    (in the background: the run stops at the next save, which waits for it)."""
    import re
    import time

    run = tmp_path / "run"
    _copy(runs["single"], run / "checkpoints")
    log_path = tmp_path / "log.txt"
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yml"),
           *DEEP, f"data.path={corpus}", f"log.dir={run}", "train.steps=200", "checkpoint.interval=1",
           f"checkpoint.async_save={str(background).lower()}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
        # limit the process once it trains (DeepSpeed may compile an op at start-up, which needs the disk)
        while "TokenFormer:" not in log_path.read_text() and proc.poll() is None:
            time.sleep(0.01)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (200_000, 200_000))
        proc.wait(timeout=600)
    text = log_path.read_text()
    assert proc.returncode == 2, text[-3000:]
    failed = re.search(r"could not write checkpoint \S*(step_\d+)", text)
    assert failed and "Traceback" not in text, text[-3000:]
    good = newest_good(run / "checkpoints")
    assert good is not None and good < failed.group(1) and verify(run / "checkpoints" / good) is None
    assert not (run / "checkpoints" / failed.group(1)).exists()


def test_mismatched_config_names_the_fields(corpus, runs, tmp_path):
    run = tmp_path / "run"
    _copy(runs["single"], run / "checkpoints")
    out = launch(DEEP + [f"data.path={corpus}", f"log.dir={run}", "train.steps=4", "model.ffn_tokens=256"],
                 launcher="python", check=False)
    assert out.returncode == 2
    assert "model.ffn_tokens: checkpoint 128 vs config 256" in out.stderr and "expand_params.py" in out.stderr


def test_checkpoint_from_another_tokenizer_is_refused(corpus, runs, tmp_path):
    from megatron_tokenformer.data.prepare import prepare

    other = prepare(tmp_path / "other", [str(corpus / "raw")], vocab_size=500, num_proc=1, log=lambda *a: None)
    run = tmp_path / "run"
    _copy(runs["single"], run / "checkpoints")
    out = launch(DEEP + [f"data.path={other.path}", f"log.dir={run}", "train.steps=4"], launcher="python",
                 check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    # one line naming both tokenizers (where each is and its hash, computed here from the files) and the fix
    from megatron_tokenformer.fileio import sha256_file

    step = run / "checkpoints" / newest_good(run / "checkpoints")
    ckpt_tok = checkpoint_tokenizer(run / "checkpoints").path
    (line,) = [ln for ln in out.stderr.splitlines() if "another tokenizer" in ln]
    for named in (str(step), str(ckpt_tok), sha256_file(ckpt_tok)[:12], f"data.path={other.path}",
                  sha256_file(Path(other.path) / "tokenizer.model")[:12], "point data.path", "new checkpoint.dir"):
        assert named in line, (named, line)
    assert sha256_file(ckpt_tok) != sha256_file(Path(other.path) / "tokenizer.model")
