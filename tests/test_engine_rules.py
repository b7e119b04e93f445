"""What the vLLM paths rely on that runs without vLLM: the logits of a few tokens computed from hidden states and
rows read from a checkpoint, the engine argument, the memory split, the ``__main__`` guard, deprecated spellings.
The vLLM engines themselves run against real vLLM in tests/vllm (-m vllm)."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

import rh_trl
from rh_trl.engines import vllm_llm
from rh_trl.engines.chosen_logits import ChosenLogits
from rh_trl.engines.vllm_llm import check_memory_split, engine_kind, reserve_memory, unguarded
from rh_trl.rewards.genrm_templates import ListParser, builtin_template, number_responses
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer("llama")


@pytest.mark.parametrize("tied", [False, True])
def test_chosen_logits_from_a_checkpoint_equal_the_models_own_logits(tmp_path, tok, tied):
    lm = tiny_causal_lm(tok, seed=3, tie_word_embeddings=tied).eval()
    with torch.no_grad():
        lm.lm_head.weight.normal_(0.0, 0.5)
    lm.save_pretrained(tmp_path)
    ids = [tok.convert_tokens_to_ids(t) for t in ("A", "B", "+")]
    chosen = ChosenLogits.from_checkpoint(tmp_path, ids)
    tokens = torch.tensor([tok("The moon is bright tonight.")["input_ids"]])
    with torch.no_grad():
        out = lm(tokens, output_hidden_states=True)
    got = chosen(out.hidden_states[-1][0])
    assert (got - out.logits[0][:, ids]).abs().max() <= 1e-5
    assert chosen.rows.shape == (3, lm.config.hidden_size)


def test_chosen_logits_apply_the_models_logit_transforms():
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    hidden = torch.tensor([[30.0, 5.0]])
    assert ChosenLogits(rows)(hidden).tolist() == [[30.0, 10.0]]
    capped = ChosenLogits(rows, config={"final_logit_softcapping": 20.0})(hidden)
    assert capped[0].tolist() == pytest.approx([20 * math.tanh(1.5), 20 * math.tanh(0.5)])
    assert ChosenLogits(rows, config={"logit_scale": 0.5})(hidden).tolist() == [[15.0, 5.0]]
    assert ChosenLogits(rows, config={"logits_scaling": 2.0})(hidden).tolist() == [[15.0, 5.0]]
    with pytest.raises(ValueError, match="output_multiplier_scale=3.*use engine='hf'"):
        ChosenLogits(rows, config={"output_multiplier_scale": 3.0})


def test_the_engine_argument_names_the_engines_and_the_closest():
    assert [engine_kind(e) for e in ("hf", "vllm", "openai")] == ["hf", "vllm", "openai"]
    with pytest.raises(
        ValueError, match=r"one of \['hf', 'vllm', 'openai'\].*got 'opneai' \(did you mean 'openai'"
    ):
        engine_kind("opneai")
    with pytest.raises(ValueError, match="got 3"):
        engine_kind(3)
    with pytest.raises(ValueError, match=r"engine must be one of"):
        rh_trl.PairwisePM("rh_trl:tiny-lm-chatml", engine="sglang")
    with pytest.raises(TypeError, match="engine= takes 'hf', 'vllm', 'openai' or an engine object"):
        rh_trl.GenRM(engine=object())


def test_the_memory_split_is_checked_against_what_is_reserved(monkeypatch):
    monkeypatch.setattr(vllm_llm, "splits_accelerator_memory", lambda: True)  # as on a GPU
    try:
        reserve_memory("the trainer's engine", 0.6)
        check_memory_split(0.4, "a reward")  # exactly the whole device
        with pytest.raises(ValueError, match=r"the trainer's engine 0\.6 \+ a reward 0\.5 = 1\.1 > 1"):
            check_memory_split(0.5, "a reward")
        with pytest.raises(ValueError, match=r"must be in \(0, 1\], got 1\.5"):
            check_memory_split(1.5, "a reward")
    finally:
        vllm_llm._reserved.clear()


@pytest.mark.parametrize(
    ("source", "line", "refused"),
    [
        ("import rh_trl\nrm = rh_trl.ORM('x', engine='vllm')\n", 2, True),
        ("import rh_trl\nif __name__ == '__main__':\n    rm = rh_trl.ORM('x', engine='vllm')\n", 3, False),
        ("def main():\n    pass\n\nif '__main__' == __name__:\n    main()\n", 5, False),
        ("if __name__ != '__main__':\n    rm = 1\n", 2, True),
    ],
)
def test_an_engine_built_outside_the_main_guard_is_found(tmp_path, source, line, refused):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    problem = unguarded(script, line)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith(f"train.py, line {line}: a vLLM engine is built at the top level")
        assert 'if __name__ == "__main__":' in problem


def test_listwise_parser_reads_one_score_per_response():
    parser = ListParser()
    assert parser.parse("Thoughts...\nScores: [7, 3, 10]", 3) == pytest.approx([0.7, 0.3, 1.0])
    assert parser.parse("Format 'Scores: [s1, s2]'. Final answer:\nscores = [2.5, 8]", 2) == [0.25, 0.8]
    assert parser.parse("Scores: [7, 3]", 3) is None  # one score missing
    assert parser.parse("Scores: [7, 11, 2]", 3) is None  # off the scale
    assert parser.parse("They are all fine.", 1) is None and parser.parse(None, 1) is None
    assert ListParser(scale_to_unit=False).parse("Scores: [4]", 1) == [4.0]
    template = builtin_template("listwise")
    assert template.kind == "listwise" and template.needed_fields() == {"responses"}
    shown = number_responses(["first", "second"])
    assert "[The Start of Response 2]\nsecond\n[The End of Response 2]" in shown
    with pytest.raises(ValueError, match="a listwise template reads its verdict with a ListParser"):
        rh_trl.JudgeTemplate(
            "{question} {responses}", parser=builtin_template("reward").parser, listwise=True
        )
