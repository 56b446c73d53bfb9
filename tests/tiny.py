"""Tiny, offline, randomly initialised models and a real trained BPE tokenizer for fast tests.

The tokenizer is a byte-level BPE (the GPT-2/SmolLM2 family of tokenizers) trained in well under a second
on the bundled zsRE questions, so tokenisation behaves like a real one: leading spaces merge into words,
and padding side and BOS can be switched to mimic SmolLM2 (no BOS, right padding) or Gemma (BOS, left).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 600


def _training_text() -> list[str]:
    texts = ["The capital of France is Paris.", "The mother tongue of Danielle Darrieux is French."]
    for path in sorted((ROOT / "data").glob("zsre*")):
        try:
            import gzip

            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                records = json.load(f)
            for r in records[:400]:
                texts += [str(r.get("src", r.get("prompt", ""))), str(r.get("alt", r.get("target_new", "")))]
        except (OSError, ValueError):
            continue
    return texts


@functools.lru_cache(maxsize=1)
def _bpe() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<bos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(bos: bool = False, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A trained byte-level BPE tokenizer; ``bos=True`` prepends ``<bos>`` like Gemma/Llama tokenizers."""
    tok = Tokenizer.from_str(_bpe())
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<bos>" if bos else None,
        pad_token="<pad>",
        padding_side=padding_side,
    )
    return fast


def tiny_model(kind: str = "llama", seed: int = 0, layers: int = 4) -> torch.nn.Module:
    """A randomly initialised causal LM of the given family, small enough to run in milliseconds."""
    common = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 2}
    if kind == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **common)
    elif kind == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common)
    elif kind == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               max_position_embeddings=128, **common)
    elif kind == "gptj":
        config = GPTJConfig(n_embd=32, n_layer=layers, n_head=4, n_positions=128, rotary_dim=4, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model
