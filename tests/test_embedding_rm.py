"""EmbeddingRM against encoder forward + pooling + MLP written out here; the cache; save/load; the recipe; GRPO."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from rh_trl import RewardInputError
from rh_trl.data.preferences import PreferenceDataError
from rh_trl.formatting import to_sample
from rh_trl.rewards.embedding import EmbeddingRM, load_embedding_rm
from rh_trl.rewards.embedding_heads import EmbeddingHead, HeadTraining, pair_loss, train_heads
from rh_trl.rewards.text_encoder import EmbeddingCache, TextEncoder, resolve_source
from rh_trl.testing import tiny_causal_lm

from .conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS
from .trainer_runs import train_grpo

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


# -- the independent computation -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """The pretrained MiniLM encoder and its own tokenizer (loaded here, not through rh_trl)."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_source("rh_trl:minilm")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def mean_pooled(model, ids: list[int]) -> torch.Tensor:
    """One unpadded forward; hidden states averaged over tokens, divided by their L2 norm."""
    hidden = model(torch.tensor([ids])).last_hidden_state[0]
    vector = hidden.mean(0)
    return vector / vector.norm()


@torch.no_grad()
def last_token(lm, ids: list[int]) -> torch.Tensor:
    """The causal LM trunk's last hidden state at the last token (one unpadded forward)."""
    return lm.model(torch.tensor([ids])).last_hidden_state[0, -1]


@torch.no_grad()
def mlp(head: EmbeddingHead, x: torch.Tensor) -> float:
    """The head written out: standardize, Linear → GELU (erf) → Linear."""
    first, last = head.mlp[0], head.mlp[-1]
    z = (x - head.input_mean) / head.input_std
    h = z @ first.weight.T + first.bias
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return float(h @ last.weight[0] + last.bias[0])


def random_heads(dim: int, k: int = 2, seed: int = 0) -> list[EmbeddingHead]:
    torch.manual_seed(seed)
    heads = []
    for _ in range(k):
        head = EmbeddingHead(dim, hidden_dims=[16])
        head.set_standardization(torch.randn(32, dim) * 0.05 + 0.01)
        heads.append(head.eval())
    return heads


def plain_text(prompt, completion) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in prompt + completion)


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# -- scores equal the independent computation ---------------------------------------------------------------------


def test_sentence_encoder_both_formats_match_reference(minilm):
    model, tok = minilm
    heads = random_heads(384)
    rm = EmbeddingRM(TextEncoder(model, tok, max_tokens_per_batch=64), heads, normalization=(0.1, 2.0))

    def expected(text: str) -> float:
        x = mean_pooled(model, tok(text)["input_ids"])
        return (sum(mlp(h, x) for h in heads) / len(heads) - 0.1) / 2.0

    conv = rm(prompts=CONV_PROMPTS, completions=CONV_COMPLETIONS)
    want = [expected(plain_text(p, c)) for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)]
    assert max_diff(conv, want) <= TOL
    assert len(set(conv)) == len(conv)
    assert rm.encoder.engine.last_stats.batches > 1  # the small budget forced several padded micro-batches
    text = rm.score(TEXT_PROMPTS, TEXT_COMPLETIONS, trainer_state=None, topic=["a", "b", "c"])
    assert (
        max_diff(text, [expected(p + c) for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)]) <= TOL
    )


def test_sentence_vectors_equal_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model, tok = minilm
    texts = [p + c for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)]
    ours, _ = TextEncoder(model, tok).embed_ids([tok(t)["input_ids"] for t in texts])
    reference = st.SentenceTransformer(resolve_source("rh_trl:minilm"), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    assert (ours - reference.cpu()).abs().max().item() <= TOL


def test_causal_encoder_both_formats_match_reference(llama_tok):
    lm = tiny_causal_lm(llama_tok, seed=11)
    heads = random_heads(64, k=1, seed=1)
    rm = EmbeddingRM(TextEncoder(lm, llama_tok, max_tokens_per_batch=48), heads)
    assert rm.encoder.kind == "causal" and not rm.encoder.normalize

    conv = rm(CONV_PROMPTS, CONV_COMPLETIONS)
    want = []
    for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True):
        ids = llama_tok(llama_tok.apply_chat_template(p + c, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
        want.append(mlp(heads[0], last_token(lm, ids)))
    assert max_diff(conv, want) <= TOL
    text = rm(TEXT_PROMPTS, TEXT_COMPLETIONS)
    want = [
        mlp(heads[0], last_token(lm, llama_tok(p + c + llama_tok.eos_token)["input_ids"]))
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]
    assert max_diff(text, want) <= TOL


def test_last_turns_and_left_truncation(minilm, caplog):
    model, tok = minilm
    heads = random_heads(384, k=1)
    dialogue = [
        {"role": "user", "content": "Tell me about rivers."},
        {"role": "assistant", "content": "Rivers flow to the sea."},
        {"role": "user", "content": "And lakes?"},
    ]
    reply = [{"role": "assistant", "content": "Lakes are still water."}]
    last = EmbeddingRM(TextEncoder(model, tok, prompt_turns=1), heads)
    assert last([dialogue], [reply])[0] == pytest.approx(
        mlp(
            heads[0],
            mean_pooled(model, tok("User: And lakes?\n\nAssistant: Lakes are still water.")["input_ids"]),
        ),
        abs=TOL,
    )

    long_prompt = [{"role": "user", "content": "Tell a tiny story about a river and the sea. " * 20}]
    limit = 24
    short = EmbeddingRM(TextEncoder(model, tok, max_length=limit), heads)
    logged: dict[str, float] = {}
    with caplog.at_level(logging.INFO, logger="rh_trl"):
        score = short([long_prompt], [reply], log_metric=logged.__setitem__)[0]
    full = tok(plain_text(long_prompt, reply))["input_ids"]
    assert len(full) > limit
    kept = full[:1] + full[len(full) - (limit - 1) :]  # [CLS] and the last tokens, the whole reply among them
    assert score == pytest.approx(mlp(heads[0], mean_pooled(model, kept)), abs=TOL)
    assert logged[f"{short.__name__}/num_truncated"] == 1
    assert "lost prompt tokens" in caplog.text


def test_ensemble_spread_goes_to_completions_table(minilm):
    model, tok = minilm
    heads = random_heads(384, k=3, seed=4)
    rm = EmbeddingRM(TextEncoder(model, tok), heads, normalization=(0.0, 2.0))
    extra: dict[str, list] = {}
    rm(CONV_PROMPTS, CONV_COMPLETIONS, log_extra=extra.__setitem__)
    want = []
    for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True):
        x = mean_pooled(model, tok(plain_text(p, c))["input_ids"])
        values = torch.tensor([mlp(h, x) for h in heads])
        want.append(float(values.std(unbiased=False)) / 2.0)
    assert max_diff(extra[f"{rm.__name__}/spread"], want) <= TOL


# -- the cache -----------------------------------------------------------------------------------------------------


def test_cache_second_pass_embeds_nothing(minilm, tmp_path):
    model, tok = minilm
    encoder = TextEncoder(model, tok, cache=tmp_path)
    rm = EmbeddingRM(encoder, random_heads(384, k=1))
    logged: dict[str, float] = {}
    first = rm(CONV_PROMPTS, CONV_COMPLETIONS, log_metric=logged.__setitem__)
    assert logged[f"{rm.__name__}/num_cache_misses"] == 3 and logged[f"{rm.__name__}/num_cache_hits"] == 0
    samples = [to_sample(p, c) for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)]
    vectors = torch.stack(encoder.embed(samples).vectors)

    def no_forward(*args, **kwargs):
        raise AssertionError("the encoder ran although every vector is cached")

    # a new encoder on the same directory: the vectors come from disk, bit for bit, without a forward pass
    again = TextEncoder(model, tok, cache=tmp_path)
    again.engine.run = no_forward
    result = again.embed(samples)
    assert result.counts["cache_misses"] == 0 and result.counts["cache_hits"] == 3
    assert torch.equal(torch.stack(result.vectors), vectors)
    second = EmbeddingRM(again, rm.heads, name="cached")(
        CONV_PROMPTS, CONV_COMPLETIONS, log_metric=logged.__setitem__
    )
    assert second == first and logged["cached/num_cache_misses"] == 0

    # another layout misses instead of returning a stale vector
    other = TextEncoder(model, tok, cache=tmp_path, max_length=8)
    assert other.embed(samples).counts["cache_misses"] == 3
    assert len(EmbeddingCache(tmp_path)) == 6


def test_cache_key_changes_with_weights(llama_tok):
    a = TextEncoder(tiny_causal_lm(llama_tok, seed=1), llama_tok)
    b = TextEncoder(tiny_causal_lm(llama_tok, seed=2), llama_tok)
    assert a.cache_key([1, 2, 3]) != b.cache_key([1, 2, 3])
    assert a.cache_key([1, 2, 3]) != a.cache_key([1, 2, 4])
    assert a.cache_key([1, 2, 3]) == TextEncoder(a.model, llama_tok).cache_key([1, 2, 3])


# -- saving and loading --------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, llama_tok):
    rm = EmbeddingRM(
        "rh_trl:minilm", random_heads(384, k=2), normalization=(0.5, 3.0), prompt_turns=1, device="cpu"
    )
    scores = rm(CONV_PROMPTS, CONV_COMPLETIONS)
    rm.save(tmp_path / "minilm")
    config = json.loads((tmp_path / "minilm" / "embedding_rm.json").read_text())
    assert config["encoder"]["model"] == "rh_trl:minilm" and config["encoder"]["pooling"] == "mean"
    assert not (tmp_path / "minilm" / "encoder").exists()  # a named encoder is not copied
    loaded = load_embedding_rm(tmp_path / "minilm", device="cpu")
    assert loaded.encoder.prompt_turns == 1 and len(loaded.heads) == 2
    assert max_diff(loaded(CONV_PROMPTS, CONV_COMPLETIONS), scores) <= 1e-6
    raw = EmbeddingRM.from_pretrained(tmp_path / "minilm", normalize=False, device="cpu")
    assert max_diff(raw(CONV_PROMPTS, CONV_COMPLETIONS), [s * 3.0 + 0.5 for s in scores]) <= TOL

    # an encoder built in memory is saved with the reward
    lm = EmbeddingRM(TextEncoder(tiny_causal_lm(llama_tok, seed=5), llama_tok), random_heads(64, k=1))
    lm.save(tmp_path / "tiny")
    again = EmbeddingRM.from_pretrained(tmp_path / "tiny", device="cpu")
    assert max_diff(again(TEXT_PROMPTS, TEXT_COMPLETIONS), lm(TEXT_PROMPTS, TEXT_COMPLETIONS)) <= 1e-6

    # the one entry point recognizes a saved embedding reward model
    import rh_trl

    assert rh_trl.resolve(tmp_path / "tiny").family == "embedding"
    by_load = rh_trl.load(tmp_path / "tiny", device="cpu")
    assert isinstance(by_load, EmbeddingRM)
    assert max_diff(by_load(TEXT_PROMPTS, TEXT_COMPLETIONS), lm(TEXT_PROMPTS, TEXT_COMPLETIONS)) <= 1e-6


# -- head training -------------------------------------------------------------------------------------------------


def test_losses_match_their_formulas():
    chosen, rejected = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 1.0, 2.5])
    bt = (
        sum(
            -math.log(1 / (1 + math.exp(-(c - r))))
            for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)
        )
        / 3
    )
    assert abs(pair_loss(chosen, rejected, "bt").item() - bt) <= 1e-6
    sig = [1 / (1 + math.exp(-v)) for v in chosen.tolist() + rejected.tolist()]
    bce = -(sum(math.log(p) for p in sig[:3]) + sum(math.log(1 - p) for p in sig[3:])) / 6
    assert abs(pair_loss(chosen, rejected, "classification").item() - bce) <= 1e-6


@pytest.mark.parametrize("loss", ["bt", "classification"])
def test_heads_learn_a_planted_direction(loss):
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=generator)
    base = torch.randn(200, 16, generator=generator)
    chosen, rejected = base + 0.5 * direction, base - 0.5 * direction
    trained = train_heads(chosen, rejected, HeadTraining(loss=loss, num_heads=2, hidden_dims=[8], epochs=20))
    test = torch.randn(100, 16, generator=generator)
    for head in trained.heads:
        with torch.no_grad():
            wins = (head(test + 0.5 * direction) > head(test - 0.5 * direction)).float().mean().item()
        assert wins > 0.95
    assert trained.heads[0].mlp[0].weight.ne(trained.heads[1].mlp[0].weight).any()  # different seeds


# -- the recipe ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_recipe_end_to_end_then_load_and_score(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "recipes"))
    import train_embedding_rm

    argv = ["--config", str(ROOT / "configs/embedding/tiny.yaml"), "--output_dir", str(tmp_path / "rm"),
            "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    summary = train_embedding_rm.main(argv)
    assert summary["embedded_responses"] > 0 and summary["eval_pairs"] == 24
    saved = json.loads((tmp_path / "rm" / "embedding_rm_summary.json").read_text())
    assert saved["eval_accuracy"] == summary["eval_accuracy"] and saved["embedding_seconds"] >= 0

    # the saved reward scores the held-out pairs with the accuracy the recipe reported
    args = train_embedding_rm.EmbeddingRMArguments(dataset_path="rh_trl:synthetic", eval_fraction=0.25)
    held_out = train_embedding_rm.load_data(args)[2]
    with pytest.raises(PreferenceDataError, match="no training pairs: 96 pairs read.*max_pairs=0"):
        train_embedding_rm.load_data(dataclasses.replace(args, max_pairs=0))
    reward = EmbeddingRM.from_pretrained(tmp_path / "rm", device="cpu")
    prompts = [p["prompt"] for p in held_out]
    chosen = reward(prompts, [p["chosen"] for p in held_out])
    rejected = reward(prompts, [p["rejected"] for p in held_out])
    accuracy = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    assert accuracy / len(held_out) == pytest.approx(summary["eval_accuracy"])
    assert summary["eval_accuracy"] > 0.75  # the synthetic signal is easy
    assert summary["held_out_accuracy_from_vectors"] == pytest.approx(summary["eval_accuracy"])

    # through a reward spec, as recipes/eval_rm.py --reward builds it
    import eval_rm

    from rh_trl.rewards import factory

    monkeypatch.setitem(factory.REWARD_TYPES, "embedding", "rh_trl.rewards.embedding:load_embedding_rm")
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"type": "embedding", "model": str(tmp_path / "rm"), "device": "cpu"}))
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in held_out))
    report = eval_rm.main(["--reward", str(spec), "--data", str(data)])
    assert report["accuracy"] == pytest.approx(summary["eval_accuracy"])

    again = train_embedding_rm.main([*argv, "--output_dir", str(tmp_path / "rm2")])
    assert again["embedded_responses"] == 0 and again["cached_responses"] > 0  # all from the cache
    assert again["eval_accuracy"] == summary["eval_accuracy"]


# -- in a trainer --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_two_steps(tmp_path, policy, llama_tok, minilm):
    model, tok = minilm
    rm = EmbeddingRM(TextEncoder(model, tok), random_heads(384, k=2), name="emb_rm")
    trainer = train_grpo(tmp_path, policy, llama_tok, [rm])
    logs = [h for h in trainer.state.log_history if "rewards/emb_rm/mean" in h]
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["rewards/emb_rm/mean"]) and h["emb_rm/num_none"] == 0
    assert not isinstance(rm, torch.nn.Module)


# -- bad input -----------------------------------------------------------------------------------------------------


def test_bad_input_errors(minilm, tmp_path, caplog):
    model, tok = minilm
    encoder = TextEncoder(model, tok)
    rm = EmbeddingRM(encoder, random_heads(384, k=1))
    with pytest.raises(RewardInputError, match="got 2 prompts and 3 completions"):
        rm(TEXT_PROMPTS[:2], TEXT_COMPLETIONS)
    logged: dict[str, float] = {}
    with caplog.at_level(logging.WARNING, logger="rh_trl"):
        scores = rm(
            TEXT_PROMPTS, [TEXT_COMPLETIONS[0], None, TEXT_COMPLETIONS[2]], log_metric=logged.__setitem__
        )
    assert scores[1] is None and scores[0] is not None and logged[f"{rm.__name__}/num_invalid"] == 1
    assert "could not be read" in caplog.text
    with pytest.raises(RewardInputError, match="sample 1"):
        EmbeddingRM(encoder, rm.heads, strict=True)(
            TEXT_PROMPTS, [TEXT_COMPLETIONS[0], 5, TEXT_COMPLETIONS[2]]
        )
    with pytest.raises(ValueError, match="length 64 but the encoder gives 384"):
        EmbeddingRM(encoder, EmbeddingHead(64))
    with pytest.raises(TypeError, match="from_pretrained"):
        EmbeddingRM(encoder, [])
    with pytest.raises(TypeError, match="already-built TextEncoder"):
        EmbeddingRM(encoder, rm.heads, pooling="cls")
    with pytest.raises(ValueError, match="pooling must be one of"):
        TextEncoder(model, tok, pooling="max")
    with pytest.raises(ValueError, match="prompt_turns must be a positive"):
        TextEncoder(model, tok, prompt_turns=0)
    with pytest.raises(FileNotFoundError, match="no embedding_rm.json"):
        EmbeddingRM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="loss must be 'bt' or 'classification'"):
        HeadTraining(loss="hinge")
    with pytest.raises(ValueError, match="same shape"):
        train_heads(torch.zeros(3, 4), torch.zeros(2, 4), HeadTraining())
