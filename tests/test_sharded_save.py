"""Sharded saves (checkpoint format 3): every data-parallel rank writes its own piece of each layer,
the pieces tile every parameter, and the checkpoint resumes at other layouts as before. A format 2
checkpoint (whole tensor shards, one file per layer and tensor rank) still resumes."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from helpers import launch, losses
from megatron_tokenformer.checkpoint import global_state, read_meta, write_manifest
from megatron_tokenformer.checkpoint.files import save_safetensors
from test_reshard import MODEL, _assert_states_close

pytestmark = pytest.mark.slow  # every test here starts training processes or several ranks

LAYERS = 4 + 2  # embedding, 4 blocks, final norm


def _pieces(step_dir, layer):
    return sorted(step_dir.glob(f"layer_{layer:03d}-tp*.safetensors"))


@pytest.fixture(scope="module", params=[0, 1])
def dp2(request, corpus, tmp_path_factory):
    """3 steps at DP=2 with ZeRO-`param`, saving after every step."""
    run = tmp_path_factory.mktemp(f"dp2_zero{request.param}")
    launch(MODEL + [f"data.path={corpus}", f"log.dir={run}", f"parallel.zero_stage={request.param}"], nproc=2)
    return run


def test_each_data_parallel_rank_writes_its_piece(dp2):
    step = dp2 / "checkpoints" / "step_00000002"
    for layer in range(LAYERS):
        files = _pieces(step, layer)
        assert [f.name for f in files] == [f"layer_{layer:03d}-tp00-dp0{d}.safetensors" for d in (0, 1)]
        opened = [safe_open(str(f), framework="pt") for f in files]
        shapes = json.loads(opened[0].metadata()["shape"])
        held = {name: [] for name in shapes}  # (offset, length) of each piece's range, per parameter
        for f in opened:
            assert json.loads(f.metadata()["shape"]) == shapes  # every piece describes the whole layer
            offsets = json.loads(f.metadata()["offset"])
            for key in f.keys():
                t = f.get_tensor(key)
                name = key.split("/")[-1]
                assert t.dim() == 1 and t.dtype == torch.float32
                if "/" not in key:
                    held[name].append((offsets[name], t.numel()))
                else:  # a moment covers the same range as its weight
                    assert t.numel() == f.get_tensor(name).numel()
        for name, ranges in held.items():  # the pieces tile the parameter: every value exactly once
            end = 0
            for start, n in sorted(ranges):
                assert start == end, (name, ranges)
                end = start + n
            assert end == torch.Size(shapes[name]).numel(), name
    sizes = [sum(f.stat().st_size for f in step.glob(f"layer_*-dp0{d}.safetensors")) for d in (0, 1)]
    assert max(sizes) < 0.6 * sum(sizes), sizes  # each rank wrote about half, not a gathered copy


@pytest.mark.parametrize("target", ["dp1", "tp2", "dp2"])
def test_dp2_save_resumes_at_dp1_tp2_and_its_own_layout(corpus, dp2, target, tmp_path):
    zero = read_meta(dp2 / "checkpoints", "step_00000002")["layout"]["zero_stage"]
    over, nproc = {"dp1": (["parallel.zero_stage=0"], 1), "tp2": (["parallel.tensor=2", "parallel.zero_stage=1"], 2),
                   "dp2": ([f"parallel.zero_stage={zero}"], 2)}[target]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(dp2 / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    out = launch(MODEL + [f"data.path={corpus}", f"log.dir={run}", *over], nproc=nproc)
    assert "resumed from" in out.stdout + out.stderr
    got, want = losses(run), losses(dp2)
    assert list(got) == [3]
    if target == "dp2":  # the layout that wrote it continues bit-exactly
        assert got[3] == want[3]
    else:
        assert abs(got[3] - want[3]) < 1e-5, (target, got[3], want[3])
    _assert_states_close(run / "checkpoints" / "step_00000003", dp2 / "checkpoints" / "step_00000003")


def _as_format_2(src, dst):
    """Rewrite a checkpoint the way format 2 stored it: one file per layer and tensor rank, whole shards."""
    state, moments, meta = global_state(src, moments=True)
    dst.mkdir(parents=True)
    for f in src.glob("rng-*.safetensors"):
        shutil.copy(f, dst / f.name)
    dims, T = meta.pop("partition_dims"), meta["layout"]["tensor"]
    for layer in range(LAYERS):
        with safe_open(str(_pieces(src, layer)[0]), framework="pt") as f:
            names, taus = list(json.loads(f.metadata()["shape"])), json.loads(f.metadata()["extra_state"])
        for tp in range(T):
            tensors = {}
            for prefix, values in (("", state), *((f"{k}/", m) for k, m in moments.items())):
                for name in names:
                    t = values[name]
                    tensors[prefix + name] = (t if dims[name] is None else t.chunk(T, dims[name])[tp]).contiguous()
            layer_dims = json.dumps({n: dims[n] for n in names})
            save_safetensors(tensors, dst / f"layer_{layer:03d}-tp{tp:02d}.safetensors",
                             {"partition_dim": layer_dims, "extra_state": json.dumps(taus)})
    (dst / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    write_manifest(dst)


def test_a_format_2_checkpoint_still_resumes(corpus, dp2, tmp_path):
    """The same state stored as format 2 and as format 3 resumes to the same loss, bit-exactly."""
    runs = {}
    for name in ("v2", "v3"):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        src = dp2 / "checkpoints" / "step_00000002"
        if name == "v2":
            _as_format_2(src, run / "checkpoints" / "step_00000002")
            assert not list((run / "checkpoints" / "step_00000002").glob("*-dp*"))
        else:
            shutil.copytree(src, run / "checkpoints" / "step_00000002")
        launch(MODEL + [f"data.path={corpus}", f"log.dir={run}", "parallel.zero_stage=0"], launcher="python")
        runs[name] = losses(run)
    assert list(runs["v2"]) == [3] and runs["v2"] == runs["v3"]
    assert read_meta(tmp_path / "v2" / "checkpoints", "step_00000003")["format_version"] == 3  # saved as 3
