"""Launch real training processes (plain python, torchrun, the deepspeed launcher) for tests; real text."""
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from hooked_pretrain import HOOKS_ENV
from megatron_tokenformer.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent

# A small model on the real corpus: fast on 2 CPU cores, big enough to learn.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.qkv_tokens=64",
         "model.proj_tokens=64", "model.ffn_tokens=128", "model.seq_length=64", "train.micro_batch_size=4",
         "train.global_batch_size=8", "log.interval=1", "log.progress=false", "eval.interval=0",
         "log.wandb_mode=disabled", "checkpoint.interval=0"]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (torchrun starts its ranks in sessions of their own,
    so a process group is not enough; a rank left alive would keep the output pipes open)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def launch(overrides, nproc: int = 1, launcher: str = "torchrun", check: bool = True, timeout: int = 600,
           extra_env: dict | None = None, hooks: dict | None = None):
    """Run launch/pretrain.py (tests/hooked_pretrain.py with `hooks`: see there) under `launcher`. A run
    still going after `timeout` seconds is killed with every process it started, and the test fails
    naming the command; so does a pytest-timeout interrupt."""
    script = str(ROOT / ("tests/hooked_pretrain.py" if hooks else "launch/pretrain.py"))
    args = ["--config", str(ROOT / "configs" / "tiny.yml"), *overrides]
    if nproc == 1 and launcher == "python":
        cmd = [sys.executable, script, *args]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), script, *args]
    run_env = {**env(), **(extra_env or {})}
    if hooks:
        run_env[HOOKS_ENV] = json.dumps(hooks)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"hung: still running after {timeout} s, killed with its children: {' '.join(cmd)}\n"
                             f"{stdout[-4000:]}\n{stderr[-6000:]}") from None
    except BaseException:  # pytest-timeout's interrupt, Ctrl-C: leave no training process behind
        kill_tree(proc.pid)
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-6000:]}")
    return result


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


DOC_MODULES = ["argparse", "textwrap", "json", "collections", "functools", "itertools", "logging", "dataclasses",
               "inspect", "shutil", "random", "statistics", "subprocess", "pathlib"]


def stdlib_documents(modules: list[str] = DOC_MODULES) -> list[str]:
    """Real English documents that need no network: the docstrings of standard-library modules, one per
    public function or class."""
    out = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if getattr(obj, "__module__", None) == name else None
            if doc and not attr.startswith("_") and len(doc) > 40:
                out.append(f"{attr}\n\n{doc}\n")
    return out
