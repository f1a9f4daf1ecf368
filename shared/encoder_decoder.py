"""Encoder-decoder (seq2seq) models, written once for teacher-dump, student-train and kd-eval:
which models they are, how a shard row becomes their inputs, and their forward in two halves.

A row's prompt is the encoder's input and its target the decoder's tokens: the decoder reads
[decoder start] + target[:-1] and position t predicts target token t, the same conditional a
causal teacher's row stores at its target positions. As for causal LMs (shared.causal_lm), the
decoder runs to final hidden states and the LM head is applied chunk by chunk inside the loss,
so no (B, T, V) logits tensor is built; `check_output_path` proves at start-up that this
reproduces the model's own logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from kd_shards.schemas.manifest import ENCODER_DECODER_ARCHITECTURE
from kd_shards.shared.causal_lm import chunked_head_sums
from kd_shards.shared.collation import Batch, collate
from kd_shards.shared.errors import UserError
from kd_shards.shared.fidelity import fidelity_sums
from kd_shards.shared.shard_reader import TrainingRow

ENCODER_DECODER = ENCODER_DECODER_ARCHITECTURE
"""The manifest's teacher.architecture for an encoder-decoder teacher (absent: decoder-only)."""
ENCODER_ONLY_SUFFIXES = (
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
)
"""Architecture names of models that read text but cannot continue it (BERT-like encoders)."""


def is_encoder_decoder(config: dict) -> bool:
    """An encoder-decoder model (T5, Flan-T5, mT5, BART, ...): its config.json says so."""
    return bool(config.get("is_encoder_decoder"))


def is_encoder_only(config: dict) -> bool:
    """A model with no decoder to generate with: every architecture is an encoder head."""
    names = list(config.get("architectures") or [])
    return bool(names) and all(name.endswith(ENCODER_ONLY_SUFFIXES) for name in names)


def decoder_start_id(config) -> int:
    """The token the decoder starts from (a transformers config object): T5 starts from its
    padding id, BART from its decoder_start_token_id."""
    for key in ("decoder_start_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise UserError(
        f"{type(config).__name__} states neither decoder_start_token_id nor pad_token_id: set "
        "one in the model's config.json"
    )


@dataclass(frozen=True)
class EncoderDecoderBatch:
    """One micro-batch for an encoder-decoder model. B rows, S longest prompt, T longest
    target, N target positions, K teacher top-k."""

    input_ids: torch.Tensor
    """(B, S) int64 encoder input (the prompts), right-padded with `pad_id`."""
    attention_mask: torch.Tensor
    """(B, S) int64, 1 on real prompt tokens."""
    decoder_input_ids: torch.Tensor
    """(B, T) int64: [decoder start] + target[:-1], right-padded with `pad_id`."""
    decoder_attention_mask: torch.Tensor
    """(B, T) int64, 1 on real decoder tokens."""
    targets: Batch
    """The target positions and the teacher's distributions (shared.collation.Batch: its
    row_index, target_ids and topk_* are used; its `position` is the decoder position)."""

    @property
    def target_tokens(self) -> int:
        return self.targets.target_tokens

    @property
    def rows(self) -> int:
        return self.targets.rows

    @property
    def sample_ids(self) -> tuple[str, ...]:
        return self.targets.sample_ids


def collate_encoder_decoder(
    rows: list[TrainingRow], *, start_id: int, pad_id: int
) -> EncoderDecoderBatch:
    """Stack rows into an EncoderDecoderBatch: prompts for the encoder, shifted targets for the
    decoder (pure: no model). Target token t of a row is predicted at decoder position t."""
    targets = collate(rows)
    longest_prompt = max((len(row.prompt_ids) for row in rows), default=0)
    longest_target = max((len(row.target_ids) for row in rows), default=0)
    input_ids = np.full((len(rows), longest_prompt), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest_prompt), dtype=np.int64)
    decoder_input_ids = np.full((len(rows), longest_target), pad_id, dtype=np.int64)
    decoder_attention_mask = np.zeros((len(rows), longest_target), dtype=np.int64)
    positions = []
    for index, row in enumerate(rows):
        prompt, target = row.prompt_ids, row.target_ids
        input_ids[index, : len(prompt)] = prompt
        attention_mask[index, : len(prompt)] = 1
        decoder_input_ids[index, : len(target)] = np.concatenate([[start_id], target[:-1]])
        decoder_attention_mask[index, : len(target)] = 1
        positions.append(np.arange(len(target), dtype=np.int64))
    position = torch.from_numpy(np.concatenate(positions)) if positions else targets.position
    return EncoderDecoderBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        decoder_input_ids=torch.from_numpy(decoder_input_ids),
        decoder_attention_mask=torch.from_numpy(decoder_attention_mask),
        targets=replace(targets, position=position),
    )


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers seq2seq model inside a possible peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden_states(
    model: torch.nn.Module, batch: EncoderDecoderBatch, device: torch.device | str
) -> torch.Tensor:
    """(B, T, H) final decoder hidden states (after the final norm), without the LM head."""
    seq2seq = base_model(model)
    attention_mask = batch.attention_mask.to(device)
    encoded = seq2seq.get_encoder()(
        input_ids=batch.input_ids.to(device), attention_mask=attention_mask
    ).last_hidden_state
    decoded = seq2seq.get_decoder()(
        input_ids=batch.decoder_input_ids.to(device),
        attention_mask=batch.decoder_attention_mask.to(device),
        encoder_hidden_states=encoded,
        encoder_attention_mask=attention_mask,
        use_cache=False,
    )
    return decoded.last_hidden_state


def target_hidden_states(
    model: torch.nn.Module, batch: EncoderDecoderBatch, device: torch.device | str
) -> torch.Tensor:
    """(N, H) decoder hidden states at the positions that predict each target token."""
    hidden = decoder_hidden_states(model, batch, device)
    return hidden[batch.targets.row_index.to(device), batch.targets.position.to(device)]


def output_logits_function(
    model: torch.nn.Module, vocabulary: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps (C, H) decoder hidden states to (C, vocabulary) logits: T5's rescaling of tied
    outputs (d_model^-0.5), the LM head, BART's final_logits_bias, sliced to the tokenizer."""
    seq2seq = base_model(model)
    head = seq2seq.get_output_embeddings()
    config = seq2seq.config
    scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else None
    bias = getattr(seq2seq, "final_logits_bias", None)

    def output_logits(hidden: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            hidden = hidden * scale
        logits = head(hidden)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        return logits[..., :vocabulary]

    return output_logits


def check_output_path(
    model: torch.nn.Module, vocabulary: int, start_id: int, device: torch.device | str = "cpu"
) -> None:
    """Refuse a model whose logits decoder_hidden_states + output_logits do not reproduce."""
    input_ids = torch.arange(1, 9, device=device).remainder(vocabulary).unsqueeze(0)
    decoder_ids = torch.cat([input_ids.new_full((1, 1), start_id), input_ids[:, :4]], dim=1)
    batch = EncoderDecoderBatch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        decoder_input_ids=decoder_ids,
        decoder_attention_mask=torch.ones_like(decoder_ids),
        targets=collate([]),
    )
    with torch.no_grad():
        expected = model(
            input_ids=input_ids,
            attention_mask=batch.attention_mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=batch.decoder_attention_mask,
        ).logits.float()[..., :vocabulary]
        actual = output_logits_function(model, vocabulary)(
            decoder_hidden_states(model, batch, device)
        ).float()
    difference = (expected - actual).abs().max().item()
    if not difference <= 1e-3 * max(1.0, expected.abs().max().item()):
        architecture = type(base_model(model)).__name__
        raise UserError(
            f"--student: {architecture} computes its logits in a way student-train does not "
            f"reproduce (max difference {difference:.3g}): this architecture is not supported yet"
        )


def fidelity_sums_over_batches(
    model: torch.nn.Module,
    output_logits: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[list[TrainingRow]],
    *,
    start_id: int,
    pad_id: int,
    chunk_tokens: int,
    device: torch.device,
    bf16: bool = False,
) -> torch.Tensor:
    """(4,) float64 sums [CE, KL, top-1 matches, positions] over the rows of `batches`
    (shared.fidelity's measures, for an encoder-decoder model)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for rows in batches:
            batch = collate_encoder_decoder(rows, start_id=start_id, pad_id=pad_id)
            targets = batch.targets
            per_position = (
                targets.target_ids,
                targets.topk_ids,
                targets.topk_logprobs,
                targets.topk_log_tail,
            )
            sums += chunked_head_sums(
                target_hidden_states(model, batch, device),
                output_logits,
                fidelity_sums,
                tuple(tensor.to(device) for tensor in per_position),
                chunk_tokens=chunk_tokens,
                width=4,
            ).double()
    model.train(was_training)
    return sums
