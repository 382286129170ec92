"""The in-launch growth schedule (the config's `growth` list): which model size a run is at,
where its LR segment starts, and growing a running job in place when a stage's step comes.

Growing in place takes the same route as tools/expand_params.py followed by a resume: save
`step_N`, grow it in the global view on rank 0 into `step_N_grown` (written atomically like any
checkpoint), then every rank rebuilds its engine at the new size and loads that checkpoint. A
run killed anywhere in between resumes at the right size.
"""
from __future__ import annotations

import dataclasses
import gc
import shutil
from pathlib import Path

from .. import distributed as D
from ..checkpoint import save_load
from ..checkpoint.files import PARTIAL, CheckpointError, read_meta, tag_for
from ..config import TOKEN_KEYS, Config, ConfigError
from ..config.validation import freeze_layout_problem
from ..engine import build_engine
from .expand import GrowthError, GrowthOptions, expand_checkpoint
from .freeze import OldTokenFreeze


def stage_of(cfg: Config, ckpt_model: dict) -> int:
    """Which model stage (start, or after growth i) a checkpoint's model is; 0 if none matches
    (check_loadable then says which fields differ)."""
    for i, m in enumerate(cfg.model_stages()):
        if all(getattr(m, k) == ckpt_model[k] for k in TOKEN_KEYS):
            return i
    return 0


class GrowthController:
    def __init__(self, cfg: Config, resume_meta: dict | None):
        self.cfg = cfg
        self.stage = stage_of(cfg, resume_meta["config"]["model"]) if resume_meta else 0
        # The LR schedule starts at 0, or where the model last grew; lineage lists the growths so far.
        self.schedule_start = resume_meta.get("schedule_start", 0) if resume_meta else 0
        self.lineage = resume_meta.get("lineage", []) if resume_meta else []
        # The old tokens' freeze window (expand's `freeze_old` record), None or ended: nothing frozen.
        self.freeze = resume_meta.get("freeze_old") if resume_meta else None
        self.freezer: OldTokenFreeze | None = None

    @property
    def run(self) -> Config:
        """The config at the current model size."""
        return dataclasses.replace(self.cfg, model=self.cfg.model_stages()[self.stage])

    @property
    def schedule(self) -> tuple[int, int, int | None]:
        """The steps the current LR segment spans, and its warmup (None: train.warmup_steps)."""
        warmup = self.cfg.growth[self.stage - 1].warmup_steps if self.stage else None
        return self.schedule_start, self.cfg.segment_end(self.stage), warmup

    def checkpoint_meta(self) -> dict:
        return {"schedule_start": self.schedule_start, "lineage": self.lineage, "freeze_old": self.freeze}

    def start_freeze(self, engine, step: int, grid: D.Grid) -> None:
        """Freeze the old tokens if `step` lies inside a freeze window (after a growth or a resume)."""
        if self.freezer is not None:
            self.freezer.close()
            self.freezer = None
        if self.freeze and step < self.freeze["until_step"]:
            problem = freeze_layout_problem(self.cfg)
            if problem:  # a checkpoint grown with --freeze-old-steps, loaded at a layout it does not run at
                raise ConfigError(f"freeze_old_steps (recorded in the checkpoint, until step "
                                  f"{self.freeze['until_step']}): {problem}")
            self.freezer = OldTokenFreeze(engine, self.freeze, grid.tp_rank, grid.tensor)

    def after_step(self, step: int) -> None:
        """After optimizer step `step`: put the frozen rows back; the window ends at its last step."""
        if self.freezer is not None:
            self.freezer.restore()
            if step >= self.freeze["until_step"]:
                self.freezer.close()
                self.freezer = None

    def due(self, step: int) -> bool:
        return self.stage < len(self.cfg.growth) and step >= self.cfg.growth[self.stage].at_step

    def grow(self, engine, step: int, ps: D.ParallelState, vocab: int):
        """Grow checkpoint step_N (saved by the caller), free `engine` (the caller holds no other
        reference to it), build the grown one and load. Returns (the new engine, the lineage entry)."""
        ckpt_dir, tag, grown_tag = self.cfg.checkpoint_dir, tag_for(step), tag_for(step) + "_grown"
        g = self.cfg.growth[self.stage]
        opts = GrowthOptions(key_init=g.key_init, tau=g.tau, reset_optimizer=g.reset_optimizer,
                             freeze_old_steps=g.freeze_old_steps)
        entry = D.broadcast_object(_expand(ckpt_dir, tag, grown_tag, self.cfg.model_stages()[self.stage + 1], opts)
                                   if ps.grid.rank == 0 else None)
        if isinstance(entry, str):  # every rank stops alike
            raise GrowthError(entry)
        if self.freezer is not None:
            self.freezer.close()
            self.freezer = None
        del engine
        gc.collect()
        self.stage, self.schedule_start, self.lineage = self.stage + 1, step, [*self.lineage, entry]
        run = self.run
        engine, _ = build_engine(run, vocab, ps, self.schedule)
        meta = D.broadcast_object(read_meta(ckpt_dir, grown_tag) if ps.grid.rank == 0 else None)
        save_load.load(engine, run, ps.grid, ckpt_dir, grown_tag, meta)
        self.freeze = meta.get("freeze_old")
        self.start_freeze(engine, step, ps.grid)
        return engine, entry


def _expand(ckpt_dir: Path, tag: str, grown_tag: str, model, opts: GrowthOptions) -> dict | str:
    """Rank 0: grow checkpoint `tag` into `grown_tag` with the stage's options (default exact: zero
    keys, value init, tau kept). Returns the lineage entry, or the error text."""
    stale = ckpt_dir / grown_tag  # a damaged one from an earlier attempt (an intact one would have been resumed)
    shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(stale.with_name(stale.name + PARTIAL), ignore_errors=True)
    try:
        _, entry = expand_checkpoint(ckpt_dir / tag, ckpt_dir, {k: getattr(model, k) for k in TOKEN_KEYS},
                                     opts, tag=grown_tag)
    except (GrowthError, CheckpointError, OSError) as e:
        return f"growth at {ckpt_dir / tag} failed: {e}"
    return entry
