"""How bad input is reported: one exception type, its message shown to the user as a single line.

UserError itself is defined in schemas.errors (the contract floor raises it too). Every message names the cause and the fix ("X is wrong: do Y"). The CLIs catch it, print
`error: <message>` on stderr and exit with status 2; anything else is a bug and keeps its
traceback.
"""

from collections.abc import Iterable
from typing import NoReturn

from kd_shards.schemas.errors import UserError

__all__ = ["UserError", "check_all", "exit_with", "one_line"]


def one_line(error: BaseException, limit: int = 160) -> str:
    """A library error's text for quoting inside a UserError: whitespace (newlines included)
    collapsed, cut to `limit` characters (pyarrow's messages can span several lines)."""
    return " ".join(str(error).split())[:limit] or type(error).__name__


def check_all(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise UserError with the message of the first (holds, message) pair that does not hold."""
    for holds, message in checks:
        if not holds:
            raise UserError(message)


def exit_with(error: UserError) -> NoReturn:
    """How every command ends on bad input: `error: <message>` on stderr, exit status 2."""
    import sys

    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
