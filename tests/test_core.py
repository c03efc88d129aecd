"""The pure core against a literal, loop-free transcription of the published semantics."""

from __future__ import annotations

import pytest
import torch

from vlmzip.core import GROUP_DOMINANT, GROUP_DROPPED, select_dominant, visionzip_reduce


def reference_visionzip(hidden, cls_scores, metric, dominant, contextual):
    """DESIGN.md §1 written the straightforward way (boolean masks, one-hot assignment)."""
    batch, num_tokens, width = hidden.shape
    top = cls_scores.topk(dominant - 1, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(batch, 1, dtype=top.dtype), top], dim=1)
    mask = torch.ones(batch, num_tokens, dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(batch, dominant, width)
    metric_rest = metric[mask].view(batch, num_tokens - dominant, metric.shape[2])
    hidden_rest = hidden.masked_select(mask.unsqueeze(-1)).view(batch, num_tokens - dominant, width)
    metric_rest = metric_rest / metric_rest.norm(dim=-1, keepdim=True)
    remaining = metric_rest.shape[1]
    step = max(1, remaining // contextual)
    target_indices = torch.arange(0, remaining, step)[:contextual]
    targets = metric_rest[:, target_indices]
    others = ~torch.isin(torch.arange(remaining), target_indices)
    similarity = torch.bmm(metric_rest[:, others], targets.transpose(1, 2))
    one_hot = torch.zeros(batch, int(others.sum()), contextual, dtype=hidden.dtype)
    one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(one_hot.transpose(1, 2), hidden_rest[:, others]) / counts
    contextual_tokens = hidden_rest[:, target_indices] + aggregated
    kept = (~mask).nonzero()[:, 1].view(batch, dominant)
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), kept


def random_inputs(batch, num_tokens, width=24, head_dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, num_tokens, width, generator=generator, dtype=dtype)
    scores = torch.rand(batch, num_tokens - 1, generator=generator, dtype=dtype)
    keys = torch.randn(batch, num_tokens, head_dim, generator=generator, dtype=dtype)
    return hidden, scores, keys


@pytest.mark.parametrize(
    ("batch", "num_tokens", "dominant", "contextual"),
    [(1, 577, 54, 10), (3, 577, 108, 20), (2, 577, 162, 30), (4, 197, 20, 7), (2, 50, 5, 13), (1, 10, 3, 2)],
)
def test_matches_reference(batch, num_tokens, dominant, contextual):
    hidden, scores, keys = random_inputs(batch, num_tokens, seed=num_tokens + dominant)
    expected, expected_kept = reference_visionzip(hidden, scores, keys, dominant, contextual)
    result = visionzip_reduce(hidden, scores, keys, dominant, contextual)
    assert result.features.shape == (batch, dominant + contextual, hidden.shape[-1])
    assert torch.equal(result.kept_indices, expected_kept)
    torch.testing.assert_close(result.features, expected, rtol=0, atol=1e-6)


def test_kept_indices_ascending_with_cls_first():
    hidden, scores, keys = random_inputs(3, 101)
    kept = visionzip_reduce(hidden, scores, keys, 12, 4).kept_indices
    assert kept.dtype == torch.int64
    assert (kept[:, 0] == 0).all()
    assert (kept[:, 1:] > kept[:, :-1]).all()


def test_dominant_are_the_top_scored_patches():
    hidden, scores, keys = random_inputs(2, 65)
    kept = select_dominant(scores, 9)
    expected = scores.topk(8, dim=1).indices + 1
    assert torch.equal(kept[:, 1:], expected.sort(dim=1).values)


def test_batch_equals_per_sample():
    hidden, scores, keys = random_inputs(4, 145, seed=5)
    batched = visionzip_reduce(hidden, scores, keys, 30, 8)
    for i in range(4):
        single = visionzip_reduce(hidden[i : i + 1], scores[i : i + 1], keys[i : i + 1], 30, 8)
        assert torch.equal(single.kept_indices, batched.kept_indices[i : i + 1])
        torch.testing.assert_close(single.features, batched.features[i : i + 1], rtol=0, atol=1e-6)


def test_contextual_zero_keeps_dominant_only():
    hidden, scores, keys = random_inputs(2, 50)
    result = visionzip_reduce(hidden, scores, keys, 7, 0)
    assert result.features.shape == (2, 7, hidden.shape[-1])
    assert torch.equal(result.features, hidden.gather(1, result.kept_indices.unsqueeze(-1).expand(-1, -1, 24)))
    assert ((result.groups == GROUP_DROPPED).sum(dim=1) == 43).all()


def test_dominant_one_keeps_only_cls():
    hidden, scores, keys = random_inputs(2, 50)
    result = visionzip_reduce(hidden, scores, keys, 1, 5)
    assert torch.equal(result.kept_indices, torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(result.features[:, 0], hidden[:, 0])


def test_full_budget_returns_every_token_unmerged():
    hidden, scores, keys = random_inputs(2, 30)
    result = visionzip_reduce(hidden, scores, keys, 10, 20)
    rest = hidden[~torch.zeros(2, 30, dtype=torch.bool).scatter_(1, result.kept_indices, True)].view(2, 20, 24)
    torch.testing.assert_close(result.features[:, 10:], rest)


def test_groups_cover_every_token():
    hidden, scores, keys = random_inputs(2, 80, seed=3)
    result = visionzip_reduce(hidden, scores, keys, 10, 6)
    groups = result.groups
    assert ((groups == GROUP_DOMINANT).sum(dim=1) == 10).all()
    assert ((groups >= 0) & (groups < 6)).sum(dim=1).eq(70).all()
    # Each contextual token is its target plus the mean of the other members of its group.
    step = 70 // 6
    for b in range(2):
        remaining = (groups[b] != GROUP_DOMINANT).nonzero().squeeze(1)
        for j in range(6):
            target = remaining[j * step]
            members = (groups[b] == j).nonzero().squeeze(1)
            others = members[members != target]
            mean = hidden[b, others].mean(dim=0) if others.numel() else torch.zeros(24)
            torch.testing.assert_close(result.features[b, 10 + j], hidden[b, target] + mean, rtol=1e-5, atol=1e-5)


def test_average_merge_is_plain_mean_of_group():
    hidden, scores, keys = random_inputs(1, 60, seed=4)
    result = visionzip_reduce(hidden, scores, keys, 8, 5, merge="average")
    for j in range(5):
        members = (result.groups[0] == j).nonzero().squeeze(1)
        torch.testing.assert_close(result.features[0, 8 + j], hidden[0, members].mean(dim=0), rtol=1e-5, atol=1e-5)


def test_without_cls_selects_top_tokens():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, 16, generator=generator)
    scores = torch.rand(2, 40, generator=generator)
    keys = torch.randn(2, 40, 8, generator=generator)
    result = visionzip_reduce(hidden, scores, keys, 6, 3, has_cls=False)
    assert torch.equal(result.kept_indices, scores.topk(6, dim=1).indices.sort(dim=1).values)
    assert result.features.shape == (2, 9, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(dtype):
    hidden, scores, keys = random_inputs(2, 577, seed=9)
    reference = visionzip_reduce(hidden, scores, keys, 54, 10)
    result = visionzip_reduce(hidden.to(dtype), scores.to(dtype), keys.to(dtype), 54, 10)
    assert result.features.dtype == dtype
    if dtype == torch.float64:
        assert torch.equal(result.kept_indices, reference.kept_indices)
        torch.testing.assert_close(result.features.float(), reference.features, rtol=1e-5, atol=1e-5)
    else:
        assert torch.isfinite(result.features).all()


def test_deterministic():
    hidden, scores, keys = random_inputs(2, 577, seed=11)
    first = visionzip_reduce(hidden, scores, keys, 54, 10)
    second = visionzip_reduce(hidden, scores, keys, 54, 10)
    assert torch.equal(first.features, second.features) and torch.equal(first.kept_indices, second.kept_indices)


@pytest.mark.parametrize(
    ("dominant", "contextual", "error", "match"),
    [
        (0, 10, ValueError, "dominant"),
        (-3, 10, ValueError, "dominant"),
        (5, -1, ValueError, "contextual"),
        (5.0, 10, TypeError, "dominant"),
        (5, "10", TypeError, "contextual"),
        (True, 3, TypeError, "dominant"),
        (51, 0, ValueError, "dominant"),
        (40, 11, ValueError, "contextual"),
    ],
)
def test_bad_budgets(dominant, contextual, error, match):
    hidden, scores, keys = random_inputs(1, 50)
    with pytest.raises(error, match=match):
        visionzip_reduce(hidden, scores, keys, dominant, contextual)


def test_bad_shapes():
    hidden, scores, keys = random_inputs(2, 50)
    with pytest.raises(ValueError, match="scores"):
        visionzip_reduce(hidden, scores[:, :-1], keys, 5, 2)
    with pytest.raises(ValueError, match="keys"):
        visionzip_reduce(hidden, scores, keys[:1], 5, 2)
    with pytest.raises(ValueError, match="features"):
        visionzip_reduce(hidden[0], scores, keys, 5, 2)
    with pytest.raises(TypeError, match="features"):
        visionzip_reduce(hidden.numpy(), scores, keys, 5, 2)
    with pytest.raises(ValueError, match="merge"):
        visionzip_reduce(hidden, scores, keys, 5, 2, merge="max")
