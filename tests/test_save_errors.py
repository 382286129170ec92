"""A checkpoint write that fails (a full disk, a directory this user may not write) stops the run with
one line naming the checkpoint and the fix, and the previous checkpoint stays whole and loadable
(README: "A failed write (disk full, permissions) stops the run with the reason and leaves the
previous checkpoint as it was").

The errors are injected, not provoked: CI may run as root (chmod stops nothing) and no test may fill a
disk. A small wrapper script, written here, patches the one call where each failure happens for real
(safetensors' file writer for a full disk, the staging directory's mkdir for a denied permission) to
raise the OSError the kernel would, then runs launch/pretrain.py unchanged. Everything above that call
(the save, the background writer, the training loop, the CLI) is the real code. The file-size limit
(EFBIG) is tested with a real RLIMIT_FSIZE in test_checkpoint.py.
"""
import errno
import subprocess
import sys

import pytest

from helpers import ROOT, SMALL, env, metrics
from megatron_tokenformer import load_model
from megatron_tokenformer.checkpoint import newest_good, verify

FAILING = "step_00000004"  # step 2 is saved, the save of step 4 fails

WRAPPER = '''
import errno, os, pathlib, runpy, sys

FAILING, KIND = sys.argv[1], sys.argv[2]
if KIND == "full":  # the disk fills up while a layer file is being written: a part of it lands
    import safetensors.torch as st

    real_save = st.save_file

    def save_file(tensors, filename, metadata=None):
        if FAILING in str(filename):
            pathlib.Path(filename).write_bytes(b"\\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save(tensors, filename, metadata=metadata)

    st.save_file = save_file
else:  # the checkpoint directory became read-only for this user: its new entries cannot be made
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if FAILING in os.fspath(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    os.mkdir = mkdir
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind,background", [("full", True), ("denied", False)])
def test_failed_checkpoint_write_stops_the_run_and_keeps_the_previous(corpus, tmp_path, kind, background):
    """A full disk during a background save (the error comes from the writer thread, reported at the
    next wait) and a denied directory during a direct save."""
    wrapper = tmp_path / "inject.py"
    wrapper.write_text(WRAPPER)
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    cmd = [sys.executable, str(wrapper), FAILING, kind, str(ROOT / "launch" / "pretrain.py"),
           "--config", str(ROOT / "configs" / "tiny.yml"), *SMALL, f"data.path={corpus}", f"log.dir={run}",
           "train.steps=5", "checkpoint.interval=2", "checkpoint.keep_last=0",
           f"checkpoint.async_save={str(background).lower()}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    # one line: the checkpoint, the kernel's reason with the file, the fix for this failure, what to run
    (line,) = [ln for ln in out.stderr.splitlines() if "could not write checkpoint" in ln]
    assert line.startswith(f"error: could not write checkpoint {ckpt / FAILING}: "), line
    if kind == "full":
        assert f"[Errno {errno.ENOSPC}] No space left on device" in line and ".safetensors" in line, line
        assert "the disk is full" in line and "point checkpoint.dir at a disk with room" in line, line
    else:
        assert f"[Errno {errno.EACCES}] Permission denied: '{ckpt / FAILING}.partial'" in line, line
        assert "fix the directory's permissions" in line and "point checkpoint.dir elsewhere" in line, line
    assert f"The previous checkpoint in {ckpt} is untouched" in line and "rerun to resume from it" in line
    # the run stopped at the failed save: a direct save at once, a background one at the next wait (the
    # run's last step, 5, waits for it before its own save); nothing of step 4 is taken for a checkpoint
    assert max(r["step"] for r in metrics(run)) == (5 if background else 4)
    assert not (ckpt / FAILING).exists() and newest_good(ckpt) == "step_00000002"
    assert verify(ckpt / "step_00000002") is None
    model, cfg = load_model(ckpt)  # the previous checkpoint loads
    assert cfg.train.steps == 5 and sum(p.numel() for p in model.parameters()) > 0
