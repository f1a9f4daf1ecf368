"""teacher-dump's modes: one module each, behind teacher_dump.modes.interface.TeacherMode."""

from __future__ import annotations

from kd_shards.teacher_dump.modes import classify, generate, mlm, rescore, score, text
from kd_shards.teacher_dump.modes.interface import TeacherMode

MODES: dict[str, TeacherMode] = {
    mode.NAME: mode for mode in (generate, score, text, classify, mlm, rescore)
}
"""The built-in modes by --mode value (teacher_dump.config.Mode lists the same names)."""
