"""Finding a model (local directory or hub id) and describing it for provenance.

A hub id resolves through the local Hugging Face cache (downloading when online); offline and
uncached it fails at once with the fix in the message. Weights must be safetensors: pickle
checkpoints (.bin/.pt) can execute code when loaded, so they are refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError, first_line

FINGERPRINT_SAMPLE_BYTES = 1 << 20
AUXILIARY_WEIGHTS = ("hidden_projection.safetensors",)
"""Weight files a trained student's directory may hold that are not part of the model (the
hidden-state loss's projection): never loaded as the model, never counted as its parameters."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model on local disk, with what the manifest records about it."""

    reference: str
    """What the user passed (path or hub id)."""
    directory: Path
    """Local directory holding config, tokenizer and safetensors weights."""
    revision: str | None
    """Hub commit hash when it came from the hub, else None."""
    weights_fingerprint: str
    """sha256 over each weight file's name, size, first and last MiB (cheap; not a full hash)."""
    config: dict
    """The model's config.json."""


def resolve_model(
    reference: str, revision: str | None = None, flag: str = "--model"
) -> ResolvedModel:
    """Resolve a local model directory or a hub id to a ResolvedModel (`flag` names the option in
    error messages)."""
    path = Path(reference).expanduser()
    hub_revision = None
    if path.is_dir():
        directory = path.resolve()
    elif path.exists():
        raise UserError(
            f"{flag} {reference} is a file: pass the model's directory (config.json + weights)"
        )
    elif reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise UserError(
            f"{flag} {reference}: no such directory; pass a local model directory or a hub id org/name"
        )
    else:
        directory, hub_revision = _download_from_hub(reference, revision)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{flag} {reference}: {directory} has no config.json; pass a Hugging Face model directory"
        )
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickles = [
            name.name
            for name in directory.iterdir()
            if name.suffix in (".bin", ".pt", ".pth", ".gguf")
        ]
        hint = f" (found {', '.join(pickles[:3])})" if pickles else ""
        raise UserError(
            f"{flag} {reference}: no .safetensors weights in {directory}{hint}; convert the "
            "checkpoint to safetensors (save_pretrained(..., safe_serialization=True)) first"
        )
    return ResolvedModel(
        reference=reference,
        directory=directory,
        revision=hub_revision,
        weights_fingerprint=weights_fingerprint(weights),
        config=json.loads(config_path.read_text()),
    )


def _download_from_hub(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download

    try:
        directory = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as error:  # offline/not found/gated all surface as different types
        reason = first_line(error)
        raise UserError(
            f"cannot get model {repo_id} from the Hugging Face hub ({reason[:160]}): offline or "
            "unknown id; pass a local model directory instead"
        ) from None
    directory = Path(directory)
    # The snapshot folder is named after the commit it holds.
    return directory, directory.name


def weights_fingerprint(files: list[Path]) -> str:
    """sha256 over (name, size, first MiB, last MiB) of each weight file."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
            if size > 2 * FINGERPRINT_SAMPLE_BYTES:
                handle.seek(size - FINGERPRINT_SAMPLE_BYTES)
                digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def context_length(config: dict) -> int | None:
    """The model's maximum context from its config, when it states one."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
