"""`student-train`: trains a student from teacher shards (issue 3; not yet implemented)."""

import sys


def main() -> None:
    print(
        "student-train: not yet implemented (it will train students from teacher-dump shards)",
        file=sys.stderr,
    )
    sys.exit(2)
