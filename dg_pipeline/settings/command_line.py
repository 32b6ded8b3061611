"""The command line, checked before any work: a bad override is one InputError naming the key, what it takes, and
for an unknown key the close matches (`trainer.max_step=5` -> did you mean trainer.max_steps?)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Sequence

from omegaconf import OmegaConf

from dg_pipeline.core.errors import InputError

# omegaconf's type names in its conversion errors -> what the key takes
_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def check_command_line(overrides: Sequence[str]) -> None:
    """Compose `overrides` as `python -m dg_pipeline` would; raise InputError with one clear line if it fails."""
    from dg_pipeline.settings import compose

    try:
        compose([o for o in overrides if not o.lstrip("+~").startswith("hydra.")])
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many kinds; each is explained below
        message = explain_composition_error(e)
        if message is None:
            raise
        raise InputError(message) from None


def explain_composition_error(error: BaseException) -> str | None:
    """One line for a failed composition (unknown key, wrong type, unknown group option, bad syntax); None when the
    error is none of these."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    chain, e = [], error
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        full_key = getattr(e, "full_key", None)
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and full_key:
            return unknown_key_message(str(full_key))
        if isinstance(e, ValidationError) and full_key:
            value = getattr(e, "value", None)
            wanted = next((w for t, w in _TYPE_WORDS.items() if f"converted to {t}" in str(e.msg)), None)
            default = _schema_default(str(full_key))
            example = f" (its default: {full_key}={default})" if default is not None else ""
            what = f"must be {wanted}" if wanted else str(e.msg).splitlines()[0]
            return f"{full_key}={value}: {what}{example}"
        if isinstance(e, MissingConfigException):
            options = list(getattr(e, "options", None) or [])
            first = str(e).strip().splitlines()[0]
            return first + (f"; choose one of {', '.join(sorted(options))}" if options else "")
        if isinstance(e, OverrideParseException):
            return f"{str(e).strip().splitlines()[0]} (overrides are key=value, e.g. trainer.max_steps=500)"
    return None


def unknown_key_message(full_key: str) -> str:
    suggestions = close_keys(full_key)
    hint = f"; did you mean {' or '.join(suggestions)}?" if suggestions else ""
    parent = full_key.rpartition(".")[0]
    listing = f" (the {parent} keys: {', '.join(_children(parent))})" if parent and _children(parent) else ""
    return f"{full_key}: unknown key{hint}{listing}"


def close_keys(full_key: str, n: int = 3) -> list[str]:
    """The schema's keys closest to `full_key` (its group's keys first, then any key of the same leaf name)."""
    keys = all_keys()
    parent, _, leaf = full_key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    near = [f"{parent}.{m}" if parent else m
            for m in difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=n, cutoff=0.6)]
    elsewhere = difflib.get_close_matches(full_key, keys, n=n, cutoff=0.75)
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf and k != full_key]
    out = []
    for k in near + same_leaf + elsewhere:
        if k not in out:
            out.append(k)
    return out[:n]


def all_keys() -> list[str]:
    """Every dotted key of the schema (RunSettings)."""
    from dg_pipeline.settings import RunSettings

    def walk(cls, prefix: str):
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from walk(type(default), f"{key}.")
            else:
                yield key

    return list(walk(RunSettings, ""))


def _children(parent: str) -> list[str]:
    return [k.rpartition(".")[2] for k in all_keys() if k.rpartition(".")[0] == parent]


def _schema_default(full_key: str):
    from dg_pipeline.settings import RunSettings

    try:
        value = OmegaConf.select(OmegaConf.structured(RunSettings), full_key)
    except Exception:  # noqa: BLE001 - a key the schema cannot select has no default to show
        return None
    return None if OmegaConf.is_config(value) else value
