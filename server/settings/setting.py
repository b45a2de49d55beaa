"""One server setting, declared once as a field of `ServerConfig` with `setting(...)`: its default, help, README
text and check. Its flag, its `VEXPRESS_*` variable, the conversion of their text and its README row are read
from that one declaration (`table()`), as `GenerationParams`' fields are read from `LIMITS`.

A setting's type is its annotation: `int`, `float`, `str` (or `str | None`), `bool` (a flag without a value) or a
`list` (a repeatable flag; several values in one variable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from vexpress_rt.errors import InputError

ENV_PREFIX = "VEXPRESS_"
# (the flag as messages spell it, the value) -> the value to keep, normalised; raises ConfigError
Check = Callable[[str, Any], Any]


class ConfigError(InputError):
    """A setting that cannot be used (bad value, unknown address...)."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """What is declared about one setting; `name`, `kind` and `default` come from its dataclass field."""

    help: str  # the flag's --help text; the default and the variable are added to it
    doc: str | None = None  # the README row's text; None: the setting shares the row above
    shown: str | None = None  # the default as the docs read it (markdown) when its value does not say it; "": the
    # row's first default covers it
    check: Check | None = None
    item: Callable[[Any], Any] | None = None  # a list setting: each item parsed (a flag's text or a variable's)
    flag_type: Callable[[str], Any] | None = None  # argparse type= in place of int/float (fails at parsing)
    dashed: bool = False  # the docs and messages spell the flag --with-dashes (both spellings always work)
    negated: bool = False  # a bool that is on by default: the flag is --no_<name> (its variable works too)
    name: str = ""
    kind: type = str
    default: Any = None

    @property
    def flag(self) -> str:
        """The flag as the docs and messages spell it."""
        name = f"no_{self.name}" if self.negated else self.name
        return "--" + (name.replace("_", "-") if self.dashed else name)

    @property
    def spellings(self) -> list[str]:
        name = f"no_{self.name}" if self.negated else self.name
        return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def env_names(self) -> tuple[str, ...]:
        """Its variables: a negated setting also reads `VEXPRESS_NO_<NAME>=1`, as its flag."""
        return (self.env, f"{ENV_PREFIX}NO_{self.name.upper()}") if self.negated else (self.env,)

    def convert(self, value: Any, from_env: bool = False) -> Any:
        """A flag's value, a variable's text (`from_env`) or a Python value, as the setting's type."""
        try:
            if self.kind is list:
                if from_env:
                    items = split_env_list(value)
                else:
                    items = [value] if isinstance(value, str) else list(value)
                return [self.item(i) for i in items] if self.item else items
            if self.kind is bool:
                return parse_bool(value) if isinstance(value, str) else bool(value)
            return self.kind(value)
        except ValueError as exc:
            raise ConfigError(f"{self.name}: {exc}") from exc

    def add_flag(self, parser: argparse.ArgumentParser) -> None:
        """Its flag, both spellings, with default None so that a given flag is told from an absent one."""
        kw: dict[str, Any] = {}
        if self.kind is bool:
            kw = {"action": "store_const", "const": not self.negated}
        elif self.kind is list:
            kw = {"action": "append"}
        elif self.kind in (int, float):
            kw = {"type": self.flag_type or self.kind}
        default = "" if self.kind is bool else self.default_text(markdown=False)
        env = f"{self.env_names[1]}=1, or {self.env}=0" if self.negated else self.env
        help = self.help + (f"; default: {default}" if default else "") + f" (env {env})"
        parser.add_argument(*self.spellings, dest=self.name, default=None, help=help, **kw)

    def default_text(self, markdown: bool = True) -> str:
        """The default as the README's table (markdown) or --help shows it."""
        if self.shown is not None:
            text = self.shown
        elif self.kind is bool:
            text = "off"  # the flag not given (a negated flag's default is its setting on)
        elif self.default is None or self.default == []:
            text = "none"
        elif isinstance(self.default, float):
            text = f"{self.default:g}"
        elif isinstance(self.default, int):
            text = str(self.default)
        else:
            text = f"`{self.default}`"
        return text if markdown else text.replace("`", "")


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A `ServerConfig` field: its default and its declaration (the keywords of `Setting`)."""
    metadata = {"setting": Setting(help, **declared)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def table(cls: type) -> tuple[Setting, ...]:
    """Every setting of the dataclass `cls`, in declaration order, with its name, type and default filled in."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get("setting")
        if not isinstance(declared, Setting):
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting(default, help, ...)")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(dataclasses.replace(declared, name=f.name, kind=_kind(hints[f.name]), default=default))
    return tuple(out)


def _kind(hint: Any) -> type:
    """int, float, bool, str or list (any list, or a union with one: repeatable) from a field's annotation."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    options = tuple(typing.get_origin(o) or o for o in options if o is not type(None))
    if list in options:
        return list
    if len(options) == 1 and options[0] in (int, float, bool, str):
        return options[0]
    raise TypeError(f"a setting's annotation must be int, float, bool, str or a list, not {hint}")


def split_env_list(value: str) -> list[str]:
    """Several values in one variable: separated by spaces or commas, or a JSON array."""
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"cannot parse JSON list {value!r}: {exc}") from exc
        return [json.dumps(i) if isinstance(i, dict) else str(i) for i in items]
    return [v for v in re.split(r"[\s,]+", value) if v]


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


# --- checks shared by several settings ---------------------------------------------------------------------------


def positive(flag: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{flag} must be positive")
    return value


def off_or_positive(flag: str, value: float) -> float:
    if value < 0:
        raise ConfigError(f"{flag} must be 0 (off) or positive")
    return value


def at_least_one(flag: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{flag} must be at least 1")
    return value


def integer_from(low: int, high: int) -> Check:
    def check(flag: str, value: int) -> int:
        if not low <= value <= high:
            raise ConfigError(f"{flag} must be an integer from {low} to {high}")
        return value

    return check


def one_of(choices: tuple[str, ...]) -> Check:
    def check(flag: str, value: str) -> str:
        if value not in choices:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(choices)}")
        return value

    return check


def stripped(flag: str, values: list[str]) -> list[str]:
    """A repeatable setting's values without blanks (an empty item in a variable is no item)."""
    return [v.strip() for v in values if v.strip()]


def empty_is_none(flag: str, value: str | None) -> str | None:
    return value or None
