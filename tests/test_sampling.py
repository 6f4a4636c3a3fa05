"""Seeded top-k sampling: the noise is a pure function of its coordinates, shared evaluation for
several streams changes nothing, and the sampled law is the top-k softmax."""
import pytest
import torch

from engine.sampling import SamplingParams, race_noise, sample, stream_rule, top_candidates, uniform_noise


def _params(B, top_k=4, temperature=0.7, seeds=None, counters=None):
    return SamplingParams(
        greedy=torch.zeros(B, dtype=torch.bool), temperature=torch.full((B,), temperature),
        top_k=torch.full((B,), top_k), text_temperature=torch.full((B,), temperature),
        text_top_k=torch.full((B,), top_k), seeds=seeds if seeds is not None else torch.arange(B) * 7919,
        counters=counters if counters is not None else torch.zeros(B, dtype=torch.long),
        max_top_k=top_k, max_text_top_k=top_k)


def test_noise_for_several_streams_is_each_streams_noise():
    seeds, counters = torch.tensor([1, 2**40 + 3, 5]), torch.tensor([0, 9, 123456])
    together = uniform_noise(seeds, counters, 1, 11, n_streams=8)
    for s in range(8):
        assert torch.equal(together[:, s], uniform_noise(seeds, counters, 1 + s, 11)[:, 0])
    # Each row's noise depends on its own seed and counter only.
    assert torch.equal(together[1:2], uniform_noise(seeds[1:2], counters[1:2], 1, 11, n_streams=8))
    assert ((together > 0) & (together < 1)).all()


def test_precomputed_noise_and_rule_give_the_same_tokens():
    g = torch.Generator().manual_seed(0)
    params = _params(5, top_k=6)
    # Rows with their own settings: greedy, a smaller top-k, temperature 0.
    params.greedy[1] = True
    params.top_k[2] = 2
    params.temperature[3] = 0.0
    noise = race_noise(params, 1, 8, vocab=40)
    rule = stream_rule(params, 1, vocab=40)
    assert noise.shape == (5, 8, 6) and rule.drop.shape == (5, 6)
    for s in range(8):
        logits = torch.randn(5, 40, generator=g)
        alone = sample(logits, params, 1 + s)
        assert torch.equal(sample(logits, params, 1 + s, noise=noise[:, s], rule=rule), alone)
        assert alone[1] == logits[1].argmax() and alone[3] == logits[3].argmax()
        assert alone[2] in torch.topk(logits[2], 2).indices


def test_samples_follow_the_top_k_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -5.0])
    n, k, temp = 20000, 3, 0.8
    params = _params(n, top_k=k, temperature=temp, seeds=torch.arange(n) * 2654435761 + 17)
    tokens = sample(logits.expand(n, -1), params, stream=2)
    top = torch.topk(logits, k).indices
    assert set(tokens.unique().tolist()) <= set(top.tolist())
    want = torch.softmax(logits[top] / temp, -1)
    got = torch.stack([(tokens == i).float().mean() for i in top])
    torch.testing.assert_close(got, want, atol=0.015, rtol=0)


def test_greedy_rows_take_the_argmax():
    params = _params(3)
    params.greedy[1] = True
    params.temperature[2] = 0.0
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, 3.0]]).expand(3, -1)
    tokens = sample(logits, params, stream=1)
    assert tokens[1] == 1 and tokens[2] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_ties_sample_the_same_tokens_whatever_the_bound(dtype):
    """bf16 logits tie by the dozen; a row's draw must not move with the batch's top-k bound (its
    exact top-k, the bound's rung, or the whole vocabulary), as the step's graphs assume."""
    g = torch.Generator().manual_seed(0)
    B, V, k = 64, 2048, 250
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    assert (logits.float().sort(-1).values.diff(dim=-1) == 0).sum() > 1000  # ties galore
    tokens = []
    for bound in (k, 256, 0):
        params = _params(B, top_k=k, temperature=1.0)
        params.max_top_k = bound
        tokens.append(sample(logits, params, stream=1))
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[2])
    # Among tied logits the lower token id ranks first.
    top_l, top_i = top_candidates(logits, k)
    tied = top_l[:, 1:] == top_l[:, :-1]
    assert tied.any() and (top_i[:, 1:][tied] > top_i[:, :-1][tied]).all()
    assert torch.equal(top_l, torch.topk(logits.float(), k).values)
