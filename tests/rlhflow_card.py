"""The inference code of the RLHFlow/pair-preference-model-LLaMA3-8B model card, typed from its description,
and a tokenizer shaped like that checkpoint's (Llama-3 special tokens and chat template)."""

from __future__ import annotations

import copy
from typing import Any

from rh_trl.testing import bpe_tokenizer

# The card gives its context tokenizer ("tokenizer_plain") this template: turns labelled by position.
CARD_PLAIN_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)
CARD_PROMPT_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"

# Meta-Llama-3-8B-Instruct's chat template, which the checkpoint's tokenizer carries.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def llama3_tokenizer() -> Any:
    """A BPE tokenizer with Llama-3's BOS, header and end-of-turn tokens and its chat template."""
    tok = bpe_tokenizer("llama")
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def card_ids(
    tokenizer: Any, instruction: list[dict[str, str]], response_a: str, response_b: str
) -> list[int]:
    """The token ids the card's code feeds the model for one order (A first)."""
    tokenizer_plain = copy.deepcopy(tokenizer)
    tokenizer_plain.chat_template = CARD_PLAIN_TEMPLATE
    context = tokenizer_plain.apply_chat_template(instruction, tokenize=False)
    prompt = CARD_PROMPT_TEMPLATE.format(context=context, response_A=response_a, response_B=response_b)
    message = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(message, tokenize=False).replace(tokenizer.bos_token, "")
    return tokenizer.encode(text, add_special_tokens=False)
