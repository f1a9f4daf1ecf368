"""Building a command's frozen config dataclass from a file, CLI flags and --set overrides.

Each command defines one small frozen dataclass with a docstring under every field. The CLI
parses once: values from `--config FILE` (JSON or TOML), then explicit flags, then
`--set KEY=VALUE`; an unknown key anywhere is an error that lists the valid ones. The resolved
config is saved beside every artefact (the dump's manifest, checkpoints' meta.json).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from shared.errors import UserError

ConfigT = TypeVar("ConfigT")


def read_config_file(path: Path) -> dict[str, Any]:
    """Key/values from a .json or .toml config file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: pass an existing .json or .toml file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise UserError(f"config file {path} must end in .json or .toml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"config file {path} does not parse ({error}): fix its syntax") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a table/object of key = value pairs")
    return values


def _coerce(text: str, annotation: Any, key: str) -> Any:
    """Turn a --set string into the field's type (int, float, bool, str, optional, tuple)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _coerce(text, options[0], key)
    if origin is tuple:
        (item_type, *_) = typing.get_args(annotation)
        return tuple(_coerce(part.strip(), item_type, key) for part in text.split(",") if part)
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if annotation in (int, float, str):
            return annotation(text)
    except ValueError:
        raise UserError(
            f"--set {key}={text}: {text!r} is not a valid {annotation.__name__}"
        ) from None
    return text


def parse_set_options(config_class: type, assignments: tuple[str, ...]) -> dict[str, Any]:
    """Parse `KEY=VALUE` strings into typed values for `config_class`'s fields."""
    hints = typing.get_type_hints(config_class)
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not separator:
            raise UserError(f"--set {assignment!r} is not KEY=VALUE: write e.g. --set top_k=64")
        check_known_keys(config_class, [key], "--set")
        values[key] = _coerce(text.strip(), hints[key], key)
    return values


def check_known_keys(config_class: type, keys: typing.Iterable[str], where: str) -> None:
    """Fail on keys that are not fields of `config_class`, listing the valid ones."""
    names = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(keys) - names)
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(names))}"
        )


def build_config(
    config_class: type[ConfigT],
    *,
    config_file: Path | None,
    flags: dict[str, Any],
    assignments: tuple[str, ...] = (),
) -> ConfigT:
    """Resolve a config: file < explicit flags (None means not given) < --set assignments."""
    values: dict[str, Any] = {}
    if config_file is not None:
        from_file = {
            key.replace("-", "_"): value for key, value in read_config_file(config_file).items()
        }
        check_known_keys(config_class, from_file, f"config file {config_file}")
        hints = typing.get_type_hints(config_class)
        for key, value in from_file.items():
            if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
                value = tuple(value)
            values[key] = value
    check_known_keys(config_class, flags, "flags")
    values.update({key: value for key, value in flags.items() if value is not None})
    values.update(parse_set_options(config_class, assignments))
    missing = [
        field.name
        for field in dataclasses.fields(config_class)
        if field.name not in values
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        flags_text = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise UserError(f"{flags_text} required: pass as flags or in --config (see --help)")
    return config_class(**values)


def config_options(command):
    """The `--config FILE` and `--set KEY=VALUE` options every command takes (see build_config)."""
    import click

    command = click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override any config key (repeatable).",
    )(command)
    return click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path),
        default=None,
        help="JSON/TOML file of config keys.",
    )(command)


def config_to_dict(config: object) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists, paths strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(item) for item in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {key: plain(value) for key, value in dataclasses.asdict(config).items()}
