"""Blended data (data.blend): the order's properties, its config, and training on two real corpora."""
from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import torch

from helpers import SMALL, launch, metrics
from megatron_tokenformer.config import ConfigError, config_from_dict, describe, load_config
from megatron_tokenformer.data import DataError, load_data, valid_batches
from megatron_tokenformer.data.prepare import prepare
from megatron_tokenformer.data.blend import (BLOCK, BlendedBatches, BlendedSamples, BlendedValid, BlendOrder,
                                             greedy_sources)

WEIGHT_SETS = [[0.7, 0.3], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [1, 1, 1], [0.02, 0.98], [3, 0, 1]]


# ---- the order ---------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_every_window_of_1000_or_more_has_the_weights_shares(weights):
    """Every window (all start positions, across block boundaries) is within 1% of the weights."""
    w = np.asarray(weights, float) / sum(weights)
    src, _ = BlendOrder(weights).locate(np.arange(3 * BLOCK))
    for i, wi in enumerate(w):
        c = np.concatenate([[0], np.cumsum(src == i)])
        for size in (1000, 1001, 3333, 20000, 2 * BLOCK):
            share = (c[size:] - c[:-size]) / size
            assert np.abs(share - wi).max() <= 0.01, (weights, i, size, np.abs(share - wi).max())
    # and the long run is the weights to within the block's rounding
    assert np.abs(np.bincount(src, minlength=len(w)) / len(src) - w).max() < 1 / BLOCK


def test_locate_is_the_greedy_repeated_and_position_inverts_it():
    weights, block = [0.5, 0.3, 0.2], 1000  # a small block: many block boundaries
    order = BlendOrder(weights, block=block)
    positions = np.arange(5 * block + 123)
    src, draw = order.locate(positions)
    assert np.array_equal(src, np.tile(greedy_sources(weights, block), 6)[:len(positions)])
    for i in range(3):  # a source's draws are numbered 0, 1, 2, ... in position order
        assert np.array_equal(draw[src == i], np.arange((src == i).sum()))
    for p in (0, 1, 999, 1000, 4321, len(positions) - 1):
        assert order.position(int(src[p]), int(draw[p])) == p
        assert np.array_equal(order.counts(p), np.bincount(src[:p], minlength=3))
    # Megatron's rule: at each position the chosen source lagged its weight most
    counts = np.zeros(3)
    for s in range(300):
        lag = np.asarray(weights) * (s + 1) - counts
        assert lag[src[s]] == lag.max()
        counts[src[s]] += 1


class FakeSet:
    """A split of `n` samples whose sample k is [tag, k]: batches show where each sample came from."""

    stored = False  # read in shuffled order, as a SampleSet of data.order=shuffled

    def __init__(self, n: int, tag: int):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        assert 0 <= k < self.n
        return np.array([self.tag, k])


def fake_blend(sizes=(50, 7), weights=(0.7, 0.3), paths=("data/a", "data/b")):
    return BlendedSamples([FakeSet(n, t) for t, n in enumerate(sizes)], list(paths), list(weights))


def batches(blend, seed=1, consumed=0, rank=0, dp=1):
    return BlendedBatches(blend, seed, global_batch_size=12, micro_batch_size=3, dp_rank=rank, dp_size=dp,
                          consumed_samples=consumed)


def steps(b, n):
    """The whole global batch of n steps as (source, sample) rows, in position order."""
    return np.concatenate([torch.cat(b.next_step()).numpy() for _ in range(n)])


def test_deterministic_from_the_seed_and_resumes_from_the_position():
    blend = fake_blend()
    a = steps(batches(blend), 10)
    assert np.array_equal(a, steps(batches(fake_blend()), 10))
    other = steps(batches(blend, seed=2), 10)
    assert np.array_equal(a[:, 0], other[:, 0]) and not np.array_equal(a, other)  # same sources, other samples
    for k in (1, 4, 7):  # resumed at any step: the same continuation
        assert np.array_equal(steps(batches(fake_blend(), consumed=12 * k), 10 - k), a[12 * k:])
    # data parallel: the ranks' micro-batches interleave into the single-rank order
    ranks = [batches(blend, rank=r, dp=2).next_step() for r in range(2)]
    together = np.concatenate([m.numpy() for pair in zip(*ranks) for m in pair])
    assert np.array_equal(together, a[:12])


def test_a_source_that_runs_out_repeats_by_epochs_and_says_so():
    blend = fake_blend(sizes=(50, 7))
    b = batches(blend)
    rows, notes = [], []
    for _ in range(10):
        rows.append(torch.cat(b.next_step()).numpy())
        notes += b.notes()
    rows = np.concatenate(rows)
    small = rows[rows[:, 0] == 1, 1]  # source b: 7 samples, 36 draws in 120 positions
    epochs = [small[i:i + 7] for i in range(0, len(small) - 6, 7)]
    assert len(epochs) == 5 and all(sorted(e) == list(range(7)) for e in epochs)  # each sample once an epoch
    assert len({tuple(e) for e in epochs}) > 1  # a new shuffle each epoch
    expected = []  # every source epoch from the 2nd: where its first sample was drawn
    for src, n, name in ((0, 50, "data/a"), (1, 7, "data/b")):
        draws = np.cumsum(rows[:, 0] == src) - 1  # the draw number at each position of this source
        expected += [(p, f"data: source {name} starts epoch {draws[p] // n + 1} at sample {p}")
                     for p in range(len(rows)) if rows[p, 0] == src and draws[p] % n == 0 and draws[p] > 0]
    assert notes == [text for _, text in sorted(expected)] and len(notes) == 6  # a once, b five times
    assert b.epoch_starts(0, 120)[0] == (1, 2, sorted(expected)[0][0])
    shares = b.log_values()
    assert shares == {"data_share/a": (rows[:, 0] == 0).mean(), "data_share/b": (rows[:, 0] == 1).mean()}
    assert abs(shares["data_share/a"] - 0.7) < 0.02


def test_validation_interleaves_each_tail_without_repeats():
    valid = BlendedValid(fake_blend(sizes=(40, 9)))
    assert len(valid) == 30  # source b's 9 samples at weight 0.3 last 30 positions
    rows = np.concatenate([m.numpy() for m in valid_batches(valid, 3, 0, 1)])
    assert len(rows) == 30 and len({tuple(r) for r in rows}) == 30
    assert [k for s, k in rows if s == 1] == list(range(9))  # each tail in order, from its start


# ---- config --------------------------------------------------------------------------------------
def test_blend_config(tmp_path):
    f = tmp_path / "blend.yml"
    f.write_text("data:\n  blend:\n    - {path: data/a, weight: 0.7}\n    - {path: data/b, weight: 0.3, "
                 "prepare: make b}\n")
    cfg = load_config(f)
    assert [(s.path, s.weight, s.prepare) for s in cfg.data.blend] == [("data/a", 0.7, None), ("data/b", 0.3, "make b")]
    assert config_from_dict(cfg.to_dict()) == cfg  # stored in checkpoints and read back
    cli = load_config(None, ["data.blend=[{path: data/a, weight: 2}, {path: data/b, weight: 1}]"])
    assert [s.weight for s in cli.data.blend] == [2.0, 1.0]
    assert load_config(None, ["data.blend=null"]).data.blend == []
    assert "data.blend[].weight" in describe()
    for blend, msg in (("[{path: a, weight: -1}]", r"data.blend\[0\].weight=-1.0 must be a number >= 0"),
                       ("[{path: a, weight: 0}, {path: b, weight: 0}]", "weights sum to 0"),
                       ("[{path: a, weight: 1}, {weight: 1}]", r"data.blend\[1\] .*lacks path"),
                       ("[{path: a}]", r"data.blend\[0\] .*lacks weight"),
                       ("[{path: a, weight: 1, wieght: 2}]", r"unknown key 'wieght' in data.blend\[0\]"),
                       ("[{path: a, weight: x}]", r"data.blend\[0\].weight='x' is not a number"),
                       ("[{path: a, weight: 1}, {path: a, weight: 1}]", r"data.blend\[1\].path=a repeats"),
                       ("data/a", "must be a list of sources like")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [f"data.blend={blend}"])


# ---- real corpora ----------------------------------------------------------------------------------
def _text(modules: list[str]) -> str:
    """Real English: the docstrings of some stdlib modules and their public members."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        parts += [inspect.getdoc(o) or "" for a, o in sorted(vars(module).items())
                  if not a.startswith("_") and getattr(o, "__module__", None) == name]
    return "\n\n".join(p for p in parts if p)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three prepared corpora: a (its own tokenizer), b (other text, a's tokenizer; small, so it runs
    out within a few steps), c (b's text with a tokenizer of its own)."""
    root = tmp_path_factory.mktemp("blend")
    texts = {"a": _text(["argparse", "json", "collections", "functools", "logging", "subprocess"]),
             "b": _text(["textwrap"])[:1400]}
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text)
    quiet = lambda _msg: None  # noqa: E731
    prepare(root / "a", [str(root / "a.txt")], vocab_size=512, num_proc=1, log=quiet)
    prepare(root / "b", [str(root / "b.txt")], tokenizer=root / "a" / "tokenizer.model", num_proc=1, log=quiet)
    prepare(root / "c", [str(root / "b.txt")], vocab_size=400, num_proc=1, log=quiet)
    return root


def test_sources_are_checked(corpora):
    a, c, x = corpora / "a", corpora / "c", corpora / "x"
    cfg = load_config(None, [f"data.blend=[{{path: {a}, weight: 1}}, {{path: {c}, weight: 1}}]"])
    with pytest.raises(DataError, match=f"data.blend\\[1\\].path={c} and data.blend\\[0\\].path={a} were "
                                        "prepared with different tokenizers"):
        load_data(cfg.data, 64)
    cfg = load_config(None, [f"data.blend=[{{path: {a}, weight: 1}}, {{path: {x}, weight: 1}}]"])
    with pytest.raises(DataError, match=r"config key data.blend\[1\].path\) does not exist"):
        load_data(cfg.data, 64)


@pytest.mark.slow
def test_blended_training_logs_shares_and_resumes_exactly(corpora, tmp_path):
    blend = f"data.blend=[{{path: {corpora / 'a'}, weight: 0.7}}, {{path: {corpora / 'b'}, weight: 0.3}}]"
    common = SMALL + [blend, "train.decay_steps=8", "train.warmup_steps=2", "eval.interval=4", "eval.steps=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = launch(common + [f"log.dir={straight}", "train.steps=8", "log.wandb_mode=offline",
                           "log.wandb_project=tests"], launcher="python")
    launch(common + [f"log.dir={resumed}", "train.steps=4"], launcher="python")
    out_resumed = launch(common + [f"log.dir={resumed}", "train.steps=8"], launcher="python")
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "samples", "data_share/a", "data_share/b", "valid_loss"):
            assert ra.get(key) == rb.get(key), (key, ra, rb)
    assert "valid_loss" in a[3] and "valid_loss" in a[7]
    last = a[-1]
    assert last["data_share/a"] + last["data_share/b"] == pytest.approx(1.0)
    assert abs(last["data_share/b"] - 0.3) <= 1 / 64  # 64 samples: within one sample of the weight
    # source b (a few samples) ran out and started over, said once on the logging rank
    b_train = len(load_data(load_config(None, [blend]).data, 64)[1].sets[1])
    assert b_train < 0.3 * 64 - 1, "the test corpus b should run out in 8 steps"
    notes = [line for line in out.stdout.splitlines() if line.startswith("data: source")]
    assert notes and notes[0].startswith(f"data: source {corpora / 'b'} starts epoch 2 at sample ")
    assert set(notes) >= {n for n in out_resumed.stdout.splitlines() if n.startswith("data: source")}
    # the shares reach W&B too
    from wandb_records import history as wandb_history
    (wandb_file,) = straight.glob("wandb/offline-run-*/run-*.wandb")
    hist = [h for h in wandb_history(wandb_file) if "loss" in h]
    assert [h["data_share/b"] for h in hist] == [r["data_share/b"] for r in a]


@pytest.mark.slow
def test_blend_with_another_tokenizer_is_refused(corpora, tmp_path):
    blend = f"data.blend=[{{path: {corpora / 'a'}, weight: 0.5}}, {{path: {corpora / 'c'}, weight: 0.5}}]"
    proc = launch(SMALL + [blend, f"log.dir={tmp_path / 'run'}"], launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "different tokenizers" in ln]
    assert str(corpora / "a") in line and str(corpora / "c") in line
    assert not (tmp_path / "run" / "checkpoints").exists()
