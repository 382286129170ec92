"""launch/pretrain.py with test hooks installed first (tests only; the library has no test switches).

helpers.launch(..., hooks={...}) runs this script instead of launch/pretrain.py, under any launcher, and
passes the hooks as JSON in the environment variable HOOKS_ENV, so every rank installs the same ones:

- "fp16": true|false    DeepSpeed's CPU accelerator reports fp16 as supported (or not). torch computes fp16
                        on any CPU (slowly); only the accelerator's check (native avx512_fp16/AMX-FP16)
                        refuses it. false: the user-facing refusal, on a CPU that has fp16.
- "spikes": [N, ...]    the loss train.spike_factor judges at these steps is 1000 times larger, as a real
                        loss spike would be. Each rank scales its local loss before the data-parallel mean,
                        so the judged (and logged) value is scaled; the update itself is untouched.
- "record_batches": DIR every rank writes the micro-batches it trains on as
                        step{N}_dp{R}_tp{T}_pp{P}.npy, shape (micro-batches, micro_batch_size, seq_length + 1).
- "data_delay_ms": MS   every rank sleeps MS milliseconds after reading each step's batches (counted
                        in the step's data time).
- "write_delay": S      a checkpoint writer sleeps S seconds before each file it writes, so that a test can
                        act while a write is in flight.
"""
import json
import os
import runpy
import sys
import time
from pathlib import Path

HOOKS_ENV = "TOKENFORMER_TEST_HOOKS"
ROOT = Path(__file__).resolve().parent.parent


def fp16_on_cpu(supported: bool = True) -> None:
    """What DeepSpeed's CPU accelerator answers when asked whether it runs fp16, whatever this CPU has."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: supported


def inject_spikes(steps: set[int]) -> None:
    from megatron_tokenformer.training import Trainer

    judge = Trainer._judge

    def _judge(self, local_loss: float) -> bool:
        return judge(self, local_loss * 1000.0 if self.step + 1 in steps else local_loss)

    Trainer._judge = _judge


def after_reading(action) -> None:
    """action(trainer, step, micros) runs on every rank right after it has read a step's batches (inside
    the step's data time)."""
    from megatron_tokenformer.training import Trainer

    train_step = Trainer.train_step

    def hooked_train_step(self) -> None:
        batches, step = self.batches, self.step + 1
        next_step = batches.next_step

        def reading():
            micros = next_step()
            action(self, step, micros)
            return micros

        batches.next_step = reading  # this step only: the instance attribute hides the method
        try:
            train_step(self)
        finally:
            del batches.next_step

    Trainer.train_step = hooked_train_step


def record_batches(out: Path) -> None:
    import numpy as np
    import torch

    def record(trainer, step, micros):
        g = trainer.grid
        np.save(out / f"step{step}_dp{g.dp_rank}_tp{g.tp_rank}_pp{g.pp_rank}.npy", torch.stack(micros).numpy())

    after_reading(record)


def delay_data(ms: float) -> None:
    after_reading(lambda trainer, step, micros: time.sleep(ms / 1e3))


def delay_writes(seconds: float) -> None:
    from megatron_tokenformer.checkpoint import save_load

    def slowed(write):
        def slow(*args, **kwargs):
            time.sleep(seconds)
            return write(*args, **kwargs)
        return slow

    # save_load._write writes every file of a rank's part through these two
    save_load.write_piece = slowed(save_load.write_piece)
    save_load.save_safetensors = slowed(save_load.save_safetensors)


def install(hooks: dict) -> None:
    if "fp16" in hooks:
        fp16_on_cpu(bool(hooks["fp16"]))
    if hooks.get("spikes"):
        inject_spikes(set(hooks["spikes"]))
    if hooks.get("record_batches"):
        record_batches(Path(hooks["record_batches"]))
    if hooks.get("data_delay_ms"):
        delay_data(float(hooks["data_delay_ms"]))
    if hooks.get("write_delay"):
        delay_writes(float(hooks["write_delay"]))


if __name__ == "__main__":
    script = ROOT / "launch" / "pretrain.py"
    # launch/pretrain.py names the CPU accelerator for DeepSpeed before anything imports it; do the same
    # here, since installing the hooks imports DeepSpeed first.
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    install(json.loads(os.environ.get(HOOKS_ENV, "{}")))
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
