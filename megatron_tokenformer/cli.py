"""Error handling shared by the launch scripts: a bad input prints one clear line, not a traceback."""
from __future__ import annotations

import sys


def run(config_path: str | None, overrides: list[str], help_config: bool = False) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError, describe, load_config
    from .data import DataError
    from .monitor import MonitorError
    from .training import TrainingError

    if help_config:
        print(describe())
        return 0
    try:
        cfg = load_config(config_path, overrides)
        from .training import pretrain

        pretrain(cfg)
    except (ConfigError, DataError, CheckpointError, MonitorError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
