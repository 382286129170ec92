"""Loss spikes (train.spike_factor): a step whose loss is far above the running mean has its update
skipped and is logged, the run goes on, resume stays exact; spikes in a row stop the run. The spikes
are injected by a test hook (tests/hooked_pretrain.py) that scales the judged loss of chosen steps
1000 times (that the update itself is left bit-identical is tested on the engines in
test_deepspeed_adapter.py)."""
import shutil

import pytest

from helpers import SMALL, launch, losses, metrics
from megatron_tokenformer.checkpoint import newest_good, read_meta

pytestmark = pytest.mark.slow  # every test here starts training processes or several ranks

RUN = SMALL + ["train.steps=10", "train.spike_factor=3", "train.spike_window=3", "train.warmup_steps=2",
               "checkpoint.interval=1", "checkpoint.keep_last=0"]
SPIKE = {"spikes": [6]}  # tests/hooked_pretrain.py


def test_a_spike_is_skipped_logged_and_resume_is_exact(corpus, tmp_path):
    run = tmp_path / "straight"
    out = launch(RUN + [f"data.path={corpus}", f"log.dir={run}"], launcher="python", hooks=SPIKE)
    rows = {r["step"]: r for r in metrics(run)}
    assert sorted(rows) == list(range(1, 11))  # the run went on
    spike = rows[6]
    assert spike["spike_loss"] == spike["loss"] > 100 * spike["spike_mean"]
    assert "step 6: loss" in out.stdout and "update skipped (1 in a row)" in out.stdout
    assert not any("spike_loss" in r for s, r in rows.items() if s != 6)
    assert rows[7]["lr"] == rows[6]["lr"] and rows[7]["skipped_steps"] == 1  # the LR schedule did not move
    ckpt = run / "checkpoints"
    assert not (ckpt / "step_00000006").exists()  # nothing is saved from inside a run of skipped steps
    before, after = read_meta(ckpt, "step_00000005"), read_meta(ckpt, "step_00000007")
    assert after["optimizer_step"] == before["optimizer_step"] + 1  # 2 steps, 1 update
    assert after["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] + 1
    # the mean of the accepted losses (the warm-up's plain mean, then weight 1/3), the spike left out
    m = 0.0
    for c, s in enumerate([1, 2, 3, 4, 5, 7], start=1):
        m += (rows[s]["loss"] - m) / min(c, 3)
    assert after["loss_mean"] == {"mean": m, "count": 6}
    assert spike["spike_mean"] == before["loss_mean"]["mean"]

    # Resumed from step 4 (before the spike, with 4 losses in the mean): the same spike, the same losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt / "step_00000004", resumed / "checkpoints" / "step_00000004")
    launch(RUN + [f"data.path={corpus}", f"log.dir={resumed}"], launcher="python", hooks=SPIKE)
    got = {r["step"]: r for r in metrics(resumed)}
    assert sorted(got) == list(range(5, 11)) and "spike_loss" in got[6]
    assert losses(resumed) == {s: v for s, v in losses(run).items() if s > 4}  # bit for bit
    assert read_meta(resumed / "checkpoints", "step_00000010")["loss_mean"] == read_meta(ckpt, "step_00000010")["loss_mean"]


def test_spikes_in_a_row_stop_the_run(corpus, tmp_path):
    """train.max_skipped_steps spikes in a row stop it with the newest checkpoint (here written in the
    background, and completed before the run stops) from before them."""
    run = tmp_path / "run"
    proc = launch(RUN + [f"data.path={corpus}", f"log.dir={run}", "train.max_skipped_steps=3",
                         "checkpoint.async_save=true"], launcher="python", check=False,
                  hooks={"spikes": [5, 6, 7]})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "3 consecutive steps (up to step 7) were skipped, 3 of them for a loss above train.spike_factor=3" \
        in proc.stderr and "Traceback" not in proc.stderr
    assert "step_00000004" in proc.stderr and newest_good(run / "checkpoints") == "step_00000004"
    assert [r["step"] for r in metrics(run) if "spike_loss" in r] == [5, 6, 7]
