"""What one training step computes, chosen once at setup: the token objective (a causal LM on
token dumps) or the classification objective (a sequence classifier on class dumps or labels).

The loop in train.py is the same for both. An objective turns the stream's rows into a batch,
computes a batch's loss SUMS [total, ce, kd, hidden], and says how many units the step's sums
are divided by (target tokens, or examples for classification). It also holds any trainable
module besides the student (the hidden-state projection) and the evaluation on --eval-shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.causal_lm import final_hidden_states
from shared.classification import encode_texts, label_order, pool
from shared.collation import Batch, collate
from shared.distributions import divergence_per_position
from shared.fidelity import fidelity_metrics, fidelity_sums_over_batches
from shared.shard_reader import TrainingRow
from student_train.config import LossOptions
from student_train.losses import chunked_loss_sums, classification_loss_sums, hidden_state_mse_sum

SUMS_WIDTH = 4
"""A batch's loss sums: [total, ce, kd, hidden]."""


class LanguageModelObjective:
    """Token KD (or sequence KD with ce) of a causal LM on token dumps."""

    unit = "tokens"

    def __init__(self, output_logits, loss_options: LossOptions, chunk_tokens: int):
        self.output_logits = output_logits
        """(C, H) hidden states -> (C, V) logits: the LM head, sliced to the tokenizer."""
        self.loss_options = loss_options
        self.chunk_tokens = chunk_tokens
        self.modules: list[torch.nn.Module] = []

    def batch(self, rows: list[TrainingRow]) -> Batch:
        return collate(rows)

    def sums(self, model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        """(4,) loss sums of a batch over its target tokens (hidden is 0)."""
        options = self.loss_options
        hidden = final_hidden_states(
            model, batch.input_ids.to(device), batch.attention_mask.to(device)
        )
        selected = hidden[batch.row_index.to(device), batch.position.to(device)]
        sums = chunked_loss_sums(
            selected,
            self.output_logits,
            batch.target_ids.to(device),
            batch.topk_ids.to(device),
            batch.topk_logprobs.to(device),
            batch.topk_log_tail.to(device),
            chunk_tokens=self.chunk_tokens,
            loss=options.loss,
            alpha=options.alpha,
            beta=options.beta,
            temperature=options.temperature,
            tail=options.tail,
        )
        return torch.cat([sums, sums.new_zeros(1)])

    def evaluation_sums(self, model, batches, device: torch.device, bf16: bool) -> torch.Tensor:
        return fidelity_sums_over_batches(
            model,
            self.output_logits,
            batches,
            chunk_tokens=self.chunk_tokens,
            device=device,
            bf16=bf16,
        )

    def evaluation_metrics(self, sums: torch.Tensor) -> dict:
        return fidelity_metrics(sums)


@dataclass(frozen=True)
class ClassificationBatch:
    """B examples as a classifier reads them, with their targets."""

    input_ids: torch.Tensor
    """(B, S) int64, the student tokenizer's ids, right-padded."""
    attention_mask: torch.Tensor
    """(B, S) int64."""
    gold: torch.Tensor
    """(B,) int64 gold label index, NO_LABEL (-1) where there is none."""
    teacher_logprobs: torch.Tensor | None
    """(B, L) float32 teacher log-probabilities in label order; None for labels only."""
    teacher_hidden: torch.Tensor | None
    """(B, H_teacher) float32 pooled teacher hidden states, when the hidden loss is on."""
    sample_ids: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.sample_ids)

    @property
    def target_tokens(self) -> int:
        """The step's divisor: one unit per example."""
        return len(self.sample_ids)


@dataclass(frozen=True)
class HiddenLoss:
    """The hidden-state loss: w · MSE(projection(pooled student state), teacher state)."""

    weight: float
    projection: torch.nn.Linear
    """Student width -> teacher width (trained with the student)."""
    student_layer: int
    pooling: str


class ClassificationObjective:
    """A sequence classifier trained on gold labels and/or teacher class distributions."""

    unit = "examples"

    def __init__(
        self,
        *,
        tokenizer,
        max_length: int,
        loss_options: LossOptions,
        teacher_targets: dict[str, np.ndarray] | None,
        hidden_loss: HiddenLoss | None,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.loss_options = loss_options
        self.teacher_targets = teacher_targets
        """sample id -> (L,) log-probabilities of the combined teachers (multi-teacher), or None
        to read each row's own teacher distribution."""
        self.hidden_loss = hidden_loss
        self.modules = [hidden_loss.projection] if hidden_loss is not None else []

    def batch(self, rows: list[TrainingRow], with_hidden: bool = True) -> ClassificationBatch:
        """`with_hidden=False`: leave out the teacher's hidden states (evaluation)."""
        encoded = encode_texts(self.tokenizer, [row.text for row in rows], self.max_length)
        gold = torch.tensor([int(row.target_ids[0]) for row in rows], dtype=torch.int64)
        teacher = None
        if self.teacher_targets is not None:
            teacher = np.stack([self.teacher_targets[row.sample_id] for row in rows])
        elif rows and rows[0].topk_ids is not None:
            teacher = label_order(
                np.concatenate([row.topk_ids for row in rows]),
                np.concatenate([row.topk_logprobs for row in rows]),
            )
        hidden = None
        if self.hidden_loss is not None and with_hidden:
            hidden = torch.from_numpy(np.stack([row.hidden for row in rows]).astype(np.float32))
        return ClassificationBatch(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            gold=gold,
            teacher_logprobs=None if teacher is None else torch.from_numpy(teacher).float(),
            teacher_hidden=hidden,
            sample_ids=tuple(row.sample_id for row in rows),
        )

    def forward(self, model, batch: ClassificationBatch, device: torch.device):
        return model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            output_hidden_states=self.hidden_loss is not None,
        )

    def sums(
        self, model: torch.nn.Module, batch: ClassificationBatch, device: torch.device
    ) -> torch.Tensor:
        """(4,) loss sums over the batch's examples: [α·CE + (1−α)·KD + w·MSE, CE, KD, MSE]."""
        options = self.loss_options
        output = self.forward(model, batch, device)
        teacher = batch.teacher_logprobs
        sums = classification_loss_sums(
            output.logits,
            batch.gold.to(device),
            None if teacher is None else teacher.to(device),
            loss=options.loss,
            alpha=options.alpha,
            beta=options.beta,
            temperature=options.temperature,
        )
        hidden = sums.new_zeros(())
        if self.hidden_loss is not None:
            loss = self.hidden_loss
            pooled = pool(
                output.hidden_states[loss.student_layer].float(),
                batch.attention_mask.to(device),
                loss.pooling,
            )
            hidden = hidden_state_mse_sum(loss.projection(pooled), batch.teacher_hidden.to(device))
            sums = torch.stack([sums[0] + loss.weight * hidden, sums[1], sums[2]])
        return torch.cat([sums, hidden.reshape(1)])

    def evaluation_sums(self, model, batches, device: torch.device, bf16: bool) -> torch.Tensor:
        """(6,) float64 sums over held-out examples: [CE on gold, KL(teacher ‖ student) at T=1,
        argmax agreement with the teacher, correct, examples with gold, examples]."""
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for rows in batches:
                batch = self.batch(rows, with_hidden=False)
                logits = self.forward(model, batch, device).logits.float()
                log_q = torch.log_softmax(logits, dim=-1)
                gold = batch.gold.to(device)
                labelled = gold >= 0
                ce = -log_q[labelled].gather(1, gold[labelled].unsqueeze(1)).sum()
                predicted = log_q.argmax(-1)
                correct = (predicted[labelled] == gold[labelled]).sum()
                kl = agreement = torch.zeros((), device=device)
                if batch.teacher_logprobs is not None:
                    log_p = torch.log_softmax(batch.teacher_logprobs.to(device), dim=-1)
                    valid = torch.ones_like(log_p, dtype=torch.bool)
                    kl = divergence_per_position(
                        log_p, log_q, valid, divergence="fkl", beta=0.0
                    ).sum()
                    agreement = (predicted == log_p.argmax(-1)).sum()
                sums += torch.stack(
                    [
                        ce.double(),
                        kl.double(),
                        agreement.double(),
                        correct.double(),
                        labelled.sum().double(),
                        torch.tensor(float(batch.rows), dtype=torch.float64, device=device),
                    ]
                )
        model.train(was_training)
        return sums

    def evaluation_metrics(self, sums: torch.Tensor) -> dict:
        ce, kl, agreement, correct, labelled, examples = sums.tolist()
        return {
            "eval_ce": ce / max(labelled, 1.0),
            "eval_kl": kl / max(examples, 1.0),
            "eval_top1": agreement / max(examples, 1.0),
            "eval_accuracy": correct / max(labelled, 1.0),
            "eval_tokens": int(examples),
        }
