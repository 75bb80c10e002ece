"""Complexity scoring, its training and evaluation, and the calibrated small/large tier selector."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest

from router.complexity import (
    FEATURE_NAMES,
    LengthOnlyScorer,
    LogisticComplexityScorer,
    TierGroup,
    TierSelector,
    TierSelectorConfig,
    calibrated_threshold,
    complexity_features,
    large_share_for_recall,
    roc_auc,
)

GROUP = TierGroup(small="chat-8b", large="chat-70b")


def test_features_see_numbers_operators_nesting_and_cue_words():
    easy = complexity_features("hello, what is the capital of France?")
    hard = complexity_features("Prove step by step that ((12345 * 678) + (91 - 2)) / 7 is an integer.")
    assert set(easy) == set(hard) == set(FEATURE_NAMES)
    assert hard["max_nesting"] == pytest.approx(2 / 4)
    assert hard["num_operators"] > easy["num_operators"] == 0.0
    assert hard["max_digits"] == pytest.approx(5 / 8)
    assert hard["hard_words"] > 0 and easy["easy_words"] > 0
    assert complexity_features("")["log_chars"] == 0.0


def test_default_scorer_ranks_a_hard_prompt_above_an_easy_one():
    scorer = LogisticComplexityScorer()
    easy = scorer.score("hi there, thanks!")
    hard = scorer.score("Derive the integral of ((x^2 + 3x) * (2x - 7)) / (x + 1) and explain why.")
    assert 0.0 < easy < 0.2 < hard < 1.0
    assert scorer.score("ignored", features=complexity_features("hi")) == pytest.approx(scorer.score("hi"))


def test_roc_auc_against_hand_computed_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert roc_auc([1, 2, 3], [False, True, True]) == 1.0
    assert roc_auc([3, 2, 1], [False, True, True]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5  # ties count half
    with pytest.raises(ValueError, match="hard and one easy"):
        roc_auc([1, 2], [True, True])


def test_roc_auc_matches_pairwise_counting():
    rng = random.Random(0)
    scores = [round(rng.random(), 1) for _ in range(200)]  # coarse, so plenty of ties
    labels = [rng.random() < 0.3 + 0.4 * s for s in scores]
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert roc_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_large_share_for_recall():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    labels = [True, False, True, False, False, False, False, False, False, True]
    assert large_share_for_recall(scores, labels, recall=0.6) == pytest.approx(0.3)  # 2 of 3 hard: down to 0.7
    assert large_share_for_recall(scores, labels, recall=0.95) == 1.0  # the last hard one scores 0


def planted_stream(rng: random.Random, count: int) -> list[tuple[str, bool]]:
    """Hard exactly when the prompt is SHORT: the opposite of what the default length weight believes."""
    samples = []
    for _ in range(count):
        is_hard = rng.random() < 0.5
        words = rng.randint(2, 8) if is_hard else rng.randint(30, 80)
        samples.append((" ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(words)), is_hard))
    return samples


def test_training_improves_auc_on_a_planted_signal():
    rng = random.Random(1)
    train, test = planted_stream(rng, 1500), planted_stream(rng, 500)
    scorer = LogisticComplexityScorer()
    texts, labels = [t for t, _ in test], [y for _, y in test]
    before = roc_auc([scorer.score(t) for t in texts], labels)
    for text, is_hard in train:
        scorer.observe(text, is_hard)
    after = roc_auc([scorer.score(t) for t in texts], labels)
    assert before < 0.1  # the prior ranks them backwards
    assert after > 0.95
    assert scorer.num_updates == 1500


def test_fit_and_dict_round_trip():
    samples = [(complexity_features(t), y) for t, y in planted_stream(random.Random(2), 300)]
    scorer = LogisticComplexityScorer(learning_rate=0.1)
    scorer.fit(samples, epochs=3, seed=0)
    restored = LogisticComplexityScorer.from_dict(json.loads(json.dumps(scorer.to_dict())))
    assert restored.to_dict() == scorer.to_dict()
    assert restored.score("alpha beta") == scorer.score("alpha beta")
    with pytest.raises(ValueError, match="learning_rate"):
        LogisticComplexityScorer(learning_rate=0.0)


def test_update_learns_unseen_feature_names():
    scorer = LogisticComplexityScorer(weights={})
    for _ in range(200):
        scorer.update({"secret": 1.0}, True)
        scorer.update({"secret": 0.0}, False)
    assert scorer.predict({"secret": 1.0}) > 0.8 > 0.2 > scorer.predict({"secret": 0.0})


def test_length_only_scorer():
    scorer = LengthOnlyScorer(half_at=10)
    assert scorer.score("") == 0.0
    assert scorer.score("x" * 10) == 0.5
    assert scorer.score("x" * 100) > scorer.score("x" * 50)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_calibration_hits_the_target_share_on_a_synthetic_stream(target):
    rng = random.Random(3)

    class Fixed:
        def score(self, prompt_text, features=None):
            return float(prompt_text)

    selector = TierSelector(GROUP, Fixed(), TierSelectorConfig(target_large_share=target, window=1000))
    # Scores follow a skewed distribution that a fixed 0.5 threshold would get badly wrong.
    decisions = [selector.select(f"r{i}", repr(rng.betavariate(2, 8))) for i in range(6000)]
    share = sum(d.tier == "large" for d in decisions[1000:]) / 5000
    assert share == pytest.approx(target, abs=0.02)
    assert all(d.deployment == (GROUP.large if d.tier == "large" else GROUP.small) for d in decisions)


def test_calibration_follows_a_shift_in_scores():
    class Fixed:
        def score(self, prompt_text, features=None):
            return float(prompt_text)

    rng = random.Random(4)
    selector = TierSelector(GROUP, Fixed(), TierSelectorConfig(target_large_share=0.2, window=500))
    for i in range(2000):
        selector.select(f"a{i}", repr(rng.uniform(0.0, 0.5)))
    assert selector.threshold == pytest.approx(0.4, abs=0.03)
    late = [selector.select(f"b{i}", repr(rng.uniform(0.5, 1.0))) for i in range(2000)]
    assert sum(d.tier == "large" for d in late[1000:]) / 1000 == pytest.approx(0.2, abs=0.04)


def test_pinned_tier_wins_and_stays_out_of_calibration(caplog):
    selector = TierSelector(GROUP, config=TierSelectorConfig(min_samples=1, recalibrate_every=1))
    with caplog.at_level(logging.INFO, logger="router.complexity"):
        pinned = selector.select("r1", "hi", pinned_tier="large")
    assert (pinned.tier, pinned.deployment, pinned.is_pinned) == ("large", "chat-70b", True)
    assert math.isnan(pinned.score)
    assert selector.num_scored == 0
    assert "tier request_id=r1 group=chat-8b/chat-70b tier=large" in caplog.text
    hard = "Prove that ((2**61 - 1) * (3**40 + 7)) mod 97 is zero, step by step."
    assert selector.select("r2", hard, pinned_tier="small").tier == "small"
    unpinned = selector.select("r3", hard)
    assert not unpinned.is_pinned and selector.num_scored == 1
    with pytest.raises(ValueError, match="pinned tier"):
        selector.select("r4", "hi", pinned_tier="medium")


def test_calibrated_threshold_edges():
    scores = [0.1, 0.2, 0.3, 0.4]
    assert calibrated_threshold(scores, 0.5) == 0.3
    assert calibrated_threshold(scores, 1.0) == 0.1
    assert calibrated_threshold(scores, 0.0) > 1.0
    with pytest.raises(ValueError, match="at least one"):
        calibrated_threshold([], 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_large_share": 1.5}, "target_large_share"),
        ({"initial_threshold": -0.1}, "initial_threshold"),
        ({"window": 0}, "window"),
        ({"window": 10, "min_samples": 11}, "min_samples"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TierSelectorConfig(**kwargs)


def test_tier_group_needs_two_deployments():
    with pytest.raises(ValueError, match="two distinct"):
        TierGroup(small="a", large="a")
