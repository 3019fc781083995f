"""Validated registries for pluggable components (generators, descriptors, tests).

Unlike registries that silently ignore unknown settings, every entry declares
its options with a type and default, and anything unknown is rejected with the
list of what is allowed: a typo must never turn into a silently different audit.
"""
from __future__ import annotations

import importlib

from dataclasses import dataclass, field
from typing import Any, Callable


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Option:
    """One declared option: a type to coerce strings with, a default, a help line, and an optional check."""
    type: type
    default: Any
    help: str = ""
    check: Callable[[Any], bool] | None = None
    check_msg: str = ""


# The check of a seed option: numpy's and torch's generators take seeds in [0, 2**63).
SEED_CHECK = dict(check=lambda v: 0 <= v < 2 ** 63, check_msg="must lie in [0, 2**63)")


@dataclass
class Entry:
    """A registered component: a factory and the options it accepts."""
    name: str
    factory: Callable[..., Any]
    options: dict[str, Option] = field(default_factory=dict)
    help: str = ""


def _coerce(name: str, opt: Option, value: Any, where: str) -> Any:
    if isinstance(value, opt.type) and not (opt.type is int and isinstance(value, bool)):
        v = value
    elif opt.type is bool and isinstance(value, str):
        low = value.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"{where}: option {name}={value!r} is not a boolean; use true or false")
        v = low in ("1", "true", "yes")
    else:
        try:
            v = opt.type(float(value)) if opt.type is int and isinstance(value, str) and "e" in value.lower() else opt.type(value)
        except (TypeError, ValueError, OverflowError):    # OverflowError: int(inf), int("1e999")
            raise ConfigError(f"{where}: option {name}={value!r} is not a valid {opt.type.__name__}") from None
        if opt.type is int and isinstance(value, (float, str)) and float(value) != v:
            raise ConfigError(f"{where}: option {name}={value!r} must be a whole number")
    if opt.check is not None and not opt.check(v):
        raise ConfigError(f"{where}: option {name}={v!r} {opt.check_msg or 'is out of range'}")
    return v


class Registry:
    """Name -> Entry, with option validation at build time."""

    def __init__(self, kind: str, plugins: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._prefixes: dict[str, Entry] = {}
        self._plugins = list(plugins)   # modules that register more entries, imported on first read

    def _load_plugins(self) -> None:
        while self._plugins:
            importlib.import_module(self._plugins.pop(0))

    def register(self, name: str, options: dict[str, Option] | None = None, help: str = "",
                 prefix: bool = False):
        """Decorator. With prefix=True the name is a scheme: 'NAME:ARG' passes ARG as first argument."""
        def deco(factory):
            if name in self._entries or name in self._prefixes:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            entry = Entry(name, factory, dict(options or {}), help)
            (self._prefixes if prefix else self._entries)[name] = entry
            return factory
        return deco

    def names(self) -> list[str]:
        """Every registered name; schemes are shown as 'scheme:ARG'."""
        self._load_plugins()
        return sorted(self._entries) + sorted(f"{p}:ARG" for p in self._prefixes)

    def lookup(self, spec: str) -> tuple[Entry, str | None]:
        """Find the entry for a spec; raises ConfigError listing the known names."""
        self._load_plugins()
        if spec in self._entries:
            return self._entries[spec], None
        scheme, sep, arg = spec.partition(":")
        if sep and scheme in self._prefixes and arg:
            return self._prefixes[scheme], arg
        raise ConfigError(f"unknown {self.kind} {spec!r}; choose one of: {', '.join(self.names())}")

    def resolve_options(self, spec: str, options: dict[str, Any] | None) -> dict[str, Any]:
        """Validated, fully defaulted options for a spec (unknown keys rejected)."""
        entry, _ = self.lookup(spec)
        options = dict(options or {})
        unknown = sorted(set(options) - set(entry.options))
        if unknown:
            allowed = ", ".join(sorted(entry.options)) or "(none)"
            raise ConfigError(f"{self.kind} {spec!r} has no option {unknown[0]!r}; allowed: {allowed}")
        where = f"{self.kind} {spec!r}"
        return {k: _coerce(k, o, options.get(k, o.default), where) for k, o in entry.options.items()}

    def build(self, spec: str, options: dict[str, Any] | None = None):
        """Instantiate a component from its spec and (string or typed) options."""
        entry, arg = self.lookup(spec)
        opts = self.resolve_options(spec, options)
        return entry.factory(arg, **opts) if arg is not None else entry.factory(**opts)


def parse_kv(pairs: list[str] | None, what: str) -> dict[str, str]:
    """Parse CLI KEY=VALUE strings; a malformed one is a ConfigError that shows the expected form."""
    out: dict[str, str] = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"{what} {p!r} is not KEY=VALUE (example: {what} dim=128)")
        out[k.strip()] = v.strip()
    return out


def require_torch(what: str):
    """torch, or a ConfigError saying how to get it (torch is an optional dependency)."""
    try:
        import torch
    except ImportError:
        raise ConfigError(f"{what} needs torch, which is not installed; install the build for your machine "
                          "(pip install torch, or the CUDA build on a GPU node) or choose a model format that "
                          "needs no torch (`modeaudit list`)") from None
    return torch
