"""`kd-eval`: scores teacher, baseline and distilled students side by side (issue 4; not yet implemented)."""

import sys


def main() -> None:
    print(
        "kd-eval: not yet implemented (it will compare teacher and students on a task)",
        file=sys.stderr,
    )
    sys.exit(2)
