"""Stand-ins for tests, the quickstart and benchmarks, all offline.

* :mod:`rh_trl.testing.tiny_models`: real tokenizers (byte-level BPE trained on the bundled prompts, MiniLM's
  WordPiece) and tiny random models built from configs; the offline names ``rh_trl:tiny-rm`` etc. resolve here.
* :mod:`rh_trl.testing.openai_compat_server`: a small OpenAI-compatible completions server backed by a
  transformers model, standing in for ``vllm serve`` in the fast tests and benchmarks (the real one is tested in
  the vLLM stage).
"""

from rh_trl.testing.tiny_models import (
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
