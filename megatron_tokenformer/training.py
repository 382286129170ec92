"""The pretraining loop: build, then for each step (maybe grow, step, log, evaluate, save)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import torch
import yaml

from . import distributed as D
from . import observe
from .checkpoint import save_load
from .checkpoint.files import read_meta
from .config import Config, padded_vocab_size, validate
from .data import load_data, train_batches, valid_batches
from .engine import (build_engine, check_precision, deepspeed_config, speed_choices, step_functions,
                     unknown_deepspeed_keys)
from .errors import UserError
from .evaluation.live import TaskEvaluator
from .fileio import LockError, RunLock
from .growth.controller import GrowthController
from .model import TokenFormerModel, count_parameters, model_flops_per_token
from .monitor import Monitor, report_finished
from .pipeline import global_name
from .preemption import StopRequests
from .seeding import seed_dropout


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); the message says why and what to do."""


def pretrain(cfg: Config) -> dict:
    """Train as the config says; returns the last logged metrics (on every rank)."""
    t = Trainer(cfg)
    if t.finished is not None:  # launched again after its last step: reported, nothing built
        return t.finished
    while t.step < cfg.train.steps:
        if t.growth.due(t.step):
            t.grow()
        t.train_step()
        t.evaluate_if_due()
        t.evaluate_tasks_if_due()  # eval.tasks: zero-shot tasks on the live model (evaluation/live.py)
        t.log()  # this step's training and validation metrics, one row; stops a run of non-finite steps
        t.save_if_due()
        if t.stop_requested():  # a signal or train.exit_after_minutes: saved, exit 0
            break
    return t.finish()


class Trainer:
    """One run's state: the processes, the data, the engine at its current size, the counters."""

    def __init__(self, cfg: Config):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed's pipeline engine backpropagates through a broadcast of the tied embedding; harmless.
        warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
        self.cfg = cfg
        rank, world = D.init_distributed()
        validate(cfg, world)
        check_precision(cfg)
        self.grid = D.Grid(rank, world, cfg.parallel.tensor, cfg.parallel.pipeline)
        self.ps = D.ParallelState.build(self.grid)
        self.dev = D.device()
        self.steps = step_functions(cfg)
        self.stops = StopRequests(cfg.train.exit_after_minutes, self.dev)

        # data.path, or the data.blend sources (self.data: the first one's metadata, shared tokenizer).
        self.data, train_set, self.valid_set = load_data(cfg.data, cfg.model.seq_length)
        # The checkpoint to resume (rank 0 verifies the manifests), checked before anything is built.
        resume = D.broadcast_object(save_load.find_resume(cfg) if rank == 0 else None)
        meta = D.broadcast_object(read_meta(*resume) if rank == 0 and resume else None)
        # A finished run (its checkpoint at train.steps or beyond) says so and what it ended with, and
        # builds nothing: no engine, no W&B run, no files rewritten. `finished`: its last logged row.
        self.finished = None
        if resume and meta["step"] >= cfg.train.steps:
            self.finished = D.broadcast_object(report_finished(cfg, resume[0] / resume[1], meta) if rank == 0
                                               else None)
            self.stops.restore()
            D.shutdown()
            return
        self.growth = GrowthController(cfg, meta)  # the model size (growth stage) and LR segment
        self.tasks = TaskEvaluator(cfg, self.data.tokenizer_path)  # checks eval.tasks' files before any work
        if resume:
            save_load.check_loadable(meta, cfg, self.growth.run.model, resume[0] / resume[1],
                                     self.data.tokenizer_sha256)
        # A resumed run keeps the checkpoint's vocab rows (the padding may differ at another tensor size).
        self.vocab = meta["vocab_size"] if resume else padded_vocab_size(cfg, self.data.vocab_size)
        # One run per directory, taken once the inputs are known good and before anything is built or
        # written (rank 0 holds it; every rank stops alike if it cannot).
        self.lock, problem = None, None
        if rank == 0 and cfg.log.lock:
            try:
                self.lock = RunLock(cfg.run_dir)
            except LockError as e:
                problem = str(e)
        problem = D.broadcast_object(problem)
        if problem:
            raise LockError(problem)
        self.engine, partition_text = build_engine(self.growth.run, self.vocab, self.ps, self.growth.schedule)
        seed_dropout(cfg.train.seed, self.grid.dp_rank)
        if resume:
            save_load.load(self.engine, self.growth.run, self.grid, *resume, meta)
        self.step = meta["step"] if resume else 0
        self.growth.start_freeze(self.engine, self.step, self.grid)  # resumed inside a freeze_old_steps window
        self.saved_at = self.step if resume else None  # the step whose checkpoint exists
        self.batches = train_batches(train_set, cfg.train.seed, cfg.train.global_batch_size,
                                     cfg.train.micro_batch_size, self.grid.dp_rank, self.grid.data,
                                     consumed_samples=meta["consumed_samples"] if resume else 0, prefetch=True)

        self.run_info = _run_info(cfg, meta) | {"lineage": self.growth.lineage, "resolved": speed_choices(cfg)}
        if rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (cfg.run_dir / "deepspeed_config.json").write_text(json.dumps(deepspeed_config(cfg, world), indent=1))
            (cfg.run_dir / "run_info.json").write_text(json.dumps(self.run_info, indent=1))
        self.monitor = Monitor(cfg, self.grid.is_logger, self.run_info, self.step)
        self.n_params, self.flops_per_token = _size(self.growth.run, self.vocab)
        # README "Monitoring": the step-time parts (synchronised on CUDA), the optimizer's time and zero
        # gradients measured inside DeepSpeed's model step, the device's peak for mfu.
        self.timer = observe.StepTimer(sync=self.dev.type == "cuda") if cfg.log.step_timers else None
        self.opt_hook = observe.OptimizerHook(self.timer, self.ps, cfg.parallel.pipeline > 1)
        self.opt_hook.install(self.engine)
        self.peak = observe.peak_flops(torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu",
                                       cfg.train.precision, cfg.log.peak_tflops)
        # model FLOPs trained so far (a growth changes FLOPs per token; an older checkpoint: estimated)
        self.flops_done = meta.get("train_flops", meta["consumed_samples"] * cfg.model.seq_length
                                   * self.flops_per_token) if resume else 0.0
        self.window = _Window()
        self.in_trouble = 0  # consecutive skipped steps: a non-finite loss or gradients, or a loss spike
        self.spikes_in_trouble = 0  # how many of those were spikes
        self.loss_mean = RunningMean(cfg.train.spike_window, meta.get("loss_mean") if resume else None)
        self.spike: dict | None = None  # this step's, if it is one: {"spike_loss", "spike_mean"}
        self.judged = math.nan  # the loss _judge saw (averaged over data parallel)
        self.pending: save_load.AsyncSave | None = None  # a checkpoint being written in the background
        self.metrics: dict = {}  # this step's, logged by log()
        self.last: dict = {}  # the last logged row, and the last with validation metrics
        self.last_valid: dict = {}
        self.started = time.perf_counter()
        self.first_step = self.step
        self._announce(world, len(train_set), resume, partition_text)

    def _announce(self, world: int, train_samples: int, resume, partition_text: str | None) -> None:
        g, cfg, say = self.grid, self.cfg, self.monitor.message
        micros = _count(cfg.grad_accum_steps(world), "micro-batch", "es")
        say(f"TokenFormer: {self.n_params / 1e6:.2f}M parameters, vocab {self.vocab}, {world} rank(s) (tensor "
            f"{g.tensor} x pipeline {g.pipeline} x data {g.data}), {micros}/step, "
            f"{train_samples} train samples; "
            + (f"resumed from {resume[0] / resume[1]} at step {self.step}" if resume else "fresh start"))
        chosen = self.run_info["resolved"]
        say(f"Pattention: {chosen['pattention_impl']} (model.pattention_impl={cfg.model.pattention_impl}), "
            f"compiled blocks: {chosen['compile']} (train.compile={cfg.train.compile})")
        if self.growth.lineage:
            say("grown from: " + "; ".join(f"{e['parent_name']} ({e['parent_run']}) at step {e['step']}, "
                                           f"{e['params_before']} -> {e['params_after']} parameters"
                                           for e in self.growth.lineage))
        unused = self.vocab - self.data.vocab_size
        if unused > max(128, self.vocab // 8):  # more than padding: a vocab set for another tokenizer
            say(f"the model has {self.vocab} embedding rows, the tokenizer of {self.data.path} "
                f"{self.data.vocab_size} tokens: {unused} rows stay unused (the first loss is near "
                f"ln({self.vocab})={math.log(self.vocab):.1f}, not ln({self.data.vocab_size}))")
        unknown = unknown_deepspeed_keys(cfg)
        if unknown:  # DeepSpeed would ignore them without a word
            say(f"warning: {', '.join('deepspeed.' + k for k in unknown)}: not a key of DeepSpeed's config; "
                "DeepSpeed ignores it (misspelt?)")
        if partition_text:
            say(partition_text)

    # ---- the parts of a step ----------------------------------------------------------------
    def grow(self) -> None:
        with self.window.paused():
            if self.saved_at != self.step:
                self.save()
            self.wait_for_save()  # growth reads the checkpoint
            engine, self.engine = self.engine, None  # the controller frees it before building the grown one
            self.engine, entry = self.growth.grow(engine, self.step, self.ps, self.vocab)
            self.opt_hook.install(self.engine)
            self.n_params, self.flops_per_token = _size(self.growth.run, self.vocab)
            self.monitor.event(self.step, "growth", {**entry["tokens_after"], "params": self.n_params,
                                                     "params_before": entry["params_before"]}, self.growth.lineage)
            self.monitor.message(f"step {self.step}: grew to {self.n_params / 1e6:.2f}M parameters "
                                 f"({', '.join(f'{k}={v}' for k, v in entry['tokens_after'].items())})")
            if self.cfg.log.token_stats_interval:  # the grown model's usage, a row after the growth event
                self.monitor.log(self.step, self.token_stats())

    def train_step(self) -> None:
        """One optimizer step over the global batch; its loss averaged over data parallel."""
        self.metrics = {}
        self.spike = None
        self.engine.train()
        self.lr = self.engine.get_lr()[0]
        skipped_before = self.engine.skipped_steps
        judge = self._judge if self.cfg.train.spike_factor else None
        if self.timer:
            self.timer.begin()
        micros = self.batches.next_step()
        micros = [m.to(self.dev) for m in micros]
        if self.timer:
            self.timer.lap("data")
        self.opt_hook.count_zeros = self.cfg.log.zero_grads and self._logs_at(self.step + 1)
        self.opt_hook.zero_grads = None
        loss = self.steps.train(self.engine, micros, judge)
        if self.timer:
            self.timer.lap("forward_backward")
        self.window.data_wait_ms += self.batches.wait_ms  # the next step's batches are read meanwhile
        self.step += 1
        self.flops_done += self.flops_per_token * self.cfg.train.global_batch_size * self.cfg.model.seq_length
        self.growth.after_step(self.step)  # frozen old tokens (freeze_old_steps) written back
        for note in self.batches.notes():  # e.g. a blended source starting its next epoch
            self.monitor.message(note)
        if judge is not None:
            loss = self.judged  # already averaged over data parallel
        else:
            (loss,) = D.all_reduce_mean([loss], self.dev, self.ps.dp_group)
        self.monitor.advance()
        if self.spike is not None:
            self.in_trouble += 1
            self.spikes_in_trouble += 1
            self.metrics.update(self.spike)
            self.monitor.message(text := f"step {self.step}: loss {loss:.4f} is above train.spike_factor="
                                 f"{self.cfg.train.spike_factor:g} x the running mean {self.spike['spike_mean']:.4f}, "
                                 f"update skipped ({self.in_trouble} in a row)")
            self.monitor.alert("loss spike", text)
        elif self.engine.skipped_steps > skipped_before or not math.isfinite(loss):
            self.in_trouble += 1
            self.monitor.message(f"step {self.step}: non-finite loss or gradients, update skipped "
                                 f"({self.in_trouble} in a row)")
        else:
            self.in_trouble = self.spikes_in_trouble = 0
            self.loss_mean.add(loss)  # only losses of applied updates enter the mean
        if self.in_trouble and self.in_trouble == self.cfg.log.alert_skipped_steps:
            self.monitor.alert("skipped steps", f"step {self.step}: {self.in_trouble} consecutive steps skipped "
                               f"(train.max_skipped_steps={self.cfg.train.max_skipped_steps} stops the run)")
        self.loss = loss
        self.window.add(loss)
        if self.timer:
            self.timer.end()

    def _judge(self, local_loss: float) -> bool:
        """Called by the train step before the update (train.spike_factor): whether this batch's loss
        is a spike. Every rank decides alike: the loss is averaged over data parallel, and the verdict
        is agreed over the world (a rank that stepped while another skipped would hang ZeRO)."""
        (loss,) = D.all_reduce_mean([local_loss], self.dev, self.ps.dp_group)
        spike = self.loss_mean.is_spike(loss, self.cfg.train.spike_factor)
        spike = bool(D.all_reduce_max(int(spike), self.dev))
        self.judged = loss
        if spike:
            self.spike = {"spike_loss": loss, "spike_mean": self.loss_mean.mean}
        return spike

    def log(self) -> None:
        cfg = self.cfg
        if self.step % cfg.log.interval == 0 or self.step == cfg.train.steps:
            tokens = cfg.train.global_batch_size * cfg.model.seq_length * self.window.steps
            elapsed = self.window.elapsed()
            grad_norm = self.engine.get_global_grad_norm()
            self.metrics.update(loss=self.loss, loss_avg=self.window.mean(), lr=self.lr,
                                grad_norm=float(grad_norm) if grad_norm is not None else None,
                                tokens_per_sec=tokens / elapsed, tflops=self.flops_per_token * tokens / elapsed / 1e12,
                                data_wait_ms=self.window.data_wait_ms / self.window.steps,
                                samples=self.batches.consumed_samples, skipped_steps=int(self.engine.skipped_steps),
                                **self.batches.log_values())  # a blend's realised shares
            self.metrics.update(self._health(tokens / elapsed))
            self.window.reset()
        if cfg.log.token_stats_interval and self.step % cfg.log.token_stats_interval == 0:
            with self.window.paused():
                self.metrics.update(self.token_stats())
        if self.metrics:
            self.monitor.log(self.step, self.metrics)
            self.last = {"step": self.step, **self.metrics}
            if "valid_loss" in self.metrics:
                self.last_valid = self.last
        limit = cfg.train.max_skipped_steps
        if limit and self.in_trouble >= limit:
            self.wait_for_save()  # a checkpoint still being written is from before the trouble
            self.monitor.close()
            latest = cfg.checkpoint_dir / "latest"
            good = latest.read_text().strip() if latest.is_file() else None
            if self.spikes_in_trouble:
                raise TrainingError(
                    f"{self.in_trouble} consecutive steps (up to step {self.step}) were skipped, "
                    f"{self.spikes_in_trouble} of them for a loss above train.spike_factor={cfg.train.spike_factor:g} "
                    f"x its running mean ({self.loss_mean.mean:.4f}); stopped. The newest checkpoint, "
                    f"{good or 'none'}, was saved before: resume from it with a lower train.lr or a tighter "
                    "train.grad_clip, or raise train.spike_factor or train.max_skipped_steps (a lasting rise "
                    "of the loss, e.g. new data, also looks like a run of spikes: then set train.spike_factor=null)")
            raise TrainingError(
                f"{self.in_trouble} consecutive steps (up to step {self.step}) had a non-finite loss or gradients; "
                f"stopped. The newest checkpoint, {good or 'none'}, was saved before the trouble: resume "
                "from it with a lower train.lr, a tighter train.grad_clip or train.precision=fp32, or "
                "raise train.max_skipped_steps")

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.log.interval == 0 or step == self.cfg.train.steps

    def _health(self, tokens_per_sec: float) -> dict:
        """The logged row's timers, memory (max over ranks), mfu, loss scale, norms (README "Monitoring");
        every rank calls (collectives)."""
        cfg, out = self.cfg, {}
        out["train_tokens"] = self.batches.consumed_samples * cfg.model.seq_length  # trained so far, growths included
        out["train_flops"] = self.flops_done
        if self.timer:
            out.update(self.timer.values())
        out.update(observe.max_over_ranks(observe.memory(self.dev), self.dev))
        if self.peak:  # per device: the run's model FLOP/s shared by its ranks
            out["mfu"] = observe.mfu(self.flops_per_token, tokens_per_sec / self.grid.world_size, self.peak)
        if cfg.train.precision == "fp16":
            out["loss_scale"] = observe.loss_scale(self.engine)
        out["params_norm"] = observe.params_norm(self.engine.module, self.ps, cfg.parallel.pipeline > 1)
        if cfg.log.zero_grads and self.opt_hook.zero_grads is not None:
            out["zero_grads"] = self.opt_hook.zero_grads
        return out

    def token_stats(self) -> dict:
        """tokens/block<i>/<projection>/effective (and share_stage<k> after a growth), with the means
        over layers, on the first validation micro-batch (the same on every rank); every rank calls."""
        cfg = self.cfg
        micro = next(iter(valid_batches(self.valid_set, cfg.train.micro_batch_size, 0, 1, 1))).to(self.dev)
        layers = self.growth.run.model.num_layers
        name_of = (lambda n: global_name(n, layers)) if cfg.parallel.pipeline > 1 else (lambda n: n)
        self.engine.eval()
        stats = observe.token_usage(self.engine.module, lambda: self.steps.eval(self.engine, [micro]),
                                    self.growth.lineage, name_of)
        self.engine.train()
        return observe.with_means(observe.merge_over_ranks(stats))  # pipeline stages hold different layers

    def evaluate_if_due(self) -> None:
        every = self.cfg.eval.interval
        if every and (self.step % every == 0 or self.step == self.cfg.train.steps):
            with self.window.paused():
                loss = self.evaluate()
            self.metrics.update(valid_loss=loss, valid_ppl=math.exp(min(loss, 50.0)))
            self.monitor.message(f"step {self.step}: validation loss {loss:.4f}, perplexity "
                                 f"{math.exp(min(loss, 50.0)):.2f}")

    def evaluate_tasks_if_due(self) -> None:
        if self.tasks.due(self.step):
            with self.window.paused():
                self.metrics.update(self.tasks.run(self.step, self.engine, self.growth.run, self.ps, self.vocab,
                                                   self.dev, self.monitor.message))

    def evaluate(self) -> float:
        """Mean token loss over the first eval.steps x train.global_batch_size validation samples: the
        same samples and weighting at every layout (valid_batches)."""
        self.engine.eval()
        g, t = self.grid, self.cfg.train
        micros = [m.to(self.dev) for m in valid_batches(self.valid_set, t.micro_batch_size, g.dp_rank, g.data,
                                                         self.cfg.eval.steps, global_batch_size=t.global_batch_size)]
        (loss,) = D.all_reduce_mean([self.steps.eval(self.engine, micros)], self.dev, self.ps.dp_group)
        self.engine.train()
        return loss

    def save_if_due(self) -> None:
        cfg = self.cfg
        due = (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0) or self.step == cfg.train.steps
        if due and not self.in_trouble:  # never save a state from inside a run of skipped steps
            # the run's last checkpoint is written directly: nothing is left to overlap it with
            background = cfg.checkpoint.async_save and self.step < cfg.train.steps
            with self.window.paused():
                path = self.save(background)
            self.monitor.message(f"step {self.step}: {'saving' if background else 'saved'} {path}"
                                 + (" in the background" if background else ""))

    def save(self, background: bool = False) -> Path:
        """Save this step (after the checkpoint still being written, if any, is complete). `background`:
        return once this rank's part is copied to host memory; `wait_for_save()` completes it."""
        self.wait_for_save()
        extra = self.growth.checkpoint_meta() | {"loss_mean": self.loss_mean.state(), "train_flops": self.flops_done}
        args = (self.engine, self.growth.run, self.grid, self.step, self.batches.consumed_samples, self.run_info,
                self.vocab, self.data.tokenizer_sha256, extra)
        try:
            if background:
                self.pending = save_load.AsyncSave(*args, tokenizer_file=self.data.tokenizer_path)
                path = self.pending.path
            else:
                path = save_load.save(*args, tokenizer_file=self.data.tokenizer_path)
        except Exception as e:
            self._failed_save(f"step {self.step}: {e}")
            raise
        self.saved_at = self.step
        return path

    def wait_for_save(self) -> None:
        """Every rank: complete the checkpoint being written in the background, if any (callers inside
        the loop pause the throughput window around it)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            try:
                path = pending.wait()
            except Exception as e:
                self._failed_save(f"{pending.path}: {e}")
                raise
            self.monitor.message(f"step {self.step}: {path} is complete")

    def _failed_save(self, text: str) -> None:
        """Alert, and finish W&B: the run is about to stop (the launcher leaves by os._exit, so
        whatever W&B has not sent by then is lost)."""
        self.monitor.alert("checkpoint save failed", text, "ERROR")
        self.monitor.close()

    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop (agreed by all); if so, the state is saved."""
        reason = self.stops.agreed()
        if reason is None:
            return False
        if self.in_trouble:  # never save from inside a run of non-finite steps
            self.monitor.message(f"step {self.step}: {reason}; stopping without a checkpoint (inside a run of "
                                 "non-finite steps): resume from the newest one")
        else:
            if self.saved_at != self.step:
                self.save()
            self.wait_for_save()
            self.monitor.message(f"step {self.step}: {reason}; saved the checkpoint and stopping. Run the same "
                                 "command to resume")
        saved = f"saved, at step {self.step}" if not self.in_trouble else "not saved (inside skipped steps)"
        self.monitor.alert("run stopped", f"step {self.step}: {reason}; {saved}")
        return True

    def finish(self) -> dict:
        """Close the monitor after a summary of the run; returns the last logged metrics."""
        self.wait_for_save()
        if self.cfg.deepspeed.get("comms_logger", {}).get("enabled"):
            import deepspeed.comm  # DeepSpeed prints its table only when asked (every rank calls: it syncs)

            deepspeed.comm.log_summary()
        self.monitor.close(summary=self.summary())
        self.stops.restore()
        if self.lock is not None:
            self.lock.release()
        D.shutdown()
        return self.last

    def summary(self) -> dict:
        seconds = time.perf_counter() - self.started
        steps = self.step - self.first_step
        latest = self.cfg.checkpoint_dir / "latest"
        return {"step": self.step, "steps_run": steps, "seconds": seconds,
                "tokens_per_sec": steps * self.cfg.train.global_batch_size * self.cfg.model.seq_length / seconds,
                "loss": self.last.get("loss"), "valid_loss": self.last_valid.get("valid_loss"),
                "valid_ppl": self.last_valid.get("valid_ppl"),
                "checkpoint": str(self.cfg.checkpoint_dir / latest.read_text().strip()) if latest.is_file() else None,
                "metrics": str(self.cfg.run_dir / "metrics.jsonl")}


class RunningMean:
    """The running mean of accepted training losses that train.spike_factor compares each loss with:
    after each accepted step, count += 1 and mean += (loss - mean) / min(count, window), so the exact
    mean of the first `window` losses, then an exponential average with weight 1/window. A loss is a
    spike once count >= window and loss > factor x mean. Kept in every checkpoint (`state()`)."""

    def __init__(self, window: int, state: dict | None = None):
        self.window = window
        self.mean, self.count = (state["mean"], state["count"]) if state else (0.0, 0)

    def add(self, loss: float) -> None:
        self.count += 1
        self.mean += (loss - self.mean) / min(self.count, self.window)

    def is_spike(self, loss: float, factor: float) -> bool:
        return math.isfinite(loss) and self.count >= self.window and loss > factor * self.mean

    def state(self) -> dict:
        return {"mean": self.mean, "count": self.count}


class _Window:
    """Training losses and time since the last log line; time inside `paused()` (evaluation,
    checkpoints, growth) does not count towards tokens/s."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.start, self.pause = 0.0, 0, time.perf_counter(), 0.0
        self.data_wait_ms = 0.0  # summed over the steps; logged per step

    def add(self, loss: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1

    def mean(self) -> float:
        return self.loss / self.steps

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.pause

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - t0


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def _run_info(cfg: Config, resume_meta: dict | None) -> dict:
    """Identity of the run: git revision and a W&B id that stays the same across resumes."""
    info_path = cfg.run_dir / "run_info.json"
    prev = json.loads(info_path.read_text()) if info_path.exists() else {}
    return {"git": git_revision(), "wandb_id": prev.get("wandb_id") or uuid.uuid4().hex[:12],
            "resumed_from_step": resume_meta["step"] if resume_meta else None}


def _count(n: int, noun: str, plural: str = "s") -> str:
    """'1 micro-batch', '2 micro-batches'."""
    return f"{n} {noun}{'' if n == 1 else plural}"


def _size(run: Config, vocab: int) -> tuple[int, int]:
    """(parameters of the whole model, whatever this rank holds; training FLOPs per token)."""
    with torch.device("meta"):
        n_params = count_parameters(TokenFormerModel(run.model, vocab))
    return n_params, model_flops_per_token(run.model, vocab)
