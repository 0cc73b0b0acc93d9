"""One way to declare a setting: a dataclass field with its help, its flag and its rule. Flags,
`--help`, YAML keys and the checks all come from that one declaration.

    @dataclass
    class LabelSettings:
        actors: int = setting("Scoring actors (production: one per GPU).", at_least=1, default=1)
        compile: str = setting("...", choices=("auto", "on", "off"), default="auto")
        model: str = setting("...", required=True, hint="a local path or s3:// URI", default="")

    add_arguments(parser, LabelSettings)   # --actors, typed, with its help and default
    settings = from_args(LabelSettings, args)
    check(settings)                        # one ConfigError naming every bad value and its fix

A rule is `required` (a non-empty string or list), `choices`, bounds (`at_least` / `above` below,
`at_most` / `below` above: "[0, 1)" is at_least=0, below=1) and a `pattern` (a regular
expression the value must match, `hint` naming an example). A check a declaration cannot say
(two flags that exclude each other, a value that depends on another) is passed to `check` as an
extra problem. ClassifierConfig (clf_core.model.config) adds YAML files and dotted
`--set section.field=value` overrides on top of the same fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Callable

from clf_core.errors import ConfigError

RULES = ("required", "choices", "at_least", "above", "at_most", "below", "pattern")


def setting(help: str, *, flag: str | None = None, hint: str = "", **kwargs: Any) -> Any:
    """A dataclass field carrying its help text, the flag a job exposes it under (default:
    `--field-name`; config fields only where a job shows them), and its rule (RULES, see the
    module docstring); `hint` ends the message of a broken rule (e.g. "e.g. 1024")."""
    metadata: dict[str, Any] = {"help": help, "hint": hint}
    if flag:
        metadata["flag"] = flag
    for rule in RULES:
        if rule in kwargs:
            metadata[rule] = kwargs.pop(rule)
    return dataclasses.field(metadata=metadata, **kwargs)


def _range(meta: dict) -> str:
    n = {k: f"{meta[k]:g}" for k in ("at_least", "above", "at_most", "below") if k in meta}
    low = f"[{n['at_least']}" if "at_least" in n else f"({n['above']}" if "above" in n else None
    high = f"{n['at_most']}]" if "at_most" in n else f"{n['below']})" if "below" in n else None
    if low and high:
        return f"must be in {low}, {high}"
    if "at_least" in n:
        return "must be >= 0" if meta["at_least"] == 0 else f"must be at least {n['at_least']}"
    if "above" in n:
        return "must be positive" if meta["above"] == 0 else f"must be > {n['above']}"
    return f"must be at most {n['at_most']}" if "at_most" in n else f"must be < {n['below']}"


def broken_rule(meta: dict, value: Any) -> str | None:
    """Why `value` breaks the field's declared rule (None: it keeps it)."""
    empty = value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, (list, tuple))
                                                                                and not value)
    if meta.get("required") and empty:
        return "is required"
    if empty and "pattern" in meta:
        return None   # an optional value left empty
    if "choices" in meta and value not in meta["choices"]:
        return "allowed: " + ", ".join(map(str, meta["choices"]))
    if "pattern" in meta and not re.fullmatch(meta["pattern"], str(value)):
        return "not of the expected form"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low_ok = value >= meta["at_least"] if "at_least" in meta else value > meta["above"] if "above" in meta else True
        high_ok = value <= meta["at_most"] if "at_most" in meta else value < meta["below"] if "below" in meta else True
        if not (low_ok and high_ok):
            return _range(meta)
    return None


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _as_flag(f: dataclasses.Field, value: Any, why: str) -> str:
    shown = f"{value!r}" if isinstance(value, str) else f"{value}"
    return f"{flag_of(f)} is required" if why == "is required" else f"{flag_of(f)} {shown}: {why}"


def problems(obj: Any, name: Callable[[dataclasses.Field, Any, str], str] = _as_flag) -> list[str]:
    """One message per field that breaks its declared rule, naming the field (its flag, or what
    `name` makes of it), the value, the rule and the field's hint."""
    found = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        why = broken_rule(f.metadata, value)
        if why is not None:
            hint = f.metadata.get("hint")
            if why == "not of the expected form" and hint:   # the hint says the form: "expected NS.TABLE"
                found.append(name(f, value, hint))
            else:
                found.append(name(f, value, why) + (f" ({hint})" if hint else ""))
    return found


def check(obj: Any, extra: list[str] | tuple[str, ...] = (), what: str = "invalid arguments") -> Any:
    """`obj` if it keeps every declared rule and `extra` is empty; else one ConfigError listing
    every problem with its fix, before any worker starts."""
    found = problems(obj) + list(extra)
    if found:
        raise ConfigError(f"{what}:\n  - " + "\n  - ".join(found))
    return obj


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  skip: tuple[str, ...] = (), dest_prefix: str = "", flagged_only: bool = False) -> None:
    """One typed flag per field of the settings dataclass `cls`, its help from the field. With
    `dest_prefix` (a config section), only fields that declare a flag when `flagged_only`, each
    stored as `<prefix>.<field>` with no default, so that a flag left out keeps the YAML's value."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (flagged_only and "flag" not in f.metadata):
            continue
        kind, dest = hints[f.name], f"{dest_prefix}.{f.name}" if dest_prefix else f.name
        text = f.metadata["help"] + (f" [{dest}]" if dest_prefix else "")
        if kind is bool and not dest_prefix:
            parser.add_argument(flag_of(f), dest=dest, action="store_true", help=text)
        elif typing.get_origin(kind) is list and not dest_prefix:
            parser.add_argument(flag_of(f), dest=dest, action="append", default=[], help=text)
        elif dest_prefix:
            parser.add_argument(flag_of(f), dest=dest, help=text)   # parsed and checked by the config
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = f" (default: {default!r})" if default not in ("", None) else ""
            parser.add_argument(flag_of(f), dest=dest, type=kind if kind in (int, float) else _optional(kind),
                                default=default, help=text + shown)


def _optional(kind):
    """float | None -> float, for a flag whose default is None (not given)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args and args[0] in (int, float) else str


def from_args(cls: type, args: argparse.Namespace):
    """The settings dataclass `cls` from parsed flags (fields with no flag keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
