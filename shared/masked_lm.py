"""Masked language models (`*ForMaskedLM`: BERT, RoBERTa, DistilBERT, ModernBERT) in
transformers: what teacher-dump --mode mlm runs its teacher with, and what the masked-LM
student family loads.

vLLM 0.32's pooling runner returns per-token probabilities for BertForMaskedLM only (not for
RoBERTa, DistilBERT or ModernBERT masked LMs) and no per-token hidden states, so the teacher
runs here, batched, in float32 (or the dtype asked for); the manifest records that backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from kd_shards.shared.classification import architectures
from kd_shards.shared.errors import UserError, one_line

BACKEND = "transformers"
BACKEND_REASON = (
    "vLLM 0.32's pooling runner serves BertForMaskedLM alone among masked LMs (as softmaxed "
    "probabilities, without per-token hidden states): every masked LM runs in transformers"
)


def is_masked_lm(config: dict) -> bool:
    """A model with a masked-LM head (`*ForMaskedLM`)."""
    return any(name.endswith("ForMaskedLM") for name in architectures(config))


def load_masked_lm(directory, *, dtype: str = "float32", trust_remote_code: bool, who: str):
    """A transformers `*ForMaskedLM` in `dtype`, in eval mode, or a one-line refusal."""
    import torch
    from transformers import AutoModelForMaskedLM

    try:
        model = AutoModelForMaskedLM.from_pretrained(
            str(directory),
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(
            f"{who} {directory}: cannot load it as a masked LM ({one_line(error)}): pass a "
            "*ForMaskedLM model directory"
        ) from None
    return model.eval()


@dataclass(frozen=True)
class MaskedBatch:
    """The teacher's outputs for a batch of masked windows (one entry per window)."""

    keys: list
    """The caller's key of each window, in the order given."""
    log_probabilities: list[np.ndarray]
    """(T_i, V) float32 log-softmax over the model's whole output at window i's positions."""
    hidden: list[np.ndarray] | None
    """(P_i, H) float32 hidden states of the asked layer at every token, or None."""


class MaskedLanguageModelEngine:
    """A masked LM run by transformers on batches of right-padded windows."""

    backend = BACKEND
    fallback_reason = BACKEND_REASON

    def __init__(
        self,
        directory,
        *,
        dtype: str,
        hidden_layer: int | None,
        batch_size: int,
        pad_id: int,
        trust_remote_code: bool = False,
    ):
        import torch
        import transformers

        self.dtype = "float32" if dtype == "auto" else dtype
        self.model = load_masked_lm(
            directory, dtype=self.dtype, trust_remote_code=trust_remote_code, who="--model"
        )
        self.hidden_layer, self.batch_size, self.pad_id = hidden_layer, batch_size, pad_id
        self.torch = torch
        self.version = transformers.__version__
        self.architecture = type(self.model).__name__

    def run(
        self, windows: Iterable[tuple[object, np.ndarray, np.ndarray]]
    ) -> Iterator[MaskedBatch]:
        """(key, (P,) input ids, (T,) positions) per window -> their outputs, batch by batch."""
        batch = []
        for window in windows:
            batch.append(window)
            if len(batch) == self.batch_size:
                yield self._forward(batch)
                batch = []
        if batch:
            yield self._forward(batch)

    def _forward(self, batch) -> MaskedBatch:
        torch = self.torch
        longest = max(len(ids) for _, ids, _ in batch)
        input_ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, (_, ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        want_hidden = self.hidden_layer is not None
        with torch.no_grad():
            output = self.model(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(attention_mask),
                output_hidden_states=want_hidden,
            )
        log_probabilities, hidden = [], [] if want_hidden else None
        for row, (_, ids, positions) in enumerate(batch):
            selected = output.logits[row, torch.from_numpy(positions.astype(np.int64))].float()
            log_probabilities.append(torch.log_softmax(selected, dim=-1).numpy())
            if want_hidden:
                states = output.hidden_states[self.hidden_layer][row, : len(ids)]
                hidden.append(states.float().numpy())
        return MaskedBatch([key for key, _, _ in batch], log_probabilities, hidden)

    def close(self) -> None:
        """Nothing to stop: the model lives in this process."""
