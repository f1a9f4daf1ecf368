"""The option tables of docs/COMMAND.md, generated from the commands' config dataclasses.

Each option is written once: a field of DumpConfig, TrainConfig or EvalConfig with its type, its
default and the docstring under it. The CLIs derive their flags, choices and --help text from
those fields (shared.config.config_flags); this script renders the same fields as the tables
between `<!-- options: COMMAND -->` and `<!-- end options -->` in each command's page,
docs/COMMAND.md. A test fails when a page is out of date.

    python -m scripts.reference          # rewrite the tables in docs/*.md
    python -m scripts.reference --check  # exit 1 if a page is out of date
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path

from kd_shards.kd_eval import cli as kd_eval_cli
from kd_shards.kd_eval.config import EvalConfig
from kd_shards.shared.config import field_default, field_docs, format_default, literal_choices
from kd_shards.student_train import cli as student_train_cli
from kd_shards.student_train.config import TrainConfig
from kd_shards.teacher_dump import cli as teacher_dump_cli
from kd_shards.teacher_dump.config import DumpConfig

COMMANDS = {
    "teacher-dump": (DumpConfig, teacher_dump_cli.FLAGS, teacher_dump_cli.NEGATED),
    "student-train": (TrainConfig, student_train_cli.FLAGS, student_train_cli.NEGATED),
    "kd-eval": (EvalConfig, kd_eval_cli.FLAGS, kd_eval_cli.NEGATED),
}
DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = {command: DOCS / f"{command}.md" for command in COMMANDS}
"""Each command's reference page, which holds its options table."""
MARKERS = re.compile(r"(<!-- options: ([a-z-]+) -->\n)(.*?)(<!-- end options -->)", re.DOTALL)


def options_table(config_class: type, flags: tuple[str, ...], negated: dict[str, str]) -> str:
    """One row per config field: the flag (or the --set key), its default and its docstring."""
    hints = typing.get_type_hints(config_class)
    docs = field_docs(config_class)
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(config_class):
        name = field.name
        if name in negated:
            option = f"`{negated[name]}`"
        elif name in flags:
            option = f"`--{name.replace('_', '-')}`"
        else:
            option = f"`--set {name}=…`"
        default = field_default(config_class, name)
        if default is dataclasses.MISSING:
            shown = "required"
        else:
            shown = format_default(default).strip("[]") or ("on" if default is True else "—")
            shown = "off" if default is False else shown
        meaning = docs.get(name, "")
        choices = literal_choices(hints[name])
        if choices:
            meaning += f" One of: {', '.join(f'`{choice}`' for choice in choices)}."
        rows.append(f"| {option} | {shown} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def render(page: str) -> str:
    """The page with every options table in it regenerated."""

    def table(match: re.Match) -> str:
        command = match.group(2)
        if command not in COMMANDS:
            raise KeyError(f"a page names an unknown command in {match.group(1).strip()}")
        return match.group(1) + options_table(*COMMANDS[command]) + match.group(4)

    return MARKERS.sub(table, page)


def main() -> None:
    stale = []
    for path in PAGES.values():
        text = path.read_text(encoding="utf-8")
        rendered = render(text)
        if rendered == text:
            continue
        stale.append(path.name)
        if "--check" not in sys.argv[1:]:
            path.write_text(rendered, encoding="utf-8")
    if stale and "--check" in sys.argv[1:]:
        print(f"stale option tables in {', '.join(stale)}: run python -m scripts.reference")
        sys.exit(1)


if __name__ == "__main__":
    main()
