"""Tiny Hugging Face models and tokenizers built from configs (random weights, no downloads)."""

import torch
import transformers


def tiny_llama(tie: bool = True) -> torch.nn.Module:
    """A 2-layer LlamaForCausalLM: hidden 64, 4 heads / 2 KV heads, vocab 256, seeded weights."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer over a-z with two merges and <s> / </s> in its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(ord("a") + i): i for i in range(26)}
    vocab.update({"ab": 26, "abc": 27, "<s>": 28, "</s>": 29})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
