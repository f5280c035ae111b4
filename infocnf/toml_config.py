"""TOML reading, checking, writing, hashing and overrides shared by the run, LatentODE and density-check configs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

__all__ = [
    "ConfigFormat",
    "build_dataclass",
    "coerce_value",
    "to_plain",
    "config_to_dict",
    "flatten",
    "stable_hash",
    "read_toml_file",
    "load_toml_config",
    "save_toml_config",
    "parse_toml_value",
    "apply_dotted_overrides",
]

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class ConfigFormat:
    """Settings of one config family: its float checks and the wording of its error messages.

    The unknown-key templates may use ``{key}`` (the first unknown key), ``{where}`` (its dotted
    name), ``{table}`` (the dotted section, or ``top_table`` at the top level) and ``{accepted}``
    (the accepted keys, comma-separated). ``not_a_section`` may use ``{key}`` (the whole dotted
    override key), ``{part}`` (the part that is not a section) and ``{sections}`` (the top-level
    sections, comma-separated).
    """

    # Name of the top-level table in "invalid [...]: expected a table of settings".
    top_table: str
    # Message for an unknown key inside a section.
    unknown_key: str
    # Message for an override whose dotted key runs through a value that is not a section.
    not_a_section: str
    # A valid override shown in the message for one without "=", such as "train.lr=1e-3".
    override_example: str
    # Message for an unknown key at the top level, or None to use unknown_key.
    unknown_top_key: str | None = None
    # Reject NaN and infinity for float fields here, instead of leaving them to __post_init__.
    finite_floats: bool = False


def _qualify(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def build_dataclass(
    cls: type[ConfigT], raw: Any, config_format: ConfigFormat, section: str = "", base: ConfigT | None = None
) -> ConfigT:
    """Build ``cls`` from a TOML table, checking each value's type and rejecting unknown keys.

    ``section`` is the dotted name of the table, "" at the top level. Keys missing from ``raw``
    keep the values of ``base``, or the class defaults without it. A field whose default is a
    dataclass instance is a nested table built over that default, so a partial table keeps the
    default's other values. The dataclass's ``__post_init__`` checks the ranges.
    """
    table = section or config_format.top_table
    if not isinstance(raw, dict):
        raise ValueError(f"invalid [{table}]: expected a table of settings, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        template = config_format.unknown_key
        if not section and config_format.unknown_top_key is not None:
            template = config_format.unknown_top_key
        key = unknown[0]
        accepted = ", ".join(sorted(known))
        raise ValueError(template.format(key=key, where=_qualify(section, key), table=table, accepted=accepted))

    kwargs = {}
    for key, value in raw.items():
        where = _qualify(section, key)
        default = _field_default(known[key])
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            kwargs[key] = build_dataclass(type(default), value, config_format, where, base=default)
        else:
            kwargs[key] = coerce_value(default, value, where, finite_floats=config_format.finite_floats)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def coerce_value(default: Any, value: Any, where: str, *, finite_floats: bool = False) -> Any:
    """Check a TOML value against the type of its field's default and convert it to that type.

    TOML reads 1 as an integer and 1.0 as a float, so an integer is accepted for a float field and
    a whole float for an integer field, but true and false are accepted only for bool fields.
    Arrays become tuples. A default of any other type accepts the value unchanged.
    """
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"invalid {where} = {value!r}: expected true or false")
        return value
    if isinstance(value, bool) and isinstance(default, (int, float)):
        expected = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"invalid {where} = {value!r}: expected {expected}, not true or false")
    if isinstance(default, float):
        is_number = isinstance(value, (int, float)) and (not finite_floats or math.isfinite(value))
        if not is_number:
            raise ValueError(f"invalid {where} = {value!r}: expected a number")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise ValueError(f"invalid {where} = {value!r}: expected an integer")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"invalid {where} = {value!r}: expected a string")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"invalid {where} = {value!r}: expected a list")
        return tuple(value)
    return value


def to_plain(value: Any) -> Any:
    """Return ``value`` with tuples turned into lists at every depth, as TOML and JSON need."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a dataclass config as nested plain dictionaries (tuples as lists)."""
    return to_plain(dataclasses.asdict(config))


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """Return nested dictionaries as one dictionary with dotted keys, such as ``solver.rtol``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}.{sub_key}": sub for sub_key, sub in flatten(value).items()})
        else:
            out[key] = value
    return out


def stable_hash(data: dict[str, Any]) -> str:
    """Return the first 16 hex digits of the SHA-256 of ``data`` as JSON with sorted keys."""
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_toml_file(
    path: Path, missing_message: str, invalid_prefix: str, error: type[ValueError] = ValueError
) -> dict[str, Any]:
    """Parse a TOML file, raising ``error`` with ``missing_message`` if it is absent.

    Invalid TOML raises ``error`` with ``invalid_prefix``, a colon and the parser's message.
    """
    if not path.is_file():
        raise error(missing_message)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{invalid_prefix}: {exc}") from exc


def load_toml_config(path: str | Path, config_type: type[ConfigT], missing_hint: str) -> ConfigT:
    """Read a TOML config with ``config_type.from_dict``; every ValueError names the file.

    ``missing_hint`` follows "config file not found: PATH; " and names a file to pass instead.
    """
    path = Path(path)
    raw = read_toml_file(path, f"config file not found: {path}; {missing_hint}", f"invalid TOML in {path}")
    try:
        return config_type.from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def save_toml_config(config: Any, path: str | Path) -> None:
    """Write ``config.to_dict()`` to ``path`` as TOML."""
    Path(path).write_text(tomli_w.dumps(config.to_dict()))


def parse_toml_value(text: str) -> Any:
    """Parse an override value in TOML syntax (1e-3, true, "cpu", [32, 32]).

    Text that is not a TOML value, such as the bare word infocnf, is returned as a string.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_dotted_overrides(
    config: ConfigT, overrides: list[str] | dict[str, Any], config_format: ConfigFormat
) -> ConfigT:
    """Return a copy of ``config`` with dotted-key overrides applied, built by ``type(config).from_dict``.

    ``overrides`` is a list of ``"section.key=value"`` strings (values in TOML syntax) or a
    mapping of dotted keys to values. Every string is parsed before any override is applied.
    """
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            if "=" not in text:
                raise ValueError(
                    f"invalid override {text!r}: expected section.key=value, "
                    f"for example {config_format.override_example}"
                )
            key, value = text.split("=", 1)
            items.append((key.strip(), parse_toml_value(value.strip())))

    raw = config.to_dict()
    for key, value in items:
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                # An earlier override may have replaced a section by a value, so list the sections now.
                sections = ", ".join(sorted(k for k, v in raw.items() if isinstance(v, dict)))
                raise ValueError(config_format.not_a_section.format(key=key, part=part, sections=sections))
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"unknown setting {key!r}: known keys here are {', '.join(sorted(node))}")
        node[parts[-1]] = value
    return type(config).from_dict(raw)
