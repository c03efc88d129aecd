"""VisionZipConfig validation and budget splitting."""

from __future__ import annotations

import pytest

from vlmzip import VisionZipConfig, split_budget


def test_defaults_are_the_paper_64():
    config = VisionZipConfig()
    assert (config.dominant, config.contextual, config.tokens) == (54, 10, 64)


@pytest.mark.parametrize(("tokens", "split"), [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (1, (1, 0))])
def test_split_budget(tokens, split):
    assert split_budget(tokens) == split
    assert VisionZipConfig.from_tokens(tokens).tokens == tokens


def test_split_budget_other_values_keep_ratio():
    dominant, contextual = split_budget(320)
    assert dominant + contextual == 320 and dominant == 270


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"dominant": 0}, ValueError, r"dominant must be an integer >= 1, got 0"),
        ({"contextual": -1}, ValueError, r"contextual must be an integer >= 0"),
        ({"dominant": 1.5}, TypeError, "dominant"),
        ({"dominant": None}, TypeError, "dominant"),
        ({"contextual": False}, TypeError, "contextual"),
        ({"feature_layer": "last"}, TypeError, "feature_layer"),
        ({"merge": "max"}, ValueError, "merge"),
        ({"method": "fancy"}, ValueError, "method"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_rejects_bad_fields(fields, error, match):
    with pytest.raises(error, match=match):
        VisionZipConfig(**fields)


def test_round_trip_dict():
    config = VisionZipConfig(dominant=108, contextual=20, merge="average")
    assert VisionZipConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        VisionZipConfig.from_dict({"dominant": 3, "tokens": 5})


def test_split_budget_rejects_bad_tokens():
    with pytest.raises(ValueError, match="tokens"):
        split_budget(0)
    with pytest.raises(TypeError, match="tokens"):
        split_budget("64")


def test_from_budget_takes_a_total_or_a_pair():
    assert VisionZipConfig.from_budget(128) == VisionZipConfig(dominant=108, contextual=20)
    assert VisionZipConfig.from_budget((40, 6), method="pool") == VisionZipConfig(40, 6, method="pool")
    with pytest.raises(ValueError, match=r"budget must be a token count or \(dominant, contextual\)"):
        VisionZipConfig.from_budget((1, 2, 3))
    with pytest.raises(ValueError, match="dominant"):
        VisionZipConfig.from_budget((0, 6))
