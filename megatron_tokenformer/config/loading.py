"""YAML files and `section.key=value` overrides into a Config; `describe()`, `describe_key()` and
`help_text()` for --help-config."""
from __future__ import annotations

import dataclasses
import difflib
import re
import textwrap
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .schema import BlendSource, Config, ConfigError, DataConfig, GrowthStage
from .validation import validate


def _field_docs(cls) -> dict[str, str]:
    """Docstrings under the fields, read from the source (the single place they are written)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


# The end of a docstring's first sentence: ". " before a capital, a digit or a quote; "e.g. " and
# "i.e. " are not ends.
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z0-9`'\"(])")
ONE_LINE = 110  # characters of a key's doc that `describe()` shows; `--help-config KEY` shows the rest


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence, cut at a word to ONE_LINE characters (' ...' marks the cut)."""
    text = " ".join(doc.split())
    end = _SENTENCE_END.search(text)
    first = text[:end.start() + 1] if end else text
    if len(first) > ONE_LINE:
        first = first[:ONE_LINE].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return first


def _show(value: Any) -> str:
    """A config value as describe() prints it: dataclass items (growth, data.blend) as mappings."""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return repr([dataclasses.asdict(v) for v in value])
    return repr(value)


def _documented() -> list[tuple[str, type, str]]:
    """(dotted key, the dataclass holding it, field name) of every documented key, in describe()'s order;
    list items as growth[].KEY and data.blend[].KEY."""
    out = []

    def keys(cls, prefix: str) -> None:
        for f in fields(cls):
            out.append((f"{prefix}{f.name}", cls, f.name))
            if (cls, f.name) == (DataConfig, "blend"):  # a list: its items' keys
                keys(BlendSource, "data.blend[].")

    for sec in fields(Config):
        if sec.name == "growth":
            keys(GrowthStage, "growth[].")
        elif sec.name != "deepspeed":
            keys(sec.default_factory, f"{sec.name}.")
    return out


def _default(cls, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _value(cfg: Config, key: str) -> Any:
    """The value of a dotted key in cfg (list items have none: MISSING)."""
    if "[]" in key:
        return MISSING
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def describe(cfg: Config | None = None) -> str:
    """Every config key with its default and the first sentence of its docstring, one line each (for
    --help-config); with `cfg`, each key shows cfg's value, followed by `(default X)` where they differ."""
    docs = {cls: _field_docs(cls) for cls in {cls for _, cls, _ in _documented()}}
    lines, section = [], None
    for key, cls, name in _documented():
        head = key.split("[")[0].split(".")[0]
        if head != section:
            section = head
            if head == "growth":
                shown = f" {_show(cfg.growth)}" if cfg is not None and cfg.growth else ""
                lines.append(f"growth:{shown}  # a list of stages, each with:")
            else:
                lines.append(f"{head}:")
        default, value = _default(cls, name), MISSING if cfg is None else _value(cfg, key)
        shown = _show(default) if value is MISSING else _show(value)
        if value is not MISSING and value != default:
            shown += f" (default {_show(default)})"
        lines.append(f"  {key} = {shown}  # {_first_sentence(docs[cls].get(name, ''))}")
    # deepspeed: free-form, the last section of Config
    ds = f" {cfg.deepspeed!r}" if cfg is not None and cfg.deepspeed else ""
    lines.append(f"deepspeed:{ds}  # " + _first_sentence(_field_docs(Config)["deepspeed"]))
    lines.append("  deepspeed.<key>[.<key>...] = {}  # e.g. deepspeed.zero_optimization.overlap_comm=true")
    return "\n".join(lines)


def describe_key(key: str, cfg: Config | None = None) -> str:
    """The whole docstring of one key (train.spike_factor, growth[].at_step or growth.at_step, deepspeed),
    with its type and default (and cfg's value); an unknown key is a ConfigError naming the nearest."""
    if key == "deepspeed" or key.startswith("deepspeed."):
        doc, head = _field_docs(Config)["deepspeed"], "deepspeed: mapping = {}"
        if cfg is not None:
            head += f" (this config: {cfg.deepspeed!r})"
    else:
        table = {k: (cls, name) for k, cls, name in _documented()}
        for plain, listed in (("growth.", "growth[]."), ("data.blend.", "data.blend[].")):
            if key.startswith(plain):
                key = listed + key[len(plain):]
        if key not in table:
            near = _nearest(key, table)
            hint = f"did you mean {near}? " if near else ""
            raise ConfigError(f"--help-config {key}: no such config key; {hint}`--help-config` alone lists them all")
        cls, name = table[key]
        tp = get_type_hints(cls)[name]
        kind = tp.__name__ if isinstance(tp, type) else re.sub(r"\b(\w+\.)+(?=\w)", "", str(tp))  # no module paths
        head = f"{key}: {kind} = {_show(_default(cls, name))}"
        value = MISSING if cfg is None else _value(cfg, key)
        if value is not MISSING:
            head += f" (this config: {_show(value)})"
        doc = _field_docs(cls).get(name, "")
    return head + "\n" + textwrap.fill(" ".join(doc.split()), width=100, initial_indent="  ", subsequent_indent="  ")


def help_text(config_path: str | None, overrides: list[str], key: str | None = None) -> str:
    """What --help-config prints: every key (with the values of config_path + overrides, when given),
    or with `key` the whole text of that key. `key` holding "=" is an override argparse took as KEY."""
    if key is not None and "=" in key:
        overrides, key = [key, *overrides], None
    cfg = load_config(config_path, overrides) if config_path is not None or overrides else None
    if key is not None:
        return describe_key(key, cfg)
    if cfg is None:
        return describe() + "\n(`--help-config KEY` prints the whole text of one key)"
    given = " ".join([config_path or "defaults", *overrides])
    return (f"# the values of {given}; (default X) follows a value that differs from its default; "
            f"`--help-config KEY` prints the whole text of one key\n" + describe(cfg))


def _nearest(word: str, options) -> str | None:
    """The option closest to a misspelt name (difflib's ratio >= 0.6), or None."""
    found = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


def _all_keys() -> dict[str, list[str]]:
    """{section: its keys} of every typed section (deepspeed is free-form, growth a list)."""
    return {f.name: list(get_type_hints(f.default_factory)) for f in fields(Config)
            if f.name not in ("deepspeed", "growth")}


def _key_hint(section: str, key: str) -> str:
    """' did you mean S.K?' for an unknown key: the key nearest by name over all sections, its own
    section first on a tie (train.seq_length -> model.seq_length); '' when nothing is near."""
    scored = [(difflib.SequenceMatcher(None, key, k).ratio(), s == section, f"{s}.{k}")
              for s, keys in _all_keys().items() for k in keys]
    ratio, _, best = max(scored)
    return f" did you mean {best}?" if ratio >= 0.6 else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)) and (value is None or (isinstance(value, str)
                                                               and value.lower() in ("none", "null"))):
            return None  # Optional
        if len(args) == 1:
            return _coerce(value, args[0], key)
        for a in args:  # e.g. bool or "auto": the first type the value fits
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        kinds = ["true/false" if a is bool else "/".join(map(str, get_args(a))) if get_origin(a) is Literal
                 else a.__name__ for a in args]
        raise ConfigError(f"{key}={value!r} is not valid; choose {' or '.join(kinds)}")
    if origin is list:  # a list of plain values (eval.tasks): [a, b] in YAML or on the command line, or a,b
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is not a list; write it as [a, b]")
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is not a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _items(value: Any, cls: type, key: str, origin: str, example: str, what: str,
           required: tuple[str, ...] = ()) -> list:
    """A list config value (`growth`, `data.blend`): each item a mapping of `cls`'s keys."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key} ({origin}) must be a list of {what} like {example}")
    hints, items = get_type_hints(cls), []
    for i, item in enumerate(value):
        missing = [k for k in required if k not in item]
        if missing:
            raise ConfigError(f"{key}[{i}] ({origin}) lacks {' and '.join(missing)}; each item needs "
                              f"{', '.join(required)}, e.g. {example}")
        obj = cls()
        for name, v in item.items():
            if name not in hints:
                near = _nearest(str(name), hints)
                hint = f" did you mean {key}[{i}].{near}?" if near else ""
                raise ConfigError(f"unknown key '{name}' in {key}[{i}] ({origin});{hint} keys are: {', '.join(hints)}")
            setattr(obj, name, _coerce(v, hints[name], f"{key}[{i}].{name}"))
        items.append(obj)
    return items


def _growth(value: Any, origin: str) -> list[GrowthStage]:
    return _items(value, GrowthStage, "growth", origin,
                  "[{at_step: 100, qkv_tokens: 256, proj_tokens: 256, ffn_tokens: 1024}]", "stages")


def _blend(value: Any, origin: str) -> list[BlendSource]:
    # A weight left out would silently count as 1: both keys are required.
    return _items(value, BlendSource, "data.blend", origin,
                  "[{path: data/a, weight: 0.7}, {path: data/b, weight: 0.3}]", "sources",
                  required=("path", "weight"))


# YAML 1.1 reads 5e8 or 1e-5 (no dot) as strings; in DeepSpeed's JSON config they are numbers.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _deepspeed_value(value: Any) -> Any:
    if isinstance(value, str) and _EXPONENT.fullmatch(value):
        f = float(value)
        return int(f) if f.is_integer() else f
    return [_deepspeed_value(v) for v in value] if isinstance(value, list) else value


def _set_deepspeed(tree: dict, path: list[str], value: Any, origin: str) -> None:
    """Set deepspeed.<path> (nested keys); a mapping merges key by key into what is there, so a
    command-line override of one key keeps the file's others."""
    node = _node(tree, path[:-1], origin)
    if isinstance(value, dict):
        if not isinstance(node.get(path[-1]), dict):
            node[path[-1]] = {}
        for k, v in value.items():
            _set_deepspeed(tree, [*path, str(k)], v, origin)
    else:
        node[path[-1]] = _deepspeed_value(value)


def _node(tree: dict, path: list[str], origin: str) -> dict:
    for i, k in enumerate(path):
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"deepspeed.{'.'.join(path[:i + 1])} is a value, not a section ({origin}); "
                              f"set it to a mapping (deepspeed.{'.'.join(path[:i + 1])}.<key>=...) or remove it")
    return tree


def _unknown_section(section: str, key: str | None, origin: str) -> None:
    """Raise the error for a section name that is not one, with the nearest one."""
    sections = [f.name for f in fields(Config)]
    near = _nearest(str(section), sections)
    hint = f" did you mean {near}{'.' + str(key) if key is not None else ''}?" if near else ""
    raise ConfigError(f"unknown config section '{section}' ({origin});{hint} sections are: {', '.join(sections)}")


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    sections = {f.name: f for f in fields(Config)}
    if section not in sections:
        _unknown_section(section, key, origin)
    if section == "deepspeed":  # free-form: DeepSpeed's own keys, checked in validation
        _set_deepspeed(cfg.deepspeed, str(key).split("."), value, origin)
        return
    sub = getattr(cfg, section)
    hints = get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(f"unknown config key '{section}.{key}' ({origin});{_key_hint(section, str(key))} "
                          f"keys of '{section}' are: {', '.join(hints)}")
    if (section, key) == ("data", "blend"):
        sub.blend = _blend(value, origin)
        return
    setattr(sub, key, _coerce(value, hints[key], f"{section}.{key}"))


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        name, _, raw = text.partition("=")
        owners = [s for s, keys in _all_keys().items() if name.strip() in keys]
        hint = f"; did you mean {' or '.join(f'{o}.{name.strip()}={raw}' for o in owners)}?" if owners else ""
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.steps=20{hint}")
    key, raw = text.split("=", 1)
    section, name = key.split(".", 1)
    # YAML parsing gives ints/floats/bools/null the same meaning as in the config file.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return section.strip(), name.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (may be None: defaults), then apply `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (pass --config configs/tiny.yml or another file)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
        for section, values in data.items():
            if section == "growth":
                cfg.growth = _growth(values, str(path))
                continue
            if section not in {f.name for f in fields(Config)}:
                _unknown_section(section, None, str(path))
            if not isinstance(values, dict):
                raise ConfigError(f"section '{section}' in {path} must be a mapping of key: value")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for text in overrides:
        if text.startswith("growth="):  # the whole list, in YAML flow style
            cfg.growth = _growth(yaml.safe_load(text.split("=", 1)[1]), "command line")
            continue
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the copy stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        if section == "growth":
            cfg.growth = _growth(values, "stored config")
            continue
        for key, value in values.items():
            _apply(cfg, section, key, value, "stored config")
    return cfg
