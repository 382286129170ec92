"""Freezing the tokens that existed before a growth for its first K steps (`freeze_old_steps`).

Masking their gradients is not enough: Adam's momentum and the decoupled weight decay would still
move them. So the old rows of every Pattention's keys and values are copied when the window starts,
working weights, fp32 master weights and Adam moments, and written back after each optimizer step
of the window (through deepspeed_adapter.OptimizerState.live: the rank's own ZeRO fragment). Their
gradients are zeroed too, so the clipping norm counts only what trains. The window is the record
{"until_step", "tokens": the token counts before the growth, "shards": the source's tensor size}
in the checkpoint's meta (`freeze_old`): a run resumed inside the window rebuilds the copy from the
loaded state, which the window has kept equal to the state at the growth, so it goes on exactly.
"""
from __future__ import annotations

import torch

from ..deepspeed_adapter import OptimizerState
from ..pattention import Pattention
from .expand import FIELD


def old_rows(n_old: int, n_new: int, shards: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Which of this tensor rank's token rows existed before the growth (bool over its rows): the
    grown global order is [old_0; new_0; old_1; new_1; ...] over the source's `shards`."""
    g = torch.arange(n_new).chunk(tp_size)[tp_rank]
    return (g % (n_new // shards)) < (n_old // shards)


class OldTokenFreeze:
    def __init__(self, engine, record: dict, tp_rank: int, tp_size: int):
        self.until = record["until_step"]
        opt = OptimizerState(engine)
        self.rows, self.hooks = [], []
        for name, m in engine.module.named_modules():
            if not isinstance(m, Pattention):
                continue
            rows = old_rows(record["tokens"][FIELD[name.rsplit(".", 1)[-1]]], m.num_tokens, record["shards"],
                            tp_rank, tp_size)
            for p in (m.key_tokens, m.value_tokens):
                mask = torch.zeros(p.shape, dtype=torch.bool)
                mask.index_fill_(p.partition_dim, rows.nonzero().squeeze(1), True)
                mask = mask.to(p.device)
                live = opt.live(p)
                flat, views = None, {}
                if live is not None:
                    offset, views = live
                    flat = mask.reshape(-1)[offset:offset + views[""].numel()]
                saved = {k: v[flat].clone() for k, v in views.items()}
                self.rows.append((p, mask, p.data[mask].clone(), flat, views, saved))
                self.hooks.append(p.register_hook(lambda g, mask=mask: g.masked_fill(mask, 0)))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the old rows back (after an optimizer step)."""
        for p, mask, working, flat, views, saved in self.rows:
            p.data[mask] = working
            for k, v in views.items():
                v[flat] = saved[k]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.rows, self.hooks = [], []
