"""Rewards that read a model's final hidden states, on real vLLM (``runner="pooling"``, ``convert="embed"``) in process
and on ``vllm serve``, against the transformers engine on the same checkpoint: PairwisePM's A/B logits (the hidden
state at the last token times the A/B rows of the output projection), and EmbeddingRM's encoders (a causal LM's last
token; MiniLM's mean over tokens, normalized or not)."""

from __future__ import annotations

import pytest
import torch

from rh_trl import EmbeddingRM, PairwisePM, TextEncoder
from rh_trl.engines.vllm_pooling import VLLMPoolingEngine
from rh_trl.formatting import to_sample
from rh_trl.models.loading import minilm_path
from rh_trl.rewards.embedding_heads import EmbeddingHead
from tests.conftest import CONV_COMPLETIONS, CONV_PROMPTS
from tests.vllm.conftest import ENGINE_KWARGS, max_diff

pytestmark = pytest.mark.vllm

TOL = 1e-4
PROMPTS = [CONV_PROMPTS[0]] * 3 + [CONV_PROMPTS[1]] * 3
COMPLETIONS = [CONV_COMPLETIONS[k % 3] for k in range(6)]


@pytest.fixture(scope="module", autouse=True)
def module_servers(servers):
    servers.only("lm-last")  # the earlier modules' servers are done


@pytest.fixture(scope="module")
def last_hidden(checkpoints):
    """One in-process engine giving the final hidden state at the last token, shared by PairwisePM and a causal
    TextEncoder."""
    engine = VLLMPoolingEngine(str(checkpoints.lm), task="embed", **ENGINE_KWARGS)
    yield engine
    engine.close()


def test_pairwise_pm_on_vllm_equals_hf(checkpoints, last_hidden):
    path = str(checkpoints.lm)
    hf = PairwisePM(path, name="pm")
    on_vllm = PairwisePM(path, engine=last_hidden, name="pm")
    expected = hf.score(PROMPTS, COMPLETIONS)
    got = on_vllm.score(PROMPTS, COMPLETIONS)
    assert max_diff(got, expected) <= TOL
    assert len({round(r, 3) for r in got}) > 2  # the completions get different win rates
    pairs = (PROMPTS[:2], COMPLETIONS[:2], COMPLETIONS[1:3])
    assert on_vllm.compare_many(*pairs) == pytest.approx(hf.compare_many(*pairs), abs=TOL)


def test_pairwise_pm_on_vllm_serve_equals_hf(checkpoints, servers):
    """``vllm serve DIR --runner pooling --convert embed`` (the default: the last token, the embed task)."""
    path = str(checkpoints.lm)
    remote = PairwisePM(servers["lm-last"], path, engine="openai", batch_size=3, name="pm")
    expected = PairwisePM(path, name="pm").score(PROMPTS, COMPLETIONS)
    assert max_diff(remote.score(PROMPTS, COMPLETIONS), expected) <= TOL
    assert remote.last_stats["num_server_failed"] == 0


def _vectors(encoder: TextEncoder) -> torch.Tensor:
    embedded = encoder.embed([to_sample(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    return torch.stack(embedded.vectors)


def test_causal_encoder_on_vllm_and_vllm_serve_equals_hf(checkpoints, last_hidden, servers):
    path = str(checkpoints.lm)
    expected = _vectors(TextEncoder(path))
    on_vllm = TextEncoder(path, engine=last_hidden)
    remote = TextEncoder(servers["lm-last"], path, engine="openai")
    assert (on_vllm.kind, on_vllm.pooling, on_vllm.normalize) == ("causal", "last", False)
    assert (_vectors(on_vllm) - expected).abs().max() <= TOL
    assert (_vectors(remote) - expected).abs().max() <= TOL
    # an embedding reward on each: the same heads give the same rewards
    torch.manual_seed(0)
    heads = [EmbeddingHead(on_vllm.dim, hidden_dims=(8,)).eval() for _ in range(2)]
    rewards = [
        EmbeddingRM(enc, heads, name="emb").score(PROMPTS, COMPLETIONS)
        for enc in (TextEncoder(path), on_vllm)
    ]
    assert max_diff(rewards[1], rewards[0]) <= TOL


@pytest.mark.parametrize("normalize", [True, False])
def test_sentence_encoder_on_vllm_equals_hf(normalize):
    """MiniLM (BERT): mean pooling over the tokens, L2-normalized or not, on vLLM's pooling runner."""
    hf = TextEncoder("rh_trl:minilm", normalize=normalize)
    on_vllm = TextEncoder(minilm_path(), normalize=normalize, engine="vllm", vllm_kwargs=ENGINE_KWARGS)
    try:
        assert (on_vllm.kind, on_vllm.pooling) == ("sentence", "mean")
        got, expected = _vectors(on_vllm), _vectors(hf)
        assert (got - expected).abs().max() <= TOL
        if normalize:
            assert got.norm(dim=-1) == pytest.approx(torch.ones(len(got)), abs=1e-5)
    finally:
        on_vllm.engine.close()


def test_saved_embedding_reward_on_vllm_equals_hf(tmp_path, checkpoints, last_hidden):
    path = str(checkpoints.lm)
    encoder = TextEncoder(path)
    torch.manual_seed(1)
    EmbeddingRM(encoder, EmbeddingHead(encoder.dim, hidden_dims=(8,)).eval(), name="emb").save(
        tmp_path / "rm"
    )
    hf = EmbeddingRM.from_pretrained(tmp_path / "rm", name="emb")
    on_vllm = EmbeddingRM.from_pretrained(
        tmp_path / "rm", name="emb", engine="vllm", vllm_kwargs=ENGINE_KWARGS
    )
    try:
        assert max_diff(on_vllm.score(PROMPTS, COMPLETIONS), hf.score(PROMPTS, COMPLETIONS)) <= TOL
    finally:
        on_vllm.encoder.engine.close()
