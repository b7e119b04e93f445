"""Shared fixtures: real tokenizers and tiny random models, all built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from rh_trl.testing import bpe_tokenizer, minilm_tokenizer, tiny_causal_lm, tiny_reward_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llama_tok():
    """Policy-style tokenizer: byte-level BPE, BOS added by tokenizer and template."""
    return bpe_tokenizer("llama")


@pytest.fixture(scope="session")
def chatml_tok():
    """A second BPE tokenizer with a ChatML template and no BOS."""
    return bpe_tokenizer("chatml", vocab_size=400)


@pytest.fixture(scope="session")
def minilm_tok():
    """MiniLM's pretrained WordPiece tokenizer with ChatML turns (unlike any policy tokenizer)."""
    return minilm_tokenizer()


@pytest.fixture(scope="session")
def rm_minilm(minilm_tok):
    return tiny_reward_model(minilm_tok, seed=1)


@pytest.fixture(scope="session")
def rm_chatml(chatml_tok):
    return tiny_reward_model(chatml_tok, seed=2)


@pytest.fixture(scope="session")
def policy(llama_tok):
    return tiny_causal_lm(llama_tok, seed=3)


CONV_PROMPTS = [
    [{"role": "user", "content": "Write one sentence about the moon."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe trains in a few words."},
    ],
    [{"role": "user", "content": "Name three things related to coffee."}],
]
CONV_COMPLETIONS = [
    [{"role": "assistant", "content": "The moon is bright tonight."}],
    [{"role": "assistant", "content": "Fast, loud, and long."}],
    [{"role": "assistant", "content": "Beans, cups and mornings."}],
]
TEXT_PROMPTS = ["Question: what is 2+2?\nAnswer:", "Tell a tiny story about a river.", "The night sky is"]
TEXT_COMPLETIONS = [" 4", " A river ran to the sea and met an old map.", " full of stars."]
