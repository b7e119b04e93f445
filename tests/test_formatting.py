"""Rendering with the reward model's tokenizer: layouts, response spans, BOS handling and truncation."""

from __future__ import annotations

import pytest

from rh_trl.formatting import (
    ChatFormatter,
    RewardInputError,
    Sample,
    plain_conversation,
    to_sample,
    to_samples,
)

from .conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS


def test_to_sample_formats():
    assert to_sample("a", "b") == Sample("a", "b")
    mixed = to_sample(CONV_PROMPTS[0], "text reply")
    assert mixed.response == [{"role": "assistant", "content": "text reply"}]
    upgraded = to_sample("question", CONV_COMPLETIONS[0])
    assert upgraded.prompt == [{"role": "user", "content": "question"}]
    chat = to_sample("q", "a", text_as_chat=True)
    assert chat.conversational and chat.messages[-1] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    ("prompt", "completion", "match"),
    [
        ("p", None, "completion is None"),
        ([{"content": "no role"}], "x", "'role' and 'content'"),
        ([], "x", "non-empty list of messages"),
        (3, "x", "string or a non-empty list"),
    ],
)
def test_to_sample_rejects_malformed(prompt, completion, match):
    with pytest.raises(RewardInputError, match=match):
        to_sample(prompt, completion)


def test_batch_length_mismatch_names_both_lengths():
    with pytest.raises(RewardInputError, match="2 prompts and 3 completions"):
        to_samples(["a", "b"], ["x", "y", "z"])
    with pytest.raises(RewardInputError, match="must be a list"):
        to_samples("a prompt", ["x"])


def test_chat_template_layout_matches_apply_chat_template(llama_tok):
    fmt = ChatFormatter(llama_tok)
    for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True):
        enc = fmt.encode(to_sample(p, c))
        text = llama_tok.apply_chat_template(p + c, tokenize=False)
        assert enc.input_ids == llama_tok(text, add_special_tokens=False)["input_ids"]
        assert enc.input_ids.count(llama_tok.bos_token_id) == 1  # template BOS, tokenizer BOS not added
        # the response span decodes to the response text (plus the template's closing tokens)
        assert llama_tok.decode(enc.response_ids).startswith(c[0]["content"])
        prefix = llama_tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        assert enc.response_start == len(llama_tok(prefix, add_special_tokens=False)["input_ids"])


def test_standard_layout_appends_eos_and_single_bos(llama_tok):
    fmt = ChatFormatter(llama_tok)
    enc = fmt.encode(to_sample(TEXT_PROMPTS[1], TEXT_COMPLETIONS[1]))
    assert enc.input_ids == llama_tok(TEXT_PROMPTS[1] + TEXT_COMPLETIONS[1] + "</s>")["input_ids"]
    assert enc.input_ids[0] == llama_tok.bos_token_id and enc.input_ids[1] != llama_tok.bos_token_id
    assert enc.input_ids[-1] == llama_tok.eos_token_id
    assert llama_tok.decode(enc.response_ids, skip_special_tokens=True) == TEXT_COMPLETIONS[1]


def test_doubled_bos_collapsed(llama_tok):
    # a prompt that already starts with the BOS text would otherwise give <s><s>
    enc = ChatFormatter(llama_tok).encode(to_sample("<s>" + TEXT_PROMPTS[0], TEXT_COMPLETIONS[0]))
    assert enc.input_ids[0] == llama_tok.bos_token_id and enc.input_ids[1] != llama_tok.bos_token_id
    assert llama_tok.decode(enc.response_ids, skip_special_tokens=True) == TEXT_COMPLETIONS[0]


def test_plain_layout_without_template(chatml_tok):
    fmt = ChatFormatter(chatml_tok, chat_template=False)
    sample = to_sample(CONV_PROMPTS[1], CONV_COMPLETIONS[1])
    text, start, _ = fmt.render(sample)
    assert (
        text
        == "System: Be brief.\n\nUser: Describe trains in a few words.\n\nAssistant: Fast, loud, and long.<|im_end|>"
    )
    assert text[start:].startswith("Fast, loud")
    assert plain_conversation(CONV_PROMPTS[0]) == "User: Write one sentence about the moon."


def test_wordpiece_tokenizer_spans(minilm_tok):
    fmt = ChatFormatter(minilm_tok)
    enc = fmt.encode(to_sample(CONV_PROMPTS[2], CONV_COMPLETIONS[2]))
    decoded = minilm_tok.decode(enc.response_ids, skip_special_tokens=True)
    assert decoded.startswith("beans, cups and mornings")  # lower-cased WordPiece


def test_empty_completion_has_empty_span(llama_tok):
    enc = ChatFormatter(llama_tok).encode(to_sample(TEXT_PROMPTS[2], ""))
    assert enc.response_ids == [llama_tok.eos_token_id]
    assert enc.truncated is None


def test_left_truncation_keeps_bos_and_whole_response(llama_tok):
    long_prompt = "Tell a tiny story about a river. " * 20
    full = ChatFormatter(llama_tok).encode(to_sample(long_prompt, TEXT_COMPLETIONS[1]))
    limit = 24
    enc = ChatFormatter(llama_tok, max_length=limit).encode(to_sample(long_prompt, TEXT_COMPLETIONS[1]))
    assert len(enc.input_ids) == limit and enc.truncated == "prompt"
    assert enc.input_ids == [llama_tok.bos_token_id] + full.input_ids[-(limit - 1) :]
    assert enc.response_ids == full.response_ids


def test_left_truncation_keeps_cls_for_bert_tokenizers(minilm_tok):
    """BERT-style classifiers pool the first position: a cut prompt must still open with [CLS]."""
    assert minilm_tok.bos_token_id is None and minilm_tok.cls_token_id is not None
    sample = to_sample("Tell a tiny story about a river. " * 20, "A short reply.")
    full = ChatFormatter(minilm_tok, chat_template=False).encode(sample)
    enc = ChatFormatter(minilm_tok, chat_template=False, max_length=16).encode(sample)
    assert full.input_ids[0] == minilm_tok.cls_token_id and enc.truncated == "prompt"
    assert enc.input_ids == [minilm_tok.cls_token_id] + full.input_ids[-15:]
    assert enc.response_ids == full.response_ids


def test_response_longer_than_max_length_keeps_its_end(chatml_tok):
    response = "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? " * 5
    full = ChatFormatter(chatml_tok).encode(to_sample("Hi", response))
    enc = ChatFormatter(chatml_tok, max_length=10).encode(to_sample("Hi", response))
    assert enc.truncated == "response"
    assert enc.input_ids == full.input_ids[-10:]  # no BOS in this tokenizer: plain left cut
    assert enc.response_start == 0


def test_custom_template_string_and_kwargs(chatml_tok):
    template = "{% for m in messages %}[{{ m['role'] }}{{ suffix }}]{{ m['content'] }}{% endfor %}"
    template += "{% if add_generation_prompt %}[assistant{{ suffix }}]{% endif %}"
    fmt = ChatFormatter(chatml_tok, chat_template=template, chat_template_kwargs={"suffix": "!"})
    text, start, add_special = fmt.render(to_sample(CONV_PROMPTS[0], CONV_COMPLETIONS[0]))
    assert text == "[user!]Write one sentence about the moon.[assistant!]The moon is bright tonight."
    assert text[start:] == "The moon is bright tonight." and add_special is False


def test_max_length_validation(llama_tok):
    with pytest.raises(ValueError, match="at least 2"):
        ChatFormatter(llama_tok, max_length=1)
