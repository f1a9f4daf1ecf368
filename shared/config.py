"""Building a command's frozen config dataclass from a file, CLI flags and --set overrides.

Each command defines one small frozen dataclass with a docstring under every field. The CLI
parses once: values from `--config FILE` (JSON or TOML), then explicit flags, then
`--set KEY=VALUE`; an unknown key anywhere is an error that lists the valid ones. The resolved
config is saved beside every artefact (the dump's manifest, checkpoints' meta.json).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import click

from kd_shards.shared.errors import UserError

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


def literal_choices(annotation: Any) -> tuple[str, ...] | None:
    """The allowed values of a Literal[...] annotation (also inside `X | None`), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for argument in typing.get_args(annotation):
            if (choices := literal_choices(argument)) is not None:
                return choices
    return None


def check_choices(config: object) -> None:
    """Refuse a value outside its field's Literal choices, naming the flag and the choices."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        choices = literal_choices(hints[field.name])
        value = getattr(config, field.name)
        if choices is not None and value is not None and value not in choices:
            raise UserError(
                f"--{field.name.replace('_', '-')} {value!r} is not one of {', '.join(choices)}"
            )


def field_docs(config_class: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, whitespace-collapsed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config_class)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for previous, node in zip(body, body[1:], strict=False):
        is_field = isinstance(previous, ast.AnnAssign) and isinstance(previous.target, ast.Name)
        is_doc = (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        )
        if is_field and is_doc:
            docs[previous.target.id] = " ".join(node.value.value.split())
    return docs


def field_default(config_class: type, name: str) -> Any:
    """A field's default value, or dataclasses.MISSING when it is required."""
    field = {field.name: field for field in dataclasses.fields(config_class)}[name]
    return field.default


def format_default(value: Any) -> str:
    """How a default reads in --help and docs/'s option tables: [value], nothing for none."""
    if value is dataclasses.MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return ""
    if isinstance(value, tuple):
        return f"[{','.join(map(str, value))}]"
    return f"[{value}]"


def config_flags(
    config_class: type,
    names: typing.Iterable[str],
    *,
    help: dict[str, str] | None = None,
    negated: dict[str, str] | None = None,
):
    """click options for the given fields of a config dataclass, derived from the dataclass.

    Each field `some_name` becomes `--some-name`. Its click type follows the annotation: a
    Literal gives the choices, bool gives a flag, tuple[str, ...] a comma-separated list, int
    and float themselves. The help text is the `help` entry or the first sentence of the field's
    docstring, followed by the dataclass default. Every option defaults to None, meaning "not
    given", so that build_config applies the file < flags < --set precedence. `negated` maps a
    bool field whose default is True to a flag that turns it off (e.g. progress: --no-progress).
    """
    hints = typing.get_type_hints(config_class)
    docs = field_docs(config_class)
    help = help or {}
    negated = negated or {}

    def decorate(command):
        for name in reversed(list(names)):
            annotation = hints[name]
            default = format_default(field_default(config_class, name))
            text = help.get(name) or docs.get(name, "").split(". ")[0].rstrip(".") + "."
            text = f"{text} {default}".strip()
            if name in negated:
                text = f"Turn off (on by default): {text[0].lower()}{text[1:]}"
                option = click.option(
                    negated[name], name, flag_value=False, default=None, help=text
                )
            elif annotation is bool:
                flag = f"--{name.replace('_', '-')}"
                option = click.option(flag, name, is_flag=True, default=None, help=text)
            else:
                option = click.option(
                    f"--{name.replace('_', '-')}",
                    name,
                    type=click_type(annotation),
                    default=None,
                    help=text,
                )
            command = option(command)
        return command

    return decorate


def click_type(annotation: Any):
    """The click parameter type of a config field's annotation (see config_flags)."""
    if (choices := literal_choices(annotation)) is not None:
        return click.Choice(choices)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return click_type(options[0])
    if typing.get_origin(annotation) is tuple:
        (item_type, *_) = typing.get_args(annotation)
        return CommaSeparated(item_type)
    return {int: int, float: float}.get(annotation, str)


class CommaSeparated(click.ParamType):
    """A comma-separated list on the command line, a tuple (of `item_type`) in the config."""

    name = "a,b,..."

    def __init__(self, item_type: type = str):
        self.item_type = item_type

    def convert(self, value, parameter, context):
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",") if part.strip()]
        try:
            return tuple(self.item_type(part) for part in parts)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item_type.__name__}")
