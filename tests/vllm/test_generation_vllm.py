"""Generation on real ``vllm serve`` (chat completions): GenRM judgements and CLoud critiques from the server equal
those generated locally with transformers from the same checkpoint (greedy, float32 on both sides)."""

from __future__ import annotations

import pytest
import torch

from rh_trl import CLoud, CLoudModel, GenRM, JudgeTemplate
from rh_trl.engines.http import ModelNotServedError
from tests.conftest import CONV_COMPLETIONS, CONV_PROMPTS

pytestmark = pytest.mark.vllm

MAX_NEW_TOKENS = 12


def complete_text(text: str | None) -> str | None:
    """A tiny random model writes arbitrary bytes: where its last tokens end inside a UTF-8 character, vLLM's
    detokenizer leaves them out while transformers' decode shows U+FFFD; compare the complete characters."""
    return None if text is None else text.rstrip("\ufffd")


class WordCount:
    """A verdict parser for a judge that never writes a score: the number of words of its answer."""

    def parse(self, text: str | None) -> float | None:
        return None if text is None else float(len(complete_text(text).split()))


TEMPLATE = JudgeTemplate(user="Question: {question}\nAnswer: {response}\nScore 0-9:", parser=WordCount())


def extras(reward, prompts, completions):
    logged: dict[str, list] = {}
    rewards = reward(prompts, completions, log_extra=lambda key, values: logged.__setitem__(key, values))
    return rewards, logged


def test_genrm_on_vllm_serve_equals_local_generation(checkpoints, servers):
    local = GenRM(str(checkpoints.strong), template=TEMPLATE, max_new_tokens=MAX_NEW_TOKENS, name="judge")
    served = GenRM(
        "strong", base_url=servers["strong"], template=TEMPLATE, max_new_tokens=MAX_NEW_TOKENS, name="judge"
    )
    local_rewards, local_logged = extras(local, CONV_PROMPTS, CONV_COMPLETIONS)
    served_rewards, served_logged = extras(served, CONV_PROMPTS, CONV_COMPLETIONS)
    served_texts = [complete_text(t) for t in served_logged["judge/judgement"]]
    assert served_texts == [complete_text(t) for t in local_logged["judge/judgement"]]
    assert all(served_texts)  # the server generated text for every sample
    assert served_rewards == local_rewards and all(r is not None for r in served_rewards)
    assert served.last_stats["num_server_failed"] == 0


def test_cloud_critiques_on_vllm_serve_equal_local_ones(tmp_path, checkpoints, servers):
    """The server serves the CLoud model's LM; critiques continue the open user turn (continue_final_message)."""
    from transformers import AutoModelForCausalLM

    cloud_dir = tmp_path / "cloud"
    CLoudModel.from_causal_lm(AutoModelForCausalLM.from_pretrained(checkpoints.strong)).save_pretrained(
        cloud_dir
    )
    tokenizer = str(checkpoints.strong)
    local = CLoud(str(cloud_dir), tokenizer, max_new_tokens=MAX_NEW_TOKENS, name="cloud")
    served = CLoud(
        str(cloud_dir),
        tokenizer,
        max_new_tokens=MAX_NEW_TOKENS,
        name="cloud",
        critique_url=servers["strong"],
        critique_model="strong",
    )
    local_rewards, local_logged = extras(local, CONV_PROMPTS, CONV_COMPLETIONS)
    served_rewards, served_logged = extras(served, CONV_PROMPTS, CONV_COMPLETIONS)
    served_critiques, local_critiques = served_logged["cloud/critique"], local_logged["cloud/critique"]
    assert [complete_text(t) for t in served_critiques] == [complete_text(t) for t in local_critiques]
    assert all(served_critiques) and served.last_stats["num_critique_failed"] == 0
    # the reward is the head read after the critique's text: where the texts are equal, so are the rewards, and
    # every served reward is the head on its own critique
    same = [i for i, (a, b) in enumerate(zip(served_critiques, local_critiques, strict=True)) if a == b]
    assert same and all(abs(served_rewards[i] - local_rewards[i]) <= 1e-5 for i in same)
    for i, critique in enumerate(served_critiques):
        ids = local.score_ids(local.layout(CONV_PROMPTS[i], CONV_COMPLETIONS[i]), critique)
        with torch.no_grad():
            head = local.model(torch.tensor([ids])).rewards[0, -1]
        assert abs(served_rewards[i] - float(head)) <= 1e-5


def test_chat_server_wrong_model_name_is_a_configuration_error(servers):
    judge = GenRM("judge-72b", base_url=servers["strong"], template=TEMPLATE, max_new_tokens=4)
    with pytest.raises(
        ModelNotServedError, match=r"does not serve the model 'judge-72b'; it serves \['strong'\]"
    ):
        judge(CONV_PROMPTS, CONV_COMPLETIONS)
