"""A model registry in object storage: published versions, and aliases that say which one labels the books.

    <registry>/<name>/<model_version>/          an artifact (clf_core.model.artifact), published once
    <registry>/<name>/aliases/<alias>.json      {"version": "v...", "history": [{at, who, action, from, to, why}, ...]}

`jobs.train --registry URI --name NAME` publishes under URI/NAME/<model_version>/ (the version is
the artifact's content hash, so the same model never lands twice); `jobs.promote` moves the alias
`champion` after its gate; the scoring jobs take `--model URI/NAME@champion` and resolve it once,
at start. "A model was trained" and "this model labels our books" are two separate steps.

An alias is one small JSON object, written only if nobody wrote it since it was read: on S3 a
conditional PUT (If-Match the ETag that was read; If-None-Match for the first promotion), on a
local disk the same check under an exclusive lock. Of two promotions at once, exactly one wins;
the other is told who won and the alias is left as the winner wrote it. The object keeps its
whole history, so a rollback knows the previous champion and an audit knows who moved it, when,
from what, to what and why.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from clf_core import storage
from clf_core.errors import ClfError, ConfigError

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
VERSION = re.compile(r"^v[0-9a-f]{12}$")
ALIASES = "aliases"
CHAMPION = "champion"


class AliasConflict(ClfError):
    """Another promotion wrote the alias between this one's read and its write: nothing changed."""


def check_name(flag: str, value: str) -> str:
    if not NAME.match(value or ""):
        raise ConfigError(f"{flag} {value!r}: use letters, digits, '.', '_' or '-' (e.g. income-expense)")
    return value


def version_uri(registry: str, name: str, version: str) -> str:
    return storage.join(registry, name, version)


@dataclass(frozen=True)
class ModelRef:
    """What --model names: an artifact's path, or a registry's model at an alias."""
    uri: str                       # the artifact to load
    registry: str = ""
    name: str = ""
    alias: str = ""

    def describe(self) -> str:
        return f"{self.registry}/{self.name}@{self.alias} = {self.uri}" if self.alias else self.uri


def resolve_model(value: str) -> ModelRef:
    """`URI/NAME@ALIAS` -> the version the alias points at now (read once: a promotion later in the
    run changes nothing for it); anything else is an artifact path, returned as it is."""
    head, _, last = value.rstrip("/").rpartition("/")
    if "@" not in last:
        return ModelRef(value)
    name, _, alias = last.partition("@")
    registry = head
    if not registry or not name or not alias:
        raise ConfigError(f"--model {value!r}: expected REGISTRY/NAME@ALIAS, e.g. s3://models/income-expense@champion")
    state = Alias(registry, name, alias).read()[0]
    if state is None:
        known = Alias.names(registry, name)
        raise ConfigError(f"--model {value!r}: model {name!r} of registry {registry} has no alias {alias!r} "
                          f"(its aliases: {', '.join(known) or 'none: promote a version first with python -m jobs.promote'})")
    ref = ModelRef(version_uri(registry, name, state["version"]), registry, name, alias)
    log.info("model %s@%s is version %s (%s)", name, alias, state["version"], ref.uri)
    return ref


def versions(registry: str, name: str) -> list[str]:
    """The versions published under REGISTRY/NAME (those with a manifest)."""
    fs, path = storage.filesystem(storage.join(registry, name))
    fs.invalidate_cache()
    if not fs.isdir(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                  if VERSION.match(p.rstrip("/").rsplit("/", 1)[-1]) and fs.exists(f"{p.rstrip('/')}/manifest.json"))


def names(registry: str) -> list[str]:
    fs, path = storage.filesystem(registry)
    fs.invalidate_cache()
    if not fs.isdir(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))


def latest(registry: str, name: str) -> str | None:
    """The version published last (by its manifest's created_at), None if none."""
    found = []
    for version in versions(registry, name):
        manifest = json.loads(storage.read_text(storage.join(version_uri(registry, name, version), "manifest.json")))
        found.append((manifest.get("created_at", ""), version))
    return max(found)[1] if found else None


def check_version(registry: str, name: str, version: str, flag: str = "--candidate") -> str:
    """The artifact URI of a published version (`latest`: the one published last), or a ClfError
    naming what the registry holds."""
    if not names(registry) or name not in names(registry):
        raise ClfError(f"registry {registry} holds no model named {name!r} (names: {', '.join(names(registry)) or 'none'}); "
                       f"publish one with python -m jobs.train --registry {registry} --name {name}")
    if version == "latest":
        version = latest(registry, name) or version
    published = versions(registry, name)
    if version not in published:
        raise ClfError(f"{flag} {version!r}: not a published version of {registry}/{name} (versions: "
                       f"{', '.join(published) or 'none'})")
    return version_uri(registry, name, version)


class Alias:
    """REGISTRY/NAME/aliases/ALIAS.json, read and written with its ETag (see the module docstring)."""

    def __init__(self, registry: str, name: str, alias: str = CHAMPION):
        self.registry, self.name, self.alias = registry, check_name("--name", name), check_name("alias", alias)
        self.uri = storage.join(registry, name, ALIASES, f"{alias}.json")

    @staticmethod
    def names(registry: str, name: str) -> list[str]:
        fs, path = storage.filesystem(storage.join(registry, name, ALIASES))
        fs.invalidate_cache()
        if not fs.isdir(path):
            return []
        return sorted(p.rsplit("/", 1)[-1][:-5] for p in fs.ls(path, detail=False) if p.endswith(".json"))

    def read(self) -> tuple[dict | None, str | None]:
        """(the alias, its ETag), or (None, None) when it does not exist yet."""
        fs, path = storage.filesystem(self.uri)
        fs.invalidate_cache()
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None, None
        etag = fs.info(path).get("ETag") if storage.is_remote(self.uri) else hashlib.sha256(data).hexdigest()
        try:
            return json.loads(data), etag
        except ValueError as exc:
            raise ClfError(f"alias {self.uri} is not valid JSON ({exc}); restore it from the bucket's versioning "
                           f"or promote again") from exc

    def write(self, state: dict, etag: str | None) -> None:
        """Write `state` if the alias still has `etag` (None: if it still does not exist); else
        AliasConflict, and nothing is written."""
        data = json.dumps(state, indent=2, sort_keys=True).encode()
        fs, path = storage.filesystem(self.uri)
        if storage.is_remote(self.uri):
            if not self.uri.startswith("s3://"):
                raise ConfigError(f"alias {self.uri}: a registry is a local folder or s3:// (conditional writes)")
            try:
                fs.pipe_file(path, data, **({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}))
            except (FileExistsError, OSError) as exc:
                if "pre-condition" in str(exc) or isinstance(exc, FileExistsError):
                    raise AliasConflict(self._conflict()) from exc
                raise
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            current = Path(path).read_bytes() if Path(path).exists() else None
            if (hashlib.sha256(current).hexdigest() if current is not None else None) != etag:
                raise AliasConflict(self._conflict())
            tmp = Path(path).with_name(f".{self.alias}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    @contextlib.contextmanager
    def _locked(self):
        lock = Path(storage.filesystem(self.uri)[1]).with_name(f".{self.alias}.lock")
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _conflict(self) -> str:
        state = self.read()[0] or {}
        last = (state.get("history") or [{}])[-1]
        return (f"{self.name}@{self.alias} was moved by another promotion while this one ran (now {state.get('version')}, "
                f"by {last.get('who')} at {last.get('at')}); nothing was changed. Run the promotion again to compare "
                f"with the new {self.alias}.")

    def move(self, to: str, why: str, action: str, etag: str | None, state: dict | None) -> dict:
        """Point the alias at version `to`, appending to its history; conditional on `etag`."""
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "who": who(), "action": action,
                 "from": state.get("version") if state else None, "to": to, "why": why}
        new = {"version": to, "history": [*(state or {}).get("history", []), entry]}
        self.write(new, etag)
        log.info("%s/%s@%s: %s -> %s (%s)", self.registry, self.name, self.alias, entry["from"], to, action)
        return new


def who() -> str:
    try:
        return os.environ.get("CLF_WHO") or getpass.getuser()
    except Exception:  # a container with no user name
        return "unknown"


def previous(state: dict | None) -> str | None:
    """The champion before the current one: what the promotion that made the current version
    champion replaced (a rollback goes back to it; a second rollback goes further back)."""
    if not state:
        return None
    for entry in reversed(state.get("history", [])):
        if entry.get("to") == state["version"] and entry.get("action", "").startswith("promote"):
            return entry.get("from")
    return None
