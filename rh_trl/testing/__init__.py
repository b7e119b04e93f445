"""Test helpers, all offline.

* The tiny models and tokenizers of :mod:`rh_trl.models.offline` (product code: the offline names
  ``rh_trl:tiny-rm`` etc. resolve there), under the names tests and benchmarks use.
* :mod:`rh_trl.testing.openai_compat_server`: a small OpenAI-compatible completions server backed by a
  transformers model, standing in for ``vllm serve`` in the fast tests and benchmarks (the real one is tested in
  the vLLM stage). Nothing in the package imports it.
"""

from rh_trl.models.offline import (
    CHATML_TEMPLATE,
    LLAMA_STYLE_TEMPLATE,
    TINY_MODELS,
    bpe_tokenizer,
    bundled_prompts,
    minilm_tokenizer,
    synthetic_preferences,
    tiny_causal_lm,
    tiny_config,
    tiny_llama_config,
    tiny_model,
    tiny_reward_model,
    tiny_tokenizer,
)

__all__ = [
    "CHATML_TEMPLATE",
    "LLAMA_STYLE_TEMPLATE",
    "TINY_MODELS",
    "bpe_tokenizer",
    "bundled_prompts",
    "minilm_tokenizer",
    "synthetic_preferences",
    "tiny_causal_lm",
    "tiny_config",
    "tiny_llama_config",
    "tiny_model",
    "tiny_reward_model",
    "tiny_tokenizer",
]
