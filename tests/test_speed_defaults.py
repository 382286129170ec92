"""`auto` speed settings: the fastest measured choice for the device, explicit values win, and the
run says what it chose (console, run_info.json, W&B config)."""
import json

import pytest
import torch

from helpers import SMALL, launch
from megatron_tokenformer.config import ConfigError, load_config
from megatron_tokenformer.engine import speed_choices
from megatron_tokenformer.pattention import Pattention


@pytest.mark.parametrize("cuda, overrides, want", [
    (False, [], {"pattention_impl": "fused", "compile": False}),
    (True, [], {"pattention_impl": "compiled", "compile": True}),
    (True, ["parallel.pipeline=2"], {"pattention_impl": "compiled", "compile": False}),  # no compile with pipelines
    (True, ["parallel.tensor=2"], {"pattention_impl": "compiled", "compile": False}),  # nor where not measured
    (True, ["model.pattention_impl=fused", "train.compile=false"], {"pattention_impl": "fused", "compile": False}),
    (False, ["model.pattention_impl=reference", "train.compile=true"], {"pattention_impl": "reference",
                                                                        "compile": True}),
])
def test_auto_resolves_for_the_device_and_explicit_values_win(monkeypatch, cuda, overrides, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = load_config("configs/tiny.yml", overrides)
    assert speed_choices(cfg) == want
    layer = Pattention(8, 8, 4, impl=cfg.model.pattention_impl)
    assert layer.impl == want["pattention_impl"]  # the layer resolves `auto` the same way


def test_compile_values():
    assert load_config("configs/tiny.yml").train.compile == "auto"
    assert load_config("configs/tiny.yml", ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.compile='maybe' is not valid; choose true/false or auto"):
        load_config("configs/tiny.yml", ["train.compile=maybe"])
    load_config("configs/tiny.yml", ["parallel.pipeline=2"])  # auto is fine with pipelines
    with pytest.raises(ConfigError, match="train.compile=true is not supported with parallel.pipeline>1"):
        load_config("configs/tiny.yml", ["parallel.pipeline=2", "train.compile=true"])


@pytest.mark.slow
def test_the_run_says_what_it_chose(corpus, tmp_path):
    out = launch(SMALL + [f"data.path={corpus}", f"log.dir={tmp_path}", "train.steps=1"], launcher="python")
    chosen = speed_choices(load_config("configs/tiny.yml"))
    assert (f"Pattention: {chosen['pattention_impl']} (model.pattention_impl=auto), compiled blocks: "
            f"{chosen['compile']} (train.compile=auto)") in out.stdout
    assert json.loads((tmp_path / "run_info.json").read_text())["resolved"] == chosen
