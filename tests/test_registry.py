"""rh_trl.load: one test per supported-models row, each on a tiny offline model whose files have the shape the public
checkpoint's files have (architectures, auto_map + custom code, tokenizer special tokens, hub id), plus the errors.

Custom-code checkpoints get small stand-in code files (same file names, class names and outputs as the real ones)
written into the model directory and loaded with ``trust_remote_code`` as the real code would be. Hub ids are served
offline from a hub cache laid out as ``hf download`` leaves it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from rh_trl import ORM, PRM, CLoud, CLoudModel, DrSow, ModelLoadError, PairwisePM
from rh_trl.registry import (
    UnknownModelError,
    hub_id_from_path,
    load,
    lookup,
    register_model,
    resolve,
    supported_engines,
)
from rh_trl.rewards.pairwise import LAYOUTS
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm, tiny_llama_config, tiny_reward_model
from tests.checkpoint_code import QWEN_PRM_MODEL_CODE, QWEN_RM_CONFIG_CODE

from .rlhflow_card import card_ids, llama3_tokenizer

TOL = 1e-5
SEP = "<extra_0>"
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPTS = [
    [{"role": "user", "content": "Write one sentence about the moon."}],
    [{"role": "user", "content": "What is 2 + 2?"}],
]
COMPLETIONS = [
    [{"role": "assistant", "content": "The moon is bright tonight."}],
    [{"role": "assistant", "content": "2 plus 2 is 4.\n\nSo the answer is 4."}],
]
SMALL = {"hidden": 32, "heads": 2, "layers": 1}


# -- tokenizers and files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tok():
    return bpe_tokenizer("llama")


@pytest.fixture(scope="module")
def chatml_tok():
    return bpe_tokenizer("chatml", vocab_size=400)


@pytest.fixture(scope="module")
def sep_tok():
    """Qwen2.5-Math-PRM's tokenizer shape: ChatML turns plus the special step separator ``<extra_0>``."""
    tok = bpe_tokenizer("chatml", vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": [SEP]})
    return tok


@pytest.fixture
def registry_snapshot(monkeypatch):
    """Rows registered by a test are dropped after it."""
    from rh_trl.models import catalog

    monkeypatch.setattr(catalog, "_ENTRIES", list(catalog._ENTRIES))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that hub ids are read from (offline)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def snapshot_dir(cache: Path, repo_id: str) -> Path:
    """The directory ``hf download repo_id`` fills in a hub cache (``refs/main`` pointing at a snapshot)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap


def save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def custom_code_model(path: Path, tok, config: dict, code: dict[str, str], auto_class: str):
    """Write config.json + code files like a custom-code checkpoint, build the model through them with random
    weights, save it, and return it (the instance built from the checkpoint's own code)."""
    import transformers

    path.mkdir(parents=True)
    for name, text in code.items():
        (path / name).write_text(text)
    (path / "config.json").write_text(json.dumps(config))
    cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(cfg, trust_remote_code=True).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    edit_config(path, architectures=config["architectures"], auto_map=config["auto_map"])
    return model


def small_config(tok, **fields) -> dict:
    return {**tiny_llama_config(tok, hidden=32, heads=2, layers=1).to_dict(), **fields}


def chat_ids(tok, prompt, completion) -> list[int]:
    return tok(tok.apply_chat_template(prompt + completion, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# -- sequence classification: Skywork-Reward, FsfairX, recipes/train_bt.py --------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sequence_classification_is_orm(tmp_path, chatml_tok, arch):
    if arch == "llama":
        model = tiny_reward_model(chatml_tok, seed=1, **SMALL)
    else:  # Skywork-Reward-V2-Qwen3-*
        from transformers import Qwen3Config, Qwen3ForSequenceClassification

        torch.manual_seed(1)
        cfg = Qwen3Config(vocab_size=len(chatml_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_labels=1,
                          pad_token_id=chatml_tok.pad_token_id)  # fmt: skip
        model = Qwen3ForSequenceClassification(cfg).eval()
    path = save(model, chatml_tok, tmp_path / "rm")
    rm = load(str(path))
    assert type(rm) is ORM and rm.adapter.name == "sequence-classification"
    with torch.no_grad():
        expected = [
            model(torch.tensor([chat_ids(chatml_tok, p, c)])).logits[0, 0].item()
            for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
        ]
    assert max_diff(rm.score(PROMPTS, COMPLETIONS), expected) <= TOL


# -- RLHFlow/ArmoRM-Llama3-8B-v0.1: custom code, outputs.score --------------------------------------------------

ARMORM_CODE = '''
from dataclasses import dataclass

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class GatedRewardOutput(ModelOutput):
    rewards: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    """Stand-in: objective rewards and a gated score read at the last real token."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.gating = torch.nn.Linear(config.hidden_size, config.num_objectives)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0]), attention_mask.sum(-1) - 1]
        rewards = self.regression_layer(last) * 50.0
        score = (self.gating(last).softmax(-1) * rewards).sum(-1)
        return GatedRewardOutput(rewards=rewards, score=score)
'''


def test_armorm_is_orm_with_its_adapter(tmp_path, llama_tok):
    config = small_config(
        llama_tok,
        architectures=["LlamaForRewardModelWithGating"],
        auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
        num_objectives=5,
    )
    path = tmp_path / "ArmoRM-Llama3-8B-v0.1"
    model = custom_code_model(path, llama_tok, config, {"modeling_custom.py": ARMORM_CODE},
                              "AutoModelForSequenceClassification")  # fmt: skip
    rm = load(str(path))
    assert type(rm) is ORM and rm.adapter.name == "armorm"
    with torch.no_grad():
        expected = [
            model(torch.tensor([chat_ids(llama_tok, p, c)])).score[0].item()
            for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
        ]
    assert max_diff(rm.score(PROMPTS, COMPLETIONS), expected) <= 1e-4


# -- internlm/internlm2-7b-reward: custom config + code, reward token appended ------------------------------------

INTERNLM2_CONFIG_CODE = """
from transformers import LlamaConfig


class InternLM2Config(LlamaConfig):
    model_type = "internlm2"
"""

INTERNLM2_MODEL_CODE = '''
import torch
from transformers import LlamaModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2ForRewardModel(PreTrainedModel):
    """Stand-in: a value head read at the last real token (the appended reward token)."""

    config_class = InternLM2Config
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.v_head = torch.nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scores = self.v_head(hidden).squeeze(-1) * 50.0
        ends = attention_mask.cumsum(dim=1).argmax(dim=1).view(-1, 1)
        return SequenceClassifierOutputWithPast(logits=torch.gather(scores, 1, ends))
'''


def test_internlm2_reward_is_orm_with_its_adapter(tmp_path):
    tok = bpe_tokenizer("chatml", vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["[UNUSED_TOKEN_130]"]})
    reward_token = tok.convert_tokens_to_ids("[UNUSED_TOKEN_130]")
    config = small_config(
        tok,
        architectures=["InternLM2ForRewardModel"],
        auto_map={
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
        },
        model_type="internlm2",
        reward_token_id=reward_token,
    )
    code = {
        "configuration_internlm2.py": INTERNLM2_CONFIG_CODE,
        "modeling_internlm2.py": INTERNLM2_MODEL_CODE,
    }
    path = tmp_path / "internlm2-7b-reward"
    model = custom_code_model(path, tok, config, code, "AutoModel")
    rm = load(str(path))
    assert type(rm) is ORM and rm.adapter.name == "internlm2-reward" and rm.suffix == [reward_token]
    with torch.no_grad():
        expected = [
            model(torch.tensor([chat_ids(tok, p, c) + [reward_token]])).logits[0, 0].item()
            for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
        ]
    assert max_diff(rm.score(PROMPTS, COMPLETIONS), expected) <= 1e-4


# -- Qwen/Qwen2.5-Math-PRM-7B: custom code (AutoModel), "<extra_0>" separator --------------------------------------


def qwen_config(tok, **fields) -> dict:
    from transformers import Qwen2Config

    base = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)  # fmt: skip
    return {**base.to_dict(), **fields}


@torch.no_grad()
def separator_reference(model, tok, prompt, completion) -> list[float]:
    """Qwen2.5-Math-PRM's own recipe, by hand: its system prompt, steps joined by <extra_0>, P(class 1) there."""
    steps = [s.strip() for s in completion[0]["content"].split("\n\n") if s.strip()]
    messages = [{"role": "system", "content": QWEN_MATH_SYSTEM}, *prompt,
                {"role": "assistant", "content": SEP.join(steps) + SEP}]  # fmt: skip
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    at = [t for t, i in enumerate(ids) if i == tok.convert_tokens_to_ids(SEP)]
    return model(torch.tensor([ids])).logits[0, at].softmax(-1)[:, 1].tolist()


def test_qwen_math_prm_custom_code_is_separator_prm(tmp_path, sep_tok):
    config = qwen_config(
        sep_tok,
        architectures=["Qwen2ForProcessRewardModel"],
        auto_map={
            "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
            "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel",
        },
    )
    code = {"configuration_qwen2_rm.py": QWEN_RM_CONFIG_CODE, "modeling_qwen2_rm.py": QWEN_PRM_MODEL_CODE}
    path = tmp_path / "prm-checkpoint"  # a name the registry does not know: the files decide
    model = custom_code_model(path, sep_tok, config, code, "AutoModel")
    prm = load(str(path))
    assert type(prm) is PRM and prm.kind == "separator"
    expected = [separator_reference(model, sep_tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    got = prm.score_steps(PROMPTS, COMPLETIONS)
    assert [len(s) for s in got] == [1, 2]
    assert (
        max(abs(a - b) for gs, es in zip(got, expected, strict=True) for a, b in zip(gs, es, strict=True))
        <= TOL
    )
    assert len({round(x, 6) for s in got for x in s}) > 1  # the steps get different scores
    if importlib.util.find_spec("vllm") is None:  # engine="vllm" reaches PRM's vLLM engine
        with pytest.raises(ImportError, match=r"rh_trl\[vllm\]"):
            load(str(path), engine="vllm")


def test_token_classification_with_separator_is_separator_prm(tmp_path, sep_tok, chatml_tok):
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    def build(tok, name):
        torch.manual_seed(2)
        cfg = Qwen2Config(**{k: v for k, v in qwen_config(tok).items() if k != "architectures"}, num_labels=2)
        return save(Qwen2ForTokenClassification(cfg).eval(), tok, tmp_path / name)

    prm = load(str(build(sep_tok, "converted-prm")))
    assert type(prm) is PRM and prm.kind == "separator"
    assert len(prm.score(PROMPTS, COMPLETIONS)) == 2
    no_separator = build(chatml_tok, "token-classifier")  # nothing in its files names a step token
    with pytest.raises(UnknownModelError, match=r"token-classification.*'<extra_0>'.*step_token="):
        load(str(no_separator))
    assert resolve(str(no_separator), step_token="<|im_end|>").family == "prm:separator"


# -- causal LMs known by hub id: RLHFlow PRMs, Math-Shepherd, RLHFlow pair-pm ---------------------------------------


def test_rlhflow_prm_by_hub_id_is_next_token_prm(hub_cache, llama_tok):
    repo = "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"
    save(tiny_causal_lm(llama_tok, seed=3, **SMALL), llama_tok, snapshot_dir(hub_cache, repo))
    prm = load(repo)  # offline, from the hub cache
    assert type(prm) is PRM and prm.kind == "next_token"
    steps = prm.score_steps(PROMPTS, COMPLETIONS)
    assert [len(s) for s in steps] == [1, 2] and all(0 < x < 1 for s in steps for x in s)
    assert lookup(repo.replace("Deepseek", "Mistral")).options == {"kind": "next_token"}


def test_local_copy_is_matched_by_cache_path_or_directory_name(tmp_path, llama_tok, chatml_tok):
    lm = tiny_causal_lm(llama_tok, seed=3, **SMALL)
    snap = save(lm, llama_tok, snapshot_dir(tmp_path / "cache", "RLHFlow/Llama3.1-8B-PRM-Mistral-Data"))
    assert hub_id_from_path(snap) == "RLHFlow/Llama3.1-8B-PRM-Mistral-Data"
    assert resolve(str(snap)).family == "prm:next_token"
    local_dir = save(lm, llama_tok, tmp_path / "Llama3.1-8B-PRM-Deepseek-Data")  # hf download --local-dir
    res = resolve(str(local_dir))
    assert res.family == "prm:next_token" and "directory name" in res.reason
    # a name is weaker than the config: a sequence classifier under a PRM's name is still an ORM
    misnamed = save(tiny_reward_model(chatml_tok, **SMALL), chatml_tok, tmp_path / "Qwen2.5-Math-PRM-7B")
    assert resolve(str(misnamed)).family == "orm"


def test_math_shepherd_by_hub_id_is_step_tag_prm(hub_cache):
    from transformers import MistralConfig, MistralForCausalLM

    tok = bpe_tokenizer("llama")
    tok.add_tokens(["ки"])  # a plain vocabulary token in Math-Shepherd's tokenizer
    torch.manual_seed(4)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)  # fmt: skip
    repo = "peiyi9979/math-shepherd-mistral-7b-prm"
    save(MistralForCausalLM(cfg), tok, snapshot_dir(hub_cache, repo))
    prm = load(repo)
    assert type(prm) is PRM and prm.kind == "step_tag" and prm.layout.marker == "ки"
    assert all(0 < x < 1 for s in prm.score_steps(PROMPTS, COMPLETIONS) for x in s)


def test_pair_preference_model_by_hub_id_is_pairwise_with_its_cards_layout(hub_cache):
    repo = "RLHFlow/pair-preference-model-LLaMA3-8B"
    tok = llama3_tokenizer()
    snapshot = save(tiny_causal_lm(tok, seed=5, **SMALL), tok, snapshot_dir(hub_cache, repo))
    pm = load(repo, group_size=2)
    assert type(pm) is PairwisePM and pm.group_size == 2  # the caller's options reach the class
    assert pm.layout == LAYOUTS["rlhflow"]
    assert pm.encode(PROMPTS[1], "Fast.", "Loud.") == card_ids(tok, PROMPTS[1], "Fast.", "Loud.")
    p = pm.compare(PROMPTS[0], "The moon is bright.", "Cheese.")
    assert 0 < p < 1 and abs(pm.compare(PROMPTS[0], "Cheese.", "The moon is bright.") - (1 - p)) <= 1e-6
    assert lookup("RLHFlow/pair-preference-model-Gemma-2B").options == {"layout": "rlhflow"}  # siblings too
    assert load(repo, layout="rh_trl").layout == LAYOUTS["rh_trl"]  # and the caller can choose
    for source in (repo, str(snapshot)):  # built directly, the class asks the registry for the layout too
        assert PairwisePM(source).layout == LAYOUTS["rlhflow"]


# -- CLoud -----------------------------------------------------------------------------------------------------------


def test_saved_cloud_model_is_cloud(tmp_path, chatml_tok):
    model = CLoudModel.from_causal_lm(tiny_causal_lm(chatml_tok, seed=6, **SMALL))
    path = save(model, chatml_tok, tmp_path / "cloud-rm")
    cloud = load(str(path), max_new_tokens=3)
    assert type(cloud) is CLoud and cloud.max_new_tokens == 3
    assert all(math.isfinite(x) for x in cloud.score(["Say hi."], ["Hi!"]))
    assert supported_engines(type(cloud), {}) == ("hf", "vllm", "openai")  # critiques and head on vLLM too


def test_original_cloud_format_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "Llama3-8B-CLoud-RM"
    path.mkdir()
    config = {"architectures": ["CLoudRewardModel"], "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
              "feedback_method": "teacher", "model_type": ""}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownModelError, match="original CLoud repository's format.*CLoudModel"):
        load(str(path))
    with pytest.raises(UnknownModelError, match="original CLoud repository's format"):
        load("ankner/Llama3-8B-CLoud-RM")  # known by id: refused before any download


# -- DrSow -----------------------------------------------------------------------------------------------------------


def test_drsow_from_two_models(tmp_path, llama_tok, chatml_tok):
    strong = save(tiny_causal_lm(llama_tok, seed=7, **SMALL), llama_tok, tmp_path / "strong")
    weak = save(tiny_causal_lm(chatml_tok, seed=8, **SMALL), chatml_tok, tmp_path / "weak")
    drsow = load("drsow", strong=str(strong), weak=str(weak))
    assert type(drsow) is DrSow and drsow.engine_kind == "hf"
    assert all(math.isfinite(x) for x in drsow.score(PROMPTS, COMPLETIONS))
    served = load("drsow", engine="openai", strong="http://127.0.0.1:9", weak="http://127.0.0.1:10",
                  strong_tokenizer=str(strong), weak_tokenizer=str(weak))  # fmt: skip
    assert type(served) is DrSow and served.engine_kind == "openai"  # built without contacting the servers
    tiny = load("drsow", strong="rh_trl:tiny-policy", weak="rh_trl:tiny-lm-chatml")
    assert type(tiny) is DrSow
    with pytest.raises(ValueError, match=r"needs strong=… and weak=….*\['weak'\]"):
        load("drsow", strong=str(strong))


def test_tiny_names_and_loaded_models(chatml_tok):
    assert type(load("rh_trl:tiny-rm")) is ORM
    model = tiny_reward_model(chatml_tok, **SMALL)
    assert type(load(model, tokenizer=chatml_tok)) is ORM


# -- choosing by hand, registering -----------------------------------------------------------------------------------


def test_unknown_causal_lm_lists_what_was_read_and_how_to_choose(tmp_path, llama_tok):
    path = save(tiny_causal_lm(llama_tok, **SMALL), llama_tok, tmp_path / "my-model")
    with pytest.raises(UnknownModelError) as err:
        load(str(path))
    message = str(err.value)
    for needed in (
        "causal LM",
        "LlamaForCausalLM",
        "model_type 'llama'",
        "config.json",
        "tokenizer.json",
        "rh_trl.PRM(path, kind=",
        "rh_trl.PairwisePM(path)",
        "family='prm'",
        "register_model(",
    ):
        assert needed in message, needed  # fmt: skip
    prm = load(str(path), family="prm", kind="next_token")
    assert type(prm) is PRM and prm.kind == "next_token"
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        load(str(path), family="nope")


def test_register_model_as_call_and_decorator(tmp_path, llama_tok, chatml_tok, registry_snapshot, hub_cache):
    path = save(tiny_causal_lm(llama_tok, **SMALL), llama_tok, tmp_path / "house-prm-v2")
    register_model("myorg/house-prm-*", PRM, kind="next_token", aggregation="last")
    prm = load(str(path))
    assert type(prm) is PRM and prm.kind == "next_token" and prm.aggregation == "last"
    assert load(str(path), aggregation="mean").aggregation == "mean"  # the caller's options win

    calls = []

    @register_model("myorg/scorer-*")
    def build_scorer(model, **options):
        calls.append(options)
        return ORM(model, name="house_scorer", **options)

    assert build_scorer.__name__ == "build_scorer"  # the decorator returns what it decorates
    save(tiny_reward_model(chatml_tok, **SMALL), chatml_tok, snapshot_dir(hub_cache, "myorg/scorer-1"))
    rm = load("myorg/scorer-1", max_length=64)  # a hub id matches before the config is consulted
    assert rm.__name__ == "house_scorer" and calls == [{"max_length": 64}]
    with pytest.raises(ValueError, match=r"engines it supports: \['hf'\]"):  # it takes no engine argument
        load("myorg/scorer-1", engine="openai")


def test_lookup_precedence(registry_snapshot):
    assert lookup("Qwen/Qwen2.5-Math-PRM-72B").options == {"kind": "separator"}
    assert lookup("qwen/qwen2.5-math-prm-7b") is not None  # hub ids are matched case-insensitively
    assert lookup("someone/else") is None
    register_model("RLHFlow/Llama3.1-8B-PRM-Deepseek-Data", PRM, kind="step_tag")
    register_model("RLHFlow/Llama3.1-8B-PRM-*", PRM, kind="separator")
    assert lookup("RLHFlow/Llama3.1-8B-PRM-Deepseek-Data").options == {"kind": "step_tag"}  # exact beats glob
    assert lookup("RLHFlow/Llama3.1-8B-PRM-Mistral-Data").options == {"kind": "separator"}  # newest glob wins
    with pytest.raises(ValueError, match="module:Class"):
        register_model("x/y", "not_a_target")


# -- errors ------------------------------------------------------------------------------------------------------------


def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "missing"))


def test_hub_id_offline_says_so(hub_cache):
    with pytest.raises(ModelLoadError, match=r"offline mode is on.*not in the local hub cache.*local copy"):
        load("some-org/some-reward-model")


def test_unsupported_model_is_refused():
    with pytest.raises(UnknownModelError, match="Starling-RM-34B.*standalone script"):
        load("Nexusflow/Starling-RM-34B")


def test_engines_a_class_does_not_run_on(tmp_path, llama_tok, chatml_tok, hub_cache):
    rm_path = save(tiny_reward_model(chatml_tok, **SMALL), chatml_tok, tmp_path / "rm")
    with pytest.raises(
        ValueError, match=r"ORM \(orm\) does not run on engine='vllm'; engines it supports: \['hf'\]"
    ):
        load(str(rm_path), engine="vllm", adapter="armorm")
    with pytest.raises(ValueError, match="which vLLM's model registry does not have"):  # and why
        load(str(rm_path), engine="vllm", adapter="armorm")
    repo = "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"
    save(tiny_causal_lm(llama_tok, **SMALL), llama_tok, snapshot_dir(hub_cache, repo))
    resolution = resolve(repo)
    assert resolution.options == {"kind": "next_token"}  # every PRM kind runs on every engine
    assert supported_engines(resolution.target, resolution.options) == ("hf", "vllm", "openai")
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        load(str(rm_path), engine="tgi")


def test_server_hosts_any_loaded_reward(tmp_path, sep_tok):
    """`rh-trl serve` builds rewards of every family from `type: python, target: rh_trl.registry:load`."""
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    from rh_trl.serve.config import RewardSpec, build_reward

    cfg = Qwen2Config(**{k: v for k, v in qwen_config(sep_tok).items() if k != "architectures"}, num_labels=2)
    path = save(Qwen2ForTokenClassification(cfg), sep_tok, tmp_path / "prm")
    cases = {
        "math_prm": ({"model": str(path)}, PRM),
        "tiny_orm": ({"model": "rh_trl:tiny-rm"}, ORM),
        "tiny_drsow": (
            {"model": "drsow", "strong": "rh_trl:tiny-policy", "weak": "rh_trl:tiny-lm-chatml"},
            DrSow,
        ),
    }
    for name, (options, cls) in cases.items():
        spec = RewardSpec(name=name, type="python", target="rh_trl.registry:load", options=options)
        reward = build_reward(spec)
        assert type(reward) is cls and reward.__name__ == name
