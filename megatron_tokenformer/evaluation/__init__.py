"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness (docs/EVAL.md).

    scoring.py      token-level loglikelihoods (lm-eval's HF backend semantics), any forward callable
    lm_backend.py   the lm-eval model `megatron_tokenformer` (registered on import)
    offline.py      the paper's six tasks as local files; tasks/ holds their lm-eval YAMLs
    harness.py      running tasks on a backend: results, tables, the offline task manager
    live.py         evaluation during training, on the live model at any parallel layout

Importing this package imports nothing heavy; lm_backend, harness and live need lm-eval
(`pip install -e '.[eval]'`).
"""
