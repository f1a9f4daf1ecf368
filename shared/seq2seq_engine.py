"""The teacher engine of encoder-decoder models (T5, Flan-T5, mT5, BART): a transformers
backend behind the token engine's door.

vLLM 0.32 serves no encoder-decoder text model, so these run in transformers, batched, with the
same methods and result types as shared.engine.TeacherEngine (`generate` gives Completions,
`score` ScoredSequences, `close`), and the same logprob conventions: raw log-softmax of the
logits (temperature 1, before any top-p), column 0 the actual token, then the top-k in rank
order, or, for --store sampled, k draws with replacement from the full distribution.
`start_token_engine` is the one door both teacher-dump and kd-eval go through: it picks this
backend for an encoder-decoder model and vLLM for every other.

The encoder reads the prompt; the decoder's tokens are the targets. `score` takes (key,
prompt_ids + target_ids) like vLLM's, with the prompt's length, and returns the layout vLLM
gives for that sequence (row j-1 predicts token j), so the rows' code is the same for both:
the rows before the targets hold no distribution (an encoder-decoder has none there) and are
never read.

Each (request, sample) draws from its own torch generator seeded from the request's seed, so a
completion does not depend on which other requests share its batch, nor on resumes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from kd_shards.shared.encoder_decoder import ENCODER_DECODER, decoder_start_id, is_encoder_decoder
from kd_shards.shared.engine import Completion, EngineSettings, ScoredSequence
from kd_shards.shared.errors import UserError, one_line

BATCH_ROWS = 16
"""Sequences per transformers forward pass (a window of max_in_flight requests is sorted by
prompt length and cut into batches of this many rows)."""
SAMPLE_SEED_STRIDE = 0x9E3779B1
"""Sample j of a request with seed s draws from a generator seeded with s + j * this."""


def start_token_engine(settings: EngineSettings, model_config: dict):
    """The token engine for a model (its config.json): this module's Seq2SeqEngine for an
    encoder-decoder model, vLLM (shared.engine.TeacherEngine) for any other."""
    if is_encoder_decoder(model_config):
        return Seq2SeqEngine(settings)
    from kd_shards.shared.engine import TeacherEngine

    return TeacherEngine(settings)


class Seq2SeqEngine:
    """An AutoModelForSeq2SeqLM serving top-k logprobs (or draws) for generation and teacher
    forcing, in transformers."""

    backend = "transformers"
    architecture = ENCODER_DECODER

    def __init__(self, settings: EngineSettings, batch_rows: int = BATCH_ROWS):
        import torch
        from transformers import AutoModelForSeq2SeqLM

        if settings.tensor_parallel_size > 1:
            raise UserError(
                "--tensor-parallel-size > 1: encoder-decoder teachers run in transformers on one "
                "device; use --data-parallel-size to spread a dump over devices"
            )
        self.settings = settings
        self.batch_rows = batch_rows
        self.vllm_version = None
        self.draws_in_process = False
        self.platform = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if settings.dtype == "auto" else getattr(torch, settings.dtype)
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(
                settings.model,
                dtype=dtype,
                trust_remote_code=settings.trust_remote_code,
                use_safetensors=True,
            )
        except (OSError, ValueError) as error:
            raise UserError(
                f"cannot load {settings.model} as an encoder-decoder model ({one_line(error)}): "
                "pass a T5/BART-style model directory (AutoModelForSeq2SeqLM)"
            ) from None
        self.model = model.to(self.platform).eval()
        self.dtype = str(dtype).removeprefix("torch.")
        self.start_id = decoder_start_id(model.config)
        self.pad_id = model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.start_id
        self.stop_ids = stop_ids_of(model)
        self.engine_arguments = {
            "dtype": self.dtype,
            "batch_rows": batch_rows,
            "device": self.platform,
            "decoder_start_token_id": self.start_id,
        }

    def close(self) -> None:
        """Nothing runs in the background: the weights go with the object."""

    def _generators(self, seed: int, count: int):
        import torch

        return [
            torch.Generator(device=self.platform).manual_seed(seed + index * SAMPLE_SEED_STRIDE)
            for index in range(count)
        ]

    def _encode(self, prompts: list[list[int]]):
        """The encoder's output and mask for right-padded prompts."""
        import torch

        longest = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.tensor(prompt)
            attention_mask[row, : len(prompt)] = 1
        input_ids, attention_mask = input_ids.to(self.platform), attention_mask.to(self.platform)
        encoded = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        return encoded, attention_mask

    def _entries(self, logprobs, chosen, top_k: int, generators):
        """(B, k+1) ids and logprobs: the chosen token, then the top-k (or k draws)."""
        import torch

        if self.settings.sampled_logprobs:
            draws = torch.stack(
                [
                    torch.multinomial(row.exp(), top_k, replacement=True, generator=generator)
                    for row, generator in zip(logprobs, generators, strict=True)
                ]
            )
        else:
            draws = torch.topk(logprobs, top_k, dim=-1).indices
        ids = torch.cat([chosen.unsqueeze(-1), draws], dim=1)
        return ids.to(torch.int32).cpu().numpy(), logprobs.gather(1, ids).cpu().numpy()

    def generate(
        self,
        prompts: Iterable[tuple[object, list[int], int]],
        *,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        top_k: int,
        max_in_flight: int,
    ) -> Iterator[tuple[object, list[Completion]]]:
        """Sample `num_samples` completions per (key, prompt_ids, seed) (temperature 0:
        greedy); yield them per request, batch by batch."""
        pending = iter(prompts)
        while window := list(itertools.islice(pending, max_in_flight)):
            window.sort(key=lambda item: len(item[1]))
            per_batch = max(1, self.batch_rows // num_samples)
            for start in range(0, len(window), per_batch):
                batch = window[start : start + per_batch]
                rows = [
                    (prompt, generator)
                    for _, prompt, seed in batch
                    for generator in self._generators(seed, num_samples)
                ]
                completions = self._generate_rows(
                    rows, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, top_k=top_k,
                )  # fmt: skip
                for index, (key, _, _) in enumerate(batch):
                    yield key, completions[index * num_samples : (index + 1) * num_samples]

    def _generate_rows(
        self, rows, *, temperature: float, top_p: float, max_new_tokens: int, top_k: int
    ) -> list[Completion]:
        """One batch of rows (prompt, generator), decoded together with the KV cache."""
        import torch

        generators = [generator for _, generator in rows]
        count = len(rows)
        tokens = [[] for _ in range(count)]
        entry_ids = [[] for _ in range(count)]
        entry_logprobs = [[] for _ in range(count)]
        finished = [False] * count
        with torch.no_grad():
            encoded, attention_mask = self._encode([prompt for prompt, _ in rows])
            next_input = torch.full((count, 1), self.start_id, dtype=torch.long)
            past = None
            for _ in range(max_new_tokens):
                output = self.model(
                    encoder_outputs=encoded,
                    attention_mask=attention_mask,
                    decoder_input_ids=next_input.to(self.platform),
                    past_key_values=past,
                    use_cache=True,
                )
                past = output.past_key_values
                logprobs = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)
                chosen = choose_tokens(logprobs, temperature, top_p, generators)
                ids, values = self._entries(logprobs, chosen, top_k, generators)
                for row in range(count):
                    if finished[row]:
                        continue
                    token = int(ids[row, 0])
                    tokens[row].append(token)
                    entry_ids[row].append(ids[row])
                    entry_logprobs[row].append(values[row])
                    finished[row] = token in self.stop_ids
                if all(finished):
                    break
                next_input = chosen.unsqueeze(-1).cpu()
        width = top_k + 1
        return [
            Completion(
                token_ids=np.asarray(tokens[row], dtype=np.int32),
                position_ids=np.asarray(entry_ids[row], dtype=np.int32).reshape(-1, width),
                position_logprobs=np.asarray(entry_logprobs[row], dtype=np.float32).reshape(
                    -1, width
                ),
                finish_reason="stop" if finished[row] else "length",
            )
            for row in range(count)
        ]

    def score(
        self,
        sequences: Iterable[tuple[object, list[int]]],
        *,
        top_k: int,
        max_in_flight: int,
        prompt_lengths: Iterable[int] | None = None,
    ) -> Iterator[tuple[object, ScoredSequence]]:
        """Teacher-force each (key, prompt_ids + target_ids), `prompt_lengths` saying where
        each prompt ends; yield vLLM's layout of the sequence (row j-1 predicts token j) as
        done, the rows before the target filled with PAD-like zeros (no distribution)."""
        if prompt_lengths is None:
            raise UserError(
                "an encoder-decoder model scores a target given its prompt, and raw text has no "
                "prompt: use it on a prompted task (teacher-dump --mode generate or score; "
                "kd-eval on a generation task)"
            )
        pending = zip(sequences, prompt_lengths, strict=True)
        while window := list(itertools.islice(pending, max_in_flight)):
            window.sort(key=lambda item: len(item[0][1]))
            for start in range(0, len(window), self.batch_rows):
                batch = window[start : start + self.batch_rows]
                scored = self._score_rows(
                    [(sequence[:length], sequence[length:]) for (_, sequence), length in batch],
                    top_k,
                    [self._generators(0, 1)[0] for _ in batch],
                )
                for ((key, _), _), result in zip(batch, scored, strict=True):
                    yield key, result

    def _score_rows(self, pairs, top_k: int, generators) -> list[ScoredSequence]:
        """One batch of (prompt, target) pairs teacher-forced in one decoder pass."""
        import torch

        longest = max(len(target) for _, target in pairs)
        decoder_ids = torch.full((len(pairs), longest), self.pad_id, dtype=torch.long)
        decoder_mask = torch.zeros((len(pairs), longest), dtype=torch.long)
        targets = torch.zeros((len(pairs), longest), dtype=torch.long)
        for row, (_, target) in enumerate(pairs):
            decoder_ids[row, : len(target)] = torch.tensor([self.start_id, *target[:-1]])
            decoder_mask[row, : len(target)] = 1
            targets[row, : len(target)] = torch.tensor(target)
        with torch.no_grad():
            encoded, attention_mask = self._encode([prompt for prompt, _ in pairs])
            logits = self.model(
                encoder_outputs=encoded,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_ids.to(self.platform),
                decoder_attention_mask=decoder_mask.to(self.platform),
            ).logits
        results = []
        width = top_k + 1
        for row, (prompt, target) in enumerate(pairs):
            logprobs = torch.log_softmax(logits[row, : len(target)].float(), dim=-1)
            chosen = targets[row, : len(target)].to(self.platform)
            ids, values = self._entries(logprobs, chosen, top_k, [generators[row]] * len(target))
            before = len(prompt) - 1  # vLLM's rows for the prompt's own tokens
            results.append(
                ScoredSequence(
                    position_ids=np.concatenate([np.zeros((before, width), np.int32), ids]),
                    position_logprobs=np.concatenate(
                        [np.zeros((before, width), np.float32), values.astype(np.float32)]
                    ),
                )
            )
        return results


def choose_tokens(logprobs, temperature: float, top_p: float, generators):
    """(B,) next tokens from (B, V) raw logprobs: argmax at temperature 0, else a draw from
    softmax(logprobs / temperature) restricted to its top-p nucleus, one generator per row."""
    import torch

    if temperature == 0:
        return logprobs.argmax(-1)
    probabilities = torch.softmax(logprobs / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probabilities.sort(dim=-1, descending=True)
        # Keep each token whose preceding mass is below top_p (the first is always kept).
        outside = ordered.cumsum(-1) - ordered >= top_p
        ordered = ordered.masked_fill(outside, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, ordered)
    return torch.stack(
        [
            torch.multinomial(row, 1, generator=generator)[0]
            for row, generator in zip(probabilities, generators, strict=True)
        ]
    )


def stop_ids_of(model) -> set[int]:
    """The ids that end a completion: the generation config's and the model config's eos."""
    ids = set()
    for config in (getattr(model, "generation_config", None), model.config):
        value = getattr(config, "eos_token_id", None) if config is not None else None
        for token_id in value if isinstance(value, list | tuple) else [value]:
            if token_id is not None:
                ids.add(int(token_id))
    return ids
