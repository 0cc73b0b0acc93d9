"""One way to declare a setting: a dataclass field with its help (and, for a config field a job
exposes, its flag). Flags, `--help` text and YAML all come from that one declaration.

    @dataclass
    class LabelSettings:
        actors: int = setting("Scoring actors (production: one per GPU).", default=1)

    add_arguments(parser, LabelSettings)          # --actors, typed, help with its default
    settings = from_args(LabelSettings, args)     # the dataclass back from the parsed flags

Each settings class checks its own values in `validate()`, which raises one `ConfigError` naming
every bad value and its fix, before any worker starts. `ClassifierConfig` (clf_core.model.config) adds
YAML files and dotted `--set section.field=value` overrides on top of the same fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def setting(help: str, *, flag: str | None = None, at_least: float | None = None, above: float | None = None,
            hint: str = "", **kwargs: Any) -> Any:
    """A dataclass field carrying its help text and its bounds. `flag` is for config fields that a
    job exposes under a short name of its own (e.g. `--lr` for train.lr); job settings get
    `--field-name`. `at_least` / `above` are checked by `bound_problems`, whose message ends with
    `hint` (e.g. "e.g. 1024")."""
    metadata: dict[str, Any] = {"help": help, "hint": hint}
    if flag:
        metadata["flag"] = flag
    if at_least is not None:
        metadata["at_least"] = at_least
    if above is not None:
        metadata["above"] = above
    return dataclasses.field(metadata=metadata, **kwargs)


def bound_problems(settings: Any) -> list[str]:
    """One message per field outside its declared bounds, naming the flag, the value and the fix."""
    problems = []
    for f in dataclasses.fields(settings):
        value, meta = getattr(settings, f.name), f.metadata
        if "at_least" in meta and value < meta["at_least"]:
            need = "must be >= 0" if meta["at_least"] == 0 else f"must be at least {meta['at_least']}"
        elif "above" in meta and value <= meta["above"]:
            need = f"must be > {meta['above']}"
        else:
            continue
        problems.append(f"{flag_of(f)} {value}: {need}" + (f" ({meta['hint']})" if meta.get("hint") else ""))
    return problems


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  skip: tuple[str, ...] = ()) -> None:
    """One typed --flag per field of the settings dataclass `cls`, its help from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag_of(f), dest=f.name, action="store_true", help=f.metadata["help"])
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = f" (default: {default!r})" if default not in ("", None) else ""
            parser.add_argument(flag_of(f), dest=f.name, type=kind if kind in (int, float) else str,
                                default=default, help=f.metadata["help"] + shown)


def from_args(cls: type, args: argparse.Namespace):
    """The settings dataclass `cls` from parsed flags (fields with no flag keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
