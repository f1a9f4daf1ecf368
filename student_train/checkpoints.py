"""Checkpoints: everything needed to continue training exactly, written so a kill never leaves
one that looks complete but is not.

Layout of OUT/checkpoints/step-00000123/:
- the model as `save_pretrained` writes it (safetensors; for LoRA the adapter), loadable by
  transformers (and, for full models, vLLM), plus the tokenizer files;
- training_state.pt: optimizer, scheduler and every rank's RNG state (torch.load with
  weights_only=True can read it);
- meta.json: step, tokens seen, every rank's loader position, the resolved config, the dump's
  identity. It is written last.
The directory is assembled under a temporary name, fsynced, then renamed: a checkpoint exists
under its final name only once complete. Old checkpoints are renamed to a temporary name before
deletion for the same reason. OUT/final/ is the trained student (hard links into the last
checkpoint, or the merged model for --merge-lora).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from shared.files import (
    TEMP_PREFIX,
    atomic_directory,
    atomic_write_json,
    remove_directory_atomically,
)

CHECKPOINTS_DIRECTORY = "checkpoints"
FINAL_DIRECTORY = "final"
META_NAME = "meta.json"
STATE_NAME = "training_state.pt"
_STEP_PATTERN = re.compile(r"^step-(\d{8})$")


def checkpoint_directory(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS_DIRECTORY / f"step-{step:08d}"


def complete_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints in step order (a directory counts only with its meta.json)."""
    root = Path(out) / CHECKPOINTS_DIRECTORY
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if _STEP_PATTERN.match(path.name) and (path / META_NAME).is_file()
    ]
    return sorted(found, key=lambda path: path.name)


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def remove_temporaries(out: Path) -> None:
    """Delete half-written checkpoints left by a killed run (one trainer owns OUT at a time)."""
    for root in (Path(out) / CHECKPOINTS_DIRECTORY, Path(out)):
        if root.is_dir():
            for path in root.glob(f"{TEMP_PREFIX}*"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    out: Path,
    step: int,
    *,
    model,
    tokenizer,
    training_state: dict,
    meta: dict,
    keep: int,
    extra_weights: dict[str, dict] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the `keep` newest.

    `extra_weights`: file name -> state dict of a trained module besides the student (saved as
    safetensors beside its weights, and published with them)."""
    from safetensors.torch import save_file

    final = checkpoint_directory(out, step)
    with atomic_directory(final) as temporary:
        model.save_pretrained(str(temporary), safe_serialization=True)
        tokenizer.save_pretrained(str(temporary))
        for name, state in (extra_weights or {}).items():
            save_file({key: value.contiguous() for key, value in state.items()}, temporary / name)
        torch.save(training_state, temporary / STATE_NAME)
        (temporary / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for old in complete_checkpoints(out)[:-keep]:
        remove_directory_atomically(old)
    return final


def read_checkpoint(directory: Path) -> tuple[dict, dict]:
    """(meta, training_state) of a checkpoint."""
    meta = json.loads((directory / META_NAME).read_text(encoding="utf-8"))
    state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    return meta, state


def publish_final(out: Path, checkpoint: Path, summary: dict) -> Path:
    """OUT/final/: the last checkpoint's model and tokenizer files, hard-linked (no copy)."""
    final = Path(out) / FINAL_DIRECTORY
    with atomic_directory(final) as temporary:
        for path in checkpoint.iterdir():
            if path.is_file() and path.name not in (STATE_NAME, META_NAME):
                try:
                    os.link(path, temporary / path.name)
                except OSError:  # file systems without hard links
                    shutil.copy2(path, temporary / path.name)
        atomic_write_json(temporary / "training.json", summary)
    return final


def publish_merged(
    out: Path, merged_model, tokenizer, adapter_checkpoint: Path, summary: dict
) -> Path:
    """OUT/final/: a LoRA run's adapter merged into the base weights (a plain model), with the
    adapter itself kept in final/adapter/."""
    final = Path(out) / FINAL_DIRECTORY
    with atomic_directory(final) as temporary:
        merged_model.save_pretrained(str(temporary), safe_serialization=True)
        tokenizer.save_pretrained(str(temporary))
        (temporary / "adapter").mkdir()
        for path in adapter_checkpoint.iterdir():
            if path.is_file() and path.name not in (STATE_NAME, META_NAME):
                shutil.copy2(path, temporary / "adapter" / path.name)
        atomic_write_json(temporary / "training.json", summary)
    return final
