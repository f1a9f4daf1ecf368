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
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(directory, tokenizer_size)
    # Larger-than-default weights give peaked, well-separated logits, so top-k order is not
    # decided by float noise when comparing engines.
    model = random_llama(
        tokenizer, vocabulary=EMBEDDING_ROWS, hidden=64, layers=layers, heads=2, context=512,
        seed=seed, scale=scale,
    )  # fmt: skip
    model.save_pretrained(directory)
    return directory


def random_llama(
    tokenizer,
    *,
    vocabulary: int,
    hidden: int,
    layers: int,
    heads: int,
    context: int,
    seed: int,
    scale: float,
    head_scale: float | None = None,
):
    """A random LlamaForCausalLM (intermediate 2 x hidden, heads / 2 key-value heads, untied
    head): every weight matrix drawn from N(0, scale), the LM head's from N(0, head_scale)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocabulary,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return redraw_weights(LlamaForCausalLM(config), scale, head_scale)


def redraw_weights(model, scale: float, head_scale: float | None = None):
    """`model` with every weight matrix drawn again from N(0, scale) (the LM head's from
    N(0, head_scale) when given), in parameter order from torch's current seed."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                head = name.startswith("lm_head") and head_scale is not None
                parameter.normal_(0.0, head_scale if head else scale)
    return model


def build_tiny_bert_tokenizer(directory: Path):
    """A WordPiece (BERT-style) tokenizer trained on the Python docs: [CLS] text [SEP]."""
    import pydoc_data.topics

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_bert(
    directory: Path,
    *,
    labels: tuple[str, ...] | None = ("negative", "positive"),
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    scale: float = 0.3,
    tokenizer_from: Path | None = None,
) -> Path:
    """Save a tiny random BERT (head_dim 32) with a classification head for `labels`, or a bare
    BertModel when labels is None. `tokenizer_from`: reuse that model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        tokenizer.save_pretrained(directory)
    else:
        tokenizer = build_tiny_bert_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels or ()) or 2,
        id2label=dict(enumerate(labels)) if labels else None,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config) if labels else BertModel(config)
    # Larger-than-default weights give well-separated class probabilities, so that engines and
    # references are compared on distributions that are not all near uniform.
    redraw_weights(model, scale).save_pretrained(directory)
    return directory


def build_tiny_seq2seq(
    directory: Path, *, kind: str = "t5", seed: int = 0, layers: int = 2, scale: float = 0.3
) -> Path:
    """Save a tiny random encoder-decoder (kind "t5": T5ForConditionalGeneration with tied,
    rescaled outputs; "bart": BartForConditionalGeneration with its final_logits_bias) with the
    tiny BPE tokenizer: d_model 64, 2 heads of 32, `layers` encoder and decoder layers, 512
    embedding rows for the tokenizer's 500 tokens."""
    import torch
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(directory)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": EMBEDDING_ROWS,
    }
    if kind == "t5":
        config = T5Config(
            d_model=64, d_kv=32, num_heads=2, d_ff=128, num_layers=layers,
            num_decoder_layers=layers, decoder_start_token_id=tokenizer.pad_token_id,
            n_positions=512, **special,
        )  # fmt: skip
        model_class = T5ForConditionalGeneration
    elif kind == "bart":
        config = BartConfig(
            d_model=64, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
            max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
            decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=None, **special,
        )  # fmt: skip
        model_class = BartForConditionalGeneration
    else:
        raise ValueError(f"kind {kind!r}: t5 or bart")
    torch.manual_seed(seed)
    model = redraw_weights(model_class(config), scale)
    with torch.no_grad():
        if kind == "t5":
            # T5 scales its tied outputs by d_model^-0.5: larger embeddings give peaked logits,
            # so that top-k order is not decided by float noise when comparing with a reference.
            model.shared.weight.normal_(0.0, 2.0)
        else:  # a non-zero bias, so that leaving it out shows
            model.final_logits_bias.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    return directory


def build_tiny_masked_lm(
    directory: Path,
    *,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    scale: float = 0.3,
    tokenizer_from: Path | None = None,
) -> Path:
    """Save a tiny random BertForMaskedLM (head_dim 32). `tokenizer_from`: reuse that model's
    tokenizer (e.g. MiniLM's); default: the tiny WordPiece tokenizer of the Python docs."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        tokenizer.save_pretrained(directory)
    else:
        tokenizer = build_tiny_bert_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    redraw_weights(model, scale).save_pretrained(directory)
    return directory
