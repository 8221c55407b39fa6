"""CLAP scoring (cosine of normalised embeddings, resampling, deterministic cropping) and Tango 2's filters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpref.audio import resample
from mmpref.scoring import ClapScorer, Scorer, describe_scorer
from mmpref.synthesis.filters import FilterThresholds, accept, filter_decisions, filter_names
from mmpref.toy.clap import make_tiny_clap, tiny_clap_parts

TEXTS = ["a dog barks", "a man speaks then a car passes", "rain falls"]


@pytest.fixture(scope="module")
def scorer() -> ClapScorer:
    model, processor = tiny_clap_parts(seed=0)
    return ClapScorer(model=model, processor=processor, name="tiny")


def waves(n: int, seconds: float, sr: int = 16000, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return [(0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
            for i in range(n)]


def naive_scores(scorer: ClapScorer, texts, clips_48k) -> np.ndarray:
    """Straight from the transformers API: processor -> features -> L2-normalise -> dot product."""
    p, m = scorer.processor, scorer.model
    tok = p.tokenizer(texts, padding=True, return_tensors="pt")
    feats = p.feature_extractor(clips_48k, sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        t = m.get_text_features(**tok).pooler_output
        a = m.get_audio_features(input_features=feats["input_features"], is_longer=feats["is_longer"]).pooler_output
    t = t / t.norm(dim=-1, keepdim=True)
    a = a / a.norm(dim=-1, keepdim=True)
    return (t * a).sum(-1).double().numpy()


def test_score_is_cosine_of_normalised_embeddings(scorer):
    clips = waves(3, 1.0, sr=48000)
    got = scorer.score(TEXTS, clips, 48000)
    np.testing.assert_allclose(got, naive_scores(scorer, TEXTS, clips), atol=1e-6)
    assert np.all(np.abs(got) <= 1 + 1e-6)
    assert isinstance(scorer, Scorer)


def test_resampling_to_48k_happens_inside(scorer):
    clips = waves(3, 1.0, sr=16000)
    up = [resample(c, 16000, 48000) for c in clips]
    np.testing.assert_allclose(scorer.score(TEXTS, clips, 16000), naive_scores(scorer, TEXTS, up), atol=1e-6)


@pytest.mark.parametrize("crop", ["start", "center"])
def test_long_clips_are_cropped_deterministically(scorer, crop):
    s = ClapScorer(model=scorer.model, processor=scorer.processor, crop=crop)
    long = waves(2, 3.0, sr=48000, seed=1)  # the tiny CLAP window is 2 s
    n = s.max_samples
    start = [0 if crop == "start" else (c.size - n) // 2 for c in long]
    by_hand = [c[a: a + n] for c, a in zip(long, start)]
    first = s.score(TEXTS[:2], long, 48000)
    np.testing.assert_array_equal(first, s.score(TEXTS[:2], long, 48000))  # no random truncation
    np.testing.assert_allclose(first, naive_scores(s, TEXTS[:2], by_hand), atol=1e-6)
    assert s.describe()["crop"] == crop


def test_saved_checkpoint_scores_the_same_and_describes_itself(tmp_path, scorer):
    path = make_tiny_clap(tmp_path / "clap", seed=0)
    loaded = ClapScorer(path, batch_size=2)  # batching must not change the numbers
    clips = waves(3, 1.0)
    np.testing.assert_allclose(loaded.score(TEXTS, clips, 16000), scorer.score(TEXTS, clips, 16000), atol=1e-6)
    d = describe_scorer(loaded)
    assert d["checkpoint"] == str(path) and d["sample_rate"] == 48000 and d["max_length_s"] == 2.0
    assert describe_scorer(lambda t, w, sr: np.zeros(len(t)))["callable"] == "test_saved_checkpoint_scores_" \
        "the_same_and_describes_itself.<locals>.<lambda>"


def test_scorer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ClapScorer(tmp_path / "missing")
    with pytest.raises(ValueError, match="crop"):
        model, processor = tiny_clap_parts()
        ClapScorer(model=model, processor=processor, crop="random")


# ---------------------------------------------------------------------------------------------- filters
# Tango 2's dual-CLAP thresholds
T2 = {"a": FilterThresholds(alpha=0.45, beta=0.40, delta_min=0.05, delta_max=0.35),
      "b": FilterThresholds(alpha=0.60, beta=0.0, delta_min=0.08, delta_max=0.70)}

# (winner a, loser a, winner b, loser b) -> the checks that must fail (empty: accepted)
TABLE = [
    ((0.70, 0.50, 0.80, 0.60), set()),
    ((0.45, 0.40, 0.60, 0.00), set()),  # alpha, beta and delta_min of a and alpha, beta of b on the boundary
    ((0.45, 0.40, 0.60, 0.52), set()),  # margin b 0.6 - 0.52 = 0.0799999... counts as the 0.08 boundary
    ((0.4499, 0.40, 0.60, 0.52), {"a.alpha", "a.delta_min"}),
    ((0.70, 0.3999, 0.80, 0.60), {"a.beta"}),
    ((0.70, 0.35, 0.80, 0.60), {"a.beta"}),  # margin a 0.35 is on the delta_max bound; only beta fails
    ((0.75, 0.40, 0.80, 0.60), set()),  # margin a exactly delta_max 0.35
    ((0.7501, 0.40, 0.80, 0.60), {"a.delta_max"}),
    ((0.70, 0.50, 0.80, 0.7201), {"b.delta_min"}),
    ((0.70, 0.50, 0.80, 0.72), set()),  # margin b exactly 0.08
    ((0.70, 0.50, 0.95, 0.25), set()),  # margin b exactly 0.70
    ((0.70, 0.50, 0.95, 0.2499), {"b.delta_max"}),
    ((0.70, 0.50, 0.59, 0.0), {"b.alpha"}),
    ((0.70, 0.50, 0.80, -0.01), {"b.beta", "b.delta_max"}),
    ((0.50, 0.60, 0.80, 0.60), {"wins", "a.delta_min"}),  # the perturbed caption's audio scores higher on a
    ((0.60, 0.60, 0.80, 0.60), {"wins", "a.delta_min"}),  # a tie is not a win
]


@pytest.mark.parametrize("row,failing", TABLE)
def test_filters_accept_and_reject_exactly_per_threshold(row, failing):
    wa, la, wb, lb = row
    decisions = filter_decisions({"a": wa, "b": wb}, {"a": la, "b": lb}, T2)
    assert list(decisions) == filter_names(["a", "b"])
    assert {k for k, ok in decisions.items() if not ok} == failing
    assert accept({"a": wa, "b": wb}, {"a": la, "b": lb}, T2) == (not failing)


def test_filters_match_a_naive_reference_on_random_scores():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, lo = rng.uniform(-0.2, 1.0, 2), rng.uniform(-0.2, 1.0, 2)
        ref = all(w[i] > lo[i] for i in range(2)) and all(
            w[i] >= t.alpha and lo[i] >= t.beta and t.delta_min <= w[i] - lo[i] <= t.delta_max
            for i, t in enumerate(T2.values()))
        assert accept(dict(zip("ab", w)), dict(zip("ab", lo)), T2) == ref
