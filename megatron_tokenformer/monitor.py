"""Where metrics go: `<log.dir>/metrics.jsonl`, Weights & Biases and a progress bar, from one rank."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config import TOKEN_KEYS, Config
from .errors import UserError


class MonitorError(UserError, RuntimeError):
    """W&B cannot start as configured; the message names the log.* key to change."""


class Monitor:
    """Created on every rank; only the logging rank writes anything."""

    def __init__(self, cfg: Config, active: bool, run_info: dict, resume_step: int):
        self.active = active
        self.wandb_run = None
        self.bar = None
        if not active:
            return
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        if cfg.log.wandb_project and cfg.log.wandb_mode != "disabled":
            self.wandb_run = _start_wandb(cfg, run_info)
        if cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=resume_step, desc=cfg.log.run_name,
                            dynamic_ncols=True, mininterval=1.0)

    def _truncate_after(self, step: int) -> None:
        """A run resumed from step S drops lines logged after S by the crashed attempt (no duplicates)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    def event(self, step: int, name: str, data: dict, lineage: list | None = None) -> None:
        """A one-off event (e.g. a growth) as a metrics.jsonl row {"step", "event", ...} and W&B values
        `<name>/<key>`; `lineage` replaces the W&B run's config entry of that name."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "event": name, **data}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{name}/{k}": v for k, v in data.items()}, step=step)
            if lineage is not None:
                self.wandb_run.config.update({"lineage": lineage}, allow_val_change=True)

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        """A W&B alert (email/Slack with W&B online; recorded in the run file offline); none without W&B."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _summary(self, s: dict) -> None:
        """The end-of-run lines: where the run got to, how fast, where its outputs are."""
        fmt = _fmt
        steps = f"{s['steps_run']} step{'' if s['steps_run'] == 1 else 's'}"
        lines = [f"done: step {s['step']} ({steps} in {s['seconds'] / 60:.1f} min, "
                 f"{fmt(s['tokens_per_sec'], ',.0f')} tokens/s overall)",
                 f"  training loss {fmt(s['loss'], '.4f')}, validation loss {fmt(s['valid_loss'], '.4f')}, "
                 f"perplexity {fmt(s['valid_ppl'], '.2f')}",
                 f"  checkpoint: {s['checkpoint'] or 'none'}", f"  metrics:    {s['metrics']}"]
        if s.get("wandb"):
            lines.append(f"  W&B run:    {s['wandb']}")
        print("\n".join(lines), flush=True)

    def wandb_dir(self) -> str | None:
        """Where the W&B run is: its URL online, its directory offline (upload with `wandb sync`)."""
        run = self.wandb_run
        if run is None:
            return None
        return f"{run.dir.removesuffix('/files')} (upload: wandb sync)" if run.offline else run.url

    def close(self, summary: dict | None = None) -> None:
        """Close the progress bar, print the run's summary (if given) below it, finish W&B."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if summary is not None and self.active:
            self._summary({**summary, "wandb": self.wandb_dir()})
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl` ([] if there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def report_finished(cfg: Config, checkpoint: Path, meta: dict) -> dict:
    """A run launched again after its last step (its checkpoint at train.steps or beyond): print what it
    ended with (the last losses metrics.jsonl logged) and which of the asked work will not be done here,
    with how to do it. Starts no W&B run and writes nothing. Returns the last logged row."""
    step, rows = meta["step"], read_metrics(cfg.run_dir)
    last = next((r for r in reversed(rows) if "loss" in r), {})
    valid = next((r for r in reversed(rows) if "valid_loss" in r), {})
    fmt = _fmt
    losses = (f"  last logged: training loss {fmt(last.get('loss'), '.4f')}, validation loss "
              f"{fmt(valid.get('valid_loss'), '.4f')}, perplexity {fmt(valid.get('valid_ppl'), '.2f')}" if rows
              else "  no losses logged in this run directory (a checkpoint.load from elsewhere?)")
    lines = [f"nothing to train: the checkpoint {checkpoint} is at step {step} and train.steps={cfg.train.steps} "
             f"(the run is finished)", losses,
             f"  checkpoint: {checkpoint}", f"  metrics:    {cfg.run_dir / 'metrics.jsonl'}"]
    new_run = "log.run_name=NAME log.dir=runs/NAME"
    # eval.tasks run during training (at the end of it): those without scores at the last step are new work.
    at_end = {k.split("/")[1] for r in rows if r.get("step") == step for k in r if k.startswith("eval/")}
    missing = [t for t in cfg.eval.tasks if t not in at_end]
    if missing:
        limit = f" --limit {cfg.eval.tasks_limit}" if cfg.eval.tasks_limit else ""
        lines.append(f"not done: eval.tasks=[{', '.join(missing)}] (the tasks run during training, and this run "
                     f"has no steps left); score the checkpoint with `python tools/evaluate.py --load "
                     f"{checkpoint.parent} --tasks {','.join(missing)}{limit}`, or raise train.steps")
    model = meta["config"]["model"]
    stages = cfg.model_stages()
    # growth stages are told apart by their token counts (as growth.controller.stage_of)
    reached = next((i for i, m in enumerate(stages) if all(getattr(m, k) == model[k] for k in TOKEN_KEYS)), 0)
    for i in range(reached, len(cfg.growth)):
        g = cfg.growth[i]
        lines.append(f"not done: growth[{i}] (at step {g.at_step}): this run ended at step {step} without it; grow "
                     f"its checkpoint with `python tools/expand_params.py --load {checkpoint.parent} --save "
                     f"runs/NAME/init ...` and train that (README, Growing a model), or run this schedule as a new "
                     f"run: {new_run}")
    lines.append(f"to train on: raise train.steps above {step}; for a new run: {new_run}")
    print("\n".join(lines), flush=True)
    return last


def _start_wandb(cfg: Config, run_info: dict):
    import wandb

    if cfg.log.wandb_mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
        raise MonitorError("log.wandb_mode=online needs a W&B key: run `wandb login` or set WANDB_API_KEY, "
                           "or set log.wandb_mode=offline (sync later with `wandb sync`) or disabled")
    try:
        return wandb.init(project=cfg.log.wandb_project, name=cfg.log.run_name, mode=cfg.log.wandb_mode,
                          dir=str(cfg.run_dir), resume="allow", id=run_info.get("wandb_id"),
                          # W&B's own console lines would interleave with the progress bar; the
                          # run's summary names where the W&B run is.
                          settings=wandb.Settings(silent=True),
                          config={**cfg.to_dict(), "run_info": run_info, "lineage": run_info.get("lineage", [])})
    except Exception as e:  # wandb raises many types; the user needs the reason and the knob
        raise MonitorError(f"could not start W&B (log.wandb_mode={cfg.log.wandb_mode}): {e}. "
                           "Set log.wandb_mode=offline or disabled to train without it") from None


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()
