"""Tiny real models for tests: a BPE tokenizer trained on text that ships with Python, and a
2-layer Llama built from a config. The embedding has more rows (512) than the tokenizer has
tokens (500), like Qwen's padded vocabulary, so padding-row ids are exercised."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_SIZE = 500
EMBEDDING_ROWS = 512


def build_tiny_tokenizer(directory: Path, size: int = TOKENIZER_SIZE):
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_tiny_llama(
    directory: Path,
    *,
    seed: int = 0,
    layers: int = 2,
    scale: float = 0.3,
    tokenizer_size: int = TOKENIZER_SIZE,
) -> Path:
    """Save a tiny random Llama (head_dim 32, as vLLM's CPU kernels need) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(directory, tokenizer_size)
    config = LlamaConfig(
        vocab_size=EMBEDDING_ROWS,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger-than-default weights give peaked, well-separated logits, so top-k order is
        # not decided by float noise when comparing engines.
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, scale)
    model.save_pretrained(directory)
    return directory
