"""A causal LM's forward in two halves, so that no (B, L, V) logits tensor is ever built.

Training and the fidelity evaluation never call `model(...).logits`. They run the decoder to
final hidden states, keep the target positions, and apply the LM head chunk by chunk
(`chunked_head_sums`). `check_output_path` proves at start-up, on a short input, that this
reproduces the model's own logits, so an architecture that does something extra after its LM
head is refused instead of silently mistrained.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from kd_shards.shared.errors import UserError


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a possible peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, L, H) final hidden states (after the final norm), without the LM head."""
    decoder = causal_lm(model).get_decoder()
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return outputs.last_hidden_state


def output_logits_function(
    model: torch.nn.Module, vocabulary: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps (C, H) hidden states to (C, vocabulary) logits: the LM head, sliced to the tokenizer
    (padding rows of the embedding never receive probability), with final-logit soft-capping
    where the architecture has it (Gemma 2)."""
    language_model = causal_lm(model)
    head = language_model.get_output_embeddings()
    softcap = getattr(language_model.config, "final_logit_softcapping", None)

    def output_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)[..., :vocabulary]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return output_logits


def check_output_path(
    model: torch.nn.Module, vocabulary: int, device: torch.device | str = "cpu"
) -> None:
    """Refuse a model whose logits final_hidden_states + output_logits do not reproduce."""
    input_ids = torch.arange(1, 9, device=device).remainder(vocabulary).unsqueeze(0)
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        hidden = final_hidden_states(model, input_ids, attention_mask)
        actual = output_logits_function(model, vocabulary)(hidden).float()
    expected = expected[..., :vocabulary]
    difference = (expected - actual).abs().max().item()
    if not difference <= 1e-3 * max(1.0, expected.abs().max().item()):
        architecture = type(causal_lm(model)).__name__
        raise UserError(
            f"--student: {architecture} computes its logits in a way student-train does not "
            f"reproduce (max difference {difference:.3g}): this architecture is not supported yet"
        )


def chunked_head_sums(
    hidden: torch.Tensor,
    output_logits: Callable[[torch.Tensor], torch.Tensor],
    per_chunk: Callable[..., torch.Tensor],
    per_position: tuple[torch.Tensor, ...],
    *,
    chunk_tokens: int,
    width: int,
) -> torch.Tensor:
    """Sum of per_chunk(logits, *per_position chunks) over chunks of positions.

    With gradients on, each chunk's logits are computed inside activation checkpointing: the
    forward keeps only the chunk's hidden states, and the backward recomputes that chunk's
    (chunk_tokens, V) logits. Peak memory is one chunk of full-vocabulary logits, whatever N.

    Args:
        hidden: (N, H) final hidden states at the positions that predict each target.
        output_logits: maps (C, H) hidden states to (C, V) logits.
        per_chunk: (logits (C, V), *tensors (C, ...)) -> (width,) sums.
        per_position: tensors whose first dimension is N, chunked alongside `hidden`.
        chunk_tokens: positions per chunk.
    Returns:
        (width,) float32 sums over the N positions.
    """

    def chunk_sums(hidden_chunk, *tensors):
        return per_chunk(output_logits(hidden_chunk), *tensors)

    totals = torch.zeros(width, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        arguments = [tensor[start : start + chunk_tokens] for tensor in (hidden, *per_position)]
        if torch.is_grad_enabled() and hidden.requires_grad:
            totals = totals + checkpoint(chunk_sums, *arguments, use_reentrant=False)
        else:
            totals = totals + chunk_sums(*arguments)
    return totals
