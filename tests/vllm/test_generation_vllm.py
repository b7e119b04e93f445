"""Generation on real vLLM: GenRM judgements and CLoud critiques from an in-process ``vllm.LLM`` and from ``vllm serve``
(chat completions) equal those generated with transformers from the same checkpoint (greedy, float32 on both
sides), for every judge template; sampling on vLLM is reproducible with a seed."""

from __future__ import annotations

import pytest
import torch

from rh_trl import CLoud, CLoudModel, GenRM, JudgeTemplate
from rh_trl.engines.generation import HFGenerator
from rh_trl.engines.http import ModelNotServedError
from rh_trl.engines.vllm_generation import VLLMGenerator
from rh_trl.models.loading import load_tokenizer
from rh_trl.rewards.genrm_templates import ListParser
from tests.conftest import CONV_COMPLETIONS, CONV_PROMPTS
from tests.vllm.conftest import ENGINE_KWARGS

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
#: every kind of judge template: pointwise (built in, and one a random judge "answers"), pairwise, listwise
TEMPLATES = {
    "wordcount": TEMPLATE,
    "rating": "rating",
    "pairwise": "pairwise",
    "listwise": "listwise",
    "listwise_custom": JudgeTemplate(
        user="Q: {question}\n{responses}\nScores:", parser=ListParser(), listwise=True
    ),
}
GROUP_PROMPTS = [CONV_PROMPTS[0]] * 3 + [CONV_PROMPTS[2]] * 2
GROUP_COMPLETIONS = [CONV_COMPLETIONS[k % 3] for k in range(5)]


def extras(reward, prompts, completions):
    logged: dict[str, list] = {}
    rewards = reward(prompts, completions, log_extra=lambda key, values: logged.__setitem__(key, values))
    return rewards, logged


def test_genrm_on_vllm_serve_equals_local_generation(checkpoints, servers):
    local = GenRM(str(checkpoints.strong), template=TEMPLATE, max_new_tokens=MAX_NEW_TOKENS, name="judge")
    served = GenRM(
        servers["strong"],
        engine="openai",
        served_model="strong",
        template=TEMPLATE,
        max_new_tokens=MAX_NEW_TOKENS,
        name="judge",
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
    load_tokenizer(str(checkpoints.strong), None).save_pretrained(
        cloud_dir
    )  # a checkpoint holds its tokenizer
    tokenizer = str(checkpoints.strong)
    local = CLoud(str(cloud_dir), tokenizer, max_new_tokens=MAX_NEW_TOKENS, name="cloud")
    served = CLoud(
        servers["strong"],
        str(cloud_dir),
        engine="openai",
        max_new_tokens=MAX_NEW_TOKENS,
        name="cloud",
        served_model="strong",
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
    judge = GenRM(
        servers["strong"], engine="openai", served_model="judge-72b", template=TEMPLATE, max_new_tokens=4
    )
    with pytest.raises(
        ModelNotServedError, match=r"does not serve the model 'judge-72b'; it serves \['strong'\]"
    ):
        judge(CONV_PROMPTS, CONV_COMPLETIONS)


def test_former_spellings_still_work_with_a_deprecation_warning(checkpoints, servers):
    with pytest.warns(DeprecationWarning, match=r"GenRM\(model, base_url=URL\) is deprecated"):
        judge = GenRM("strong", base_url=servers["strong"], template=TEMPLATE, max_new_tokens=4, name="old")
    assert judge.client is not None and judge.client.model == "strong"
    assert all(r is not None for r in judge(CONV_PROMPTS, CONV_COMPLETIONS))


# -- in-process vLLM -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_judge(checkpoints):
    """One in-process vLLM generator (greedy), shared by the judges of every template."""
    path = str(checkpoints.strong)
    settings = {**ENGINE_KWARGS, "max_model_len": 1024}  # the judge templates' system prompts are long
    generator = VLLMGenerator(path, load_tokenizer(path, None), max_new_tokens=MAX_NEW_TOKENS, **settings)
    yield generator
    generator.close()


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_genrm_on_in_process_vllm_equals_hf_for_every_template(checkpoints, vllm_judge, template):
    path = str(checkpoints.strong)
    options = {"template": TEMPLATES[template], "max_new_tokens": MAX_NEW_TOKENS, "name": "judge"}
    local = GenRM(path, **options)
    on_vllm = GenRM(engine=vllm_judge, **options)
    local_rewards, local_logged = extras(local, GROUP_PROMPTS, GROUP_COMPLETIONS)
    vllm_rewards, vllm_logged = extras(on_vllm, GROUP_PROMPTS, GROUP_COMPLETIONS)
    texts = [complete_text(t) for t in vllm_logged["judge/judgement"]]
    assert texts == [complete_text(t) for t in local_logged["judge/judgement"]]
    assert any(texts)
    assert vllm_rewards == local_rewards
    calls = {"pairwise": 3 * 2 + 2 * 1, "listwise": 2, "listwise_custom": 2}
    if template in calls:  # the whole group is judged: every ordered pair, or one call per group
        key = "num_comparisons" if template == "pairwise" else "num_judge_calls"
        assert on_vllm.last_stats[key] == calls[template]


def test_genrm_engine_vllm_builds_its_own_generator(checkpoints):
    judge = GenRM(
        str(checkpoints.strong),
        engine="vllm",
        template=TEMPLATE,
        max_new_tokens=MAX_NEW_TOKENS,
        vllm_kwargs=ENGINE_KWARGS,
        name="judge",
    )
    try:
        assert isinstance(judge.engine, VLLMGenerator) and judge.engine.engine.dtype == "float32"
        local = GenRM(str(checkpoints.strong), template=TEMPLATE, max_new_tokens=MAX_NEW_TOKENS, name="judge")
        assert judge(CONV_PROMPTS, CONV_COMPLETIONS) == local(CONV_PROMPTS, CONV_COMPLETIONS)
    finally:
        judge.engine.close()


def test_sampling_on_vllm_is_reproducible_with_a_seed(checkpoints, vllm_judge):
    path = str(checkpoints.strong)
    tokenizer = load_tokenizer(path, None)
    prompts = [
        vllm_judge.render([{"role": "user", "content": f"Say something about {w}."}]) for w in ("tea", "rain")
    ]
    greedy = [g.token_ids for g in vllm_judge.generate(prompts)]
    runs: dict[int, list] = {}
    for seed in (1, 1, 2):  # the same engine, sampling with a seed
        sampled = VLLMGenerator(
            vllm_judge.engine, tokenizer, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, seed=seed
        )
        runs.setdefault(seed, []).append([g.token_ids for g in sampled.generate(prompts)])
    assert runs[1][0] == runs[1][1]  # the same seed: the same samples
    assert runs[1][0] != runs[2][0] and runs[1][0] != greedy  # another seed, or greedy: others
    hf = HFGenerator(
        rh_trl_lm(path), tokenizer, max_new_tokens=MAX_NEW_TOKENS, do_sample=False
    )  # greedy on both engines: the same tokens
    assert [g.token_ids for g in hf.generate(prompts)] == greedy


def rh_trl_lm(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_cloud_on_in_process_vllm_equals_hf(tmp_path, checkpoints):
    """Critiques generated on vLLM, and the reward head read from vLLM's final hidden state (score_engine='vllm')
    or from transformers (score_engine='hf')."""
    cloud_dir = tmp_path / "cloud"
    torch.manual_seed(0)
    CLoudModel.from_causal_lm(rh_trl_lm(str(checkpoints.strong))).save_pretrained(cloud_dir)
    tokenizer = str(checkpoints.strong)
    local = CLoud(str(cloud_dir), tokenizer, max_new_tokens=MAX_NEW_TOKENS, name="cloud")
    on_vllm = CLoud(
        str(cloud_dir),
        tokenizer,
        engine="vllm",
        max_new_tokens=MAX_NEW_TOKENS,
        vllm_kwargs=ENGINE_KWARGS,
        name="cloud",
    )
    try:
        assert on_vllm.model is None and on_vllm.score_engine == "vllm"  # nothing of it left on transformers
        local_rewards, local_logged = extras(local, CONV_PROMPTS, CONV_COMPLETIONS)
        vllm_rewards, vllm_logged = extras(on_vllm, CONV_PROMPTS, CONV_COMPLETIONS)
        critiques = [complete_text(t) for t in vllm_logged["cloud/critique"]]
        assert critiques == [complete_text(t) for t in local_logged["cloud/critique"]] and all(critiques)
        assert max(abs(a - b) for a, b in zip(vllm_rewards, local_rewards, strict=True)) <= 1e-4
    finally:
        on_vllm.generator.close()
        on_vllm.engine.close()
