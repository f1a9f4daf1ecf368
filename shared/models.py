"""Finding a model (local directory or hub id) and describing it for provenance.

A hub id resolves through the local Hugging Face cache (downloading when online); offline and
uncached it fails at once with the fix in the message. Weights must be safetensors: pickle
checkpoints (.bin/.pt) can execute code when loaded, so they are refused (and loaders pass
use_safetensors=True so a pickle beside the safetensors is never read). Python code shipped with
a model (auto_map) is refused unless the user passes --trust-remote-code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kd_shards.shared.errors import UserError, one_line

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
    reference: str,
    revision: str | None = None,
    flag: str = "--model",
    *,
    trust_remote_code: bool = False,
) -> ResolvedModel:
    """Resolve a local model directory or a hub id to a ResolvedModel (`flag` names the option in
    error messages). A model that ships its own Python code is refused unless
    `trust_remote_code` (see refuse_remote_code)."""
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
    config = json.loads(config_path.read_text())
    if not trust_remote_code:
        refuse_remote_code(directory, config, f"{flag} {reference}")
    return ResolvedModel(
        reference=reference,
        directory=directory,
        revision=hub_revision,
        weights_fingerprint=weights_fingerprint(weights),
        config=config,
    )


def refuse_remote_code(directory: Path, config: dict, what: str) -> None:
    """Refuse a model directory whose config or tokenizer config maps classes to Python code
    of its own (`auto_map`): transformers and vLLM would import and run that code on load.

    transformers alone would, for a known model_type, quietly load its built-in class instead;
    refusing says plainly that the model is not what it claims to be run as."""
    maps = [config.get("auto_map")]
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        # An unreadable tokenizer config is reported when the tokenizer loads.
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            maps.append(json.loads(tokenizer_config.read_text()).get("auto_map"))
    mapped: dict = {}
    for value in maps:
        if isinstance(value, list | tuple):  # the old tokenizer form: [slow class, fast class]
            value = {"AutoTokenizer": value}
        if value:
            mapped.update(value if isinstance(value, dict) else {"auto_map": value})
    if mapped:
        raise UserError(
            f"{what} ships its own Python code (auto_map: {', '.join(sorted(mapped))}), which "
            "would run when it loads: pass --trust-remote-code if you trust its source, or use "
            "a model that transformers supports natively"
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
        reason = one_line(error)
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
