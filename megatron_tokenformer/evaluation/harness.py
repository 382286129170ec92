"""Running the offline tasks on an lm-eval model: results, per-task scores, a markdown table.

lm-eval's `evaluate()` does the work (requests from the task YAMLs, metrics); with a backend whose
`world_size` > 1 it splits the documents over the processes and gathers the per-document metrics
on rank 0, so every layout scores the same documents.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

from . import offline

PAPER = {  # TokenFormer paper, zero-shot, lm-eval 0.4 (shared DESIGN.md section 7); accuracy in %
    "150M": {"lambada_ppl": 16.38, "lambada_acc": 45.0, "hellaswag": 35.5, "piqa": 64.9, "arc_easy": 47.3,
             "arc_challenge": 24.9, "winogrande": 50.4, "avg": 44.7},
    "450M": {"lambada_ppl": 7.69, "lambada_acc": 57.3, "hellaswag": 47.5, "piqa": 69.5, "arc_easy": 56.2,
             "arc_challenge": 26.7, "winogrande": 54.6, "avg": 52.0},
    "900M": {"lambada_ppl": 5.46, "lambada_acc": 64.0, "hellaswag": 55.3, "piqa": 72.4, "arc_easy": 59.9,
             "arc_challenge": 30.6, "winogrande": 56.4, "avg": 56.4},
    "1.5B": {"lambada_ppl": 5.24, "lambada_acc": 64.7, "hellaswag": 60.0, "piqa": 74.8, "arc_easy": 64.8,
             "arc_challenge": 32.0, "winogrande": 59.7, "avg": 59.3},
}
# Accuracy by chance (choices per question), to read a small model's scores against.
CHANCE = {"hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "winogrande": 0.5,
          "lambada_openai": 0.0}


def task_manager(data_dir: str | Path | None = None):
    """An lm-eval TaskManager holding only the package's offline tasks (indexing lm-eval's own
    thousands of tasks takes seconds), reading their files from `data_dir`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(offline.task_dir()), include_defaults=False,
                       metadata={"data_dir": str(offline.data_dir(data_dir))})


@contextlib.contextmanager
def quiet_lm_eval():
    """Keep the backend's own scoring bar the only progress bar of a run: lm-eval logs every task it
    builds at INFO, repeats warnings per task and draws a bar per task while building requests;
    datasets draws one per task file read ("Generating train split") and per map over the documents.
    Only errors are kept from both."""
    import datasets
    import lm_eval.api.task as lm_task
    from datasets.utils import logging as ds_logging

    log = logging.getLogger("lm_eval")
    level, ds_level, task_tqdm = log.level, ds_logging.get_verbosity(), lm_task.tqdm
    bars = ds_logging.is_progress_bar_enabled()
    log.setLevel(logging.ERROR)
    ds_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    lm_task.tqdm = functools.partial(task_tqdm, disable=True)  # build_all_requests' bar has no switch
    try:
        yield
    finally:
        log.setLevel(level)
        ds_logging.set_verbosity(ds_level)
        lm_task.tqdm = task_tqdm
        if bars:
            datasets.enable_progress_bars()


def run_tasks(lm, tasks: list[str], limit: int | None = None, data_dir: str | Path | None = None,
              bootstrap_iters: int = 0, log_samples: bool = False) -> dict | None:
    """lm-eval's results dict for `tasks` (zero-shot) on rank 0, None on other ranks.

    `limit`: the first N documents of each task. `bootstrap_iters`: lm-eval's stderr resampling for
    metrics without a closed form (LAMBADA perplexity); 0 skips it. `log_samples`: also each
    document's requests and answers, under results["samples"][task] (lm-eval's own records).
    The one progress bar shown is the backend's own (its `progress` argument)."""
    from lm_eval.evaluator import evaluate

    where = offline.check_prepared(tasks, data_dir)
    with quiet_lm_eval():
        loaded = task_manager(where).load(tasks)
        for task in loaded["tasks"].values():  # what simple_evaluate does for a zero-shot run
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        return evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                        log_samples=log_samples)


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (filter "none"; stderr left out)."""
    out = {}
    for task, row in results["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in row.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out


def markdown_table(task_scores: dict[str, dict[str, float]], counts: dict[str, int] | None = None) -> str:
    """One row per task: its metrics (accuracy in %, LAMBADA perplexity as is), documents scored, chance."""
    lines = ["| task | acc (%) | acc_norm (%) | perplexity | documents | chance (%) |", "|---|---|---|---|---|---|"]
    for task, s in task_scores.items():
        pct = lambda k: f"{100 * s[k]:.1f}" if k in s else "-"  # noqa: E731
        ppl = f"{s['perplexity']:.2f}" if "perplexity" in s else "-"
        n = str(counts.get(task, "")) if counts else ""
        lines.append(f"| {task} | {pct('acc')} | {pct('acc_norm')} | {ppl} | {n} | {100 * CHANCE.get(task, 0):.0f} |")
    return "\n".join(lines)


def evaluate_checkpoint(load: str | Path, tasks: str | list[str], limit: int | None = None, batch_size: int = 16,
                        device: str | None = None, data_dir: str | Path | None = None,
                        bootstrap_iters: int = 0, log=print) -> dict:
    """Score a checkpoint on the offline tasks. Bad input (unknown task, data not prepared, a
    checkpoint without its tokenizer) raises a UserError before the model is read.

    Returns {"checkpoint", "tasks": {task: {metric: value}}, "documents": {task: n}, "seconds", "limit",
    "lm_eval": lm-eval's results (config, versions, n-samples)}."""
    import time

    from ..checkpoint import resolve
    from ..checkpoint.reader import checkpoint_tokenizer
    from .lm_backend import TokenFormerLM

    names = offline.resolve_tasks(tasks)
    where = offline.check_prepared(names, data_dir)
    ckpt_dir, tag = resolve(load)
    checkpoint_tokenizer(ckpt_dir / tag)  # a missing tokenizer fails here, before anything heavy
    started = time.perf_counter()
    lm = TokenFormerLM(path=str(ckpt_dir / tag), batch_size=batch_size, device=device)
    log(f"evaluating {ckpt_dir / tag} ({lm.get_model_info()['model_num_parameters'] / 1e6:.2f}M parameters, "
        f"context {lm.max_length}) on {', '.join(names)}" + (f", first {limit} documents each" if limit else ""))
    results = run_tasks(lm, names, limit, where, bootstrap_iters)
    docs = {t: int(results["n-samples"][t]["effective"]) for t in names}
    return {"checkpoint": str(ckpt_dir / tag), "tasks": {t: scores(results)[t] for t in names}, "documents": docs,
            "limit": limit, "seconds": time.perf_counter() - started,
            "lm_eval": {k: results[k] for k in ("n-samples", "versions", "configs") if k in results}}
