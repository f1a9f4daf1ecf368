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

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.files import (
    TEMP_PREFIX,
    atomic_directory,
    atomic_write_json,
    disk_full_error,
    is_disk_full,
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
    model_state: dict | None = None,
    write_sharded=None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the `keep` newest.

    `extra_weights`: file name -> state dict of a trained module besides the student (saved as
    safetensors beside its weights, and published with them). A sharded student (--parallel
    fsdp) passes its full weights as `model_state`, and `write_sharded(directory)`, which has
    every rank write its shards into the checkpoint before it is published."""
    from safetensors.torch import save_file

    final = checkpoint_directory(out, step)
    try:
        with atomic_directory(final) as temporary:
            model.save_pretrained(str(temporary), safe_serialization=True, state_dict=model_state)
            if write_sharded is not None:
                write_sharded(temporary)
            tokenizer.save_pretrained(str(temporary))
            for name, state in (extra_weights or {}).items():
                save_file(
                    {key: value.contiguous() for key, value in state.items()}, temporary / name
                )
            # Through a Python file object, so that a full disk surfaces as the file's OSError
            # (torch.save to a path reports only "unexpected pos").
            with open(temporary / STATE_NAME, "wb") as handle:
                torch.save(training_state, handle)
            (temporary / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except Exception as error:
        if not is_disk_full(error):
            raise
        previous = latest_checkpoint(out)
        kept = f"the newest complete one is {previous.name}" if previous else "none is kept"
        raise UserError(
            f"no space left on the device of {final.parent} while writing checkpoint "
            f"{final.name}: it was not kept ({kept}); free space there and rerun the same "
            "command with --resume"
        ) from None
    for old in complete_checkpoints(out)[:-keep]:
        remove_directory_atomically(old)
    return final


def read_checkpoint(directory: Path) -> tuple[dict, dict]:
    """(meta, training_state) of a checkpoint.

    training_state.pt is read with weights_only=True: tensors and plain containers only, so a
    file crafted to run code when unpickled is refused instead of executed."""
    fix = f"delete {directory} to resume from the checkpoint before it, or train into a new --out"
    try:
        meta = json.loads((directory / META_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"checkpoint {directory.name}: {META_NAME} is unreadable ({error}): {fix}"
        ) from None
    try:
        state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise UserError(
            f"checkpoint {directory.name}: {STATE_NAME} is not a plain tensor state that loads "
            f"without running code ({one_line(error, 120)}): it was damaged or not written by "
            f"student-train; {fix}"
        ) from None
    return meta, state


def publish_final(out: Path, checkpoint: Path, summary: dict) -> Path:
    """OUT/final/: the last checkpoint's model and tokenizer files, hard-linked (no copy)."""
    final = Path(out) / FINAL_DIRECTORY
    with publishing(final) as temporary:
        for path in checkpoint.iterdir():
            if path.is_file() and path.name not in (STATE_NAME, META_NAME):
                try:
                    os.link(path, temporary / path.name)
                except OSError:  # file systems without hard links
                    shutil.copy2(path, temporary / path.name)
        atomic_write_json(temporary / "training.json", summary)
    return final


@contextlib.contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """atomic_directory(final), with a full disk as a one-line UserError (nothing partial kept)."""
    try:
        with atomic_directory(final) as temporary:
            yield temporary
    except Exception as error:
        if is_disk_full(error):
            raise disk_full_error(final, f"{final.name}/") from None
        raise


def publish_merged(
    out: Path, merged_model, tokenizer, adapter_checkpoint: Path, summary: dict
) -> Path:
    """OUT/final/: a LoRA run's adapter merged into the base weights (a plain model), with the
    adapter itself kept in final/adapter/."""
    final = Path(out) / FINAL_DIRECTORY
    with publishing(final) as temporary:
        merged_model.save_pretrained(str(temporary), safe_serialization=True)
        tokenizer.save_pretrained(str(temporary))
        (temporary / "adapter").mkdir()
        for path in adapter_checkpoint.iterdir():
            if path.is_file() and path.name not in (STATE_NAME, META_NAME):
                shutil.copy2(path, temporary / "adapter" / path.name)
        atomic_write_json(temporary / "training.json", summary)
    return final
