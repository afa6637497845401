"""Tiny random Hugging Face models and tokenizers, made by the tests themselves (no hub)."""

from __future__ import annotations

from pathlib import Path

from jaxserver import JAXServerConfig

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 67890 appear here, with café, naïve and emoji 😀 too.",
] * 20


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def hf_config(kind: str, vocab_size: int):
    """A tiny config of the given family; large init so logits have clear maxima."""
    from transformers import LlamaConfig, Qwen2Config

    common = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.2,
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    if kind == "llama":
        return LlamaConfig(**common, rope_theta=100000.0, tie_word_embeddings=False)
    if kind == "llama3-tied":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**common, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)
    raise ValueError(kind)


def make_hf_model(folder: Path, kind: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(kind, len(tokenizer)))
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise them so their loading is tested
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_config(**overrides) -> JAXServerConfig:
    values = {
        "max_length": 128,
        "max_compile_tokens": 8,
        "warm_up": False,
        "compilation_cache_dir": None,
        "model_cache_dir": None,
        "seed": 0,
    }
    return JAXServerConfig(**(values | overrides))
