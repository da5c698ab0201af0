"""The ranking behind `pixclass suggest`: uncertain images that differ from each other."""

import numpy as np
import pytest

from pixclass import suggest_rank
from pixclass.suggest_rank import pick_diverse, uncertainty


def _groups(rng, centres: int, per_group: int, spread: float, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings in `centres` groups (cosine within a group about 0.8: alike but not
    near-identical) and each image's group."""
    centre = rng.normal(size=(centres, dim))
    group = np.repeat(np.arange(centres), per_group)
    x = centre[group] + spread * rng.normal(size=(len(group), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), group


@pytest.mark.parametrize("many", [False, True], ids=["k-means", "mini-batch k-means on principal components"])
def test_picks_spread_over_the_uncertain_groups_instead_of_crowding_the_most_uncertain_one(many, monkeypatch):
    if many:  # the path of thousands of picks, here at five: mini-batch k-means on 8 of the 32 dimensions
        monkeypatch.setattr(suggest_rank, "EXACT_KMEANS_UP_TO", 4)
        monkeypatch.setattr(suggest_rank, "REDUCED_DIMENSIONS", 8)
    rng = np.random.default_rng(0)
    x, group = _groups(rng, centres=6, per_group=8, spread=0.5)
    within = [float(x[i] @ x[j]) for i in range(8) for j in range(i + 1, 8)]
    assert 0.6 < np.median(within) < 0.9  # alike, but under the near-identical cosine
    # group 0 is the most uncertain throughout, groups 1-4 a little less, group 5 not at all
    scores = np.where(group == 0, 0.9, np.where(group == 5, 0.05, 0.7)) + 0.01 * rng.random(len(group))
    picks = pick_diverse(scores, x, 5)
    assert len(set(picks)) == 5
    assert sorted(group[picks]) == [0, 1, 2, 3, 4]  # one per uncertain group, none from the sure one
    assert np.all(np.diff(scores[picks]) <= 0)  # most uncertain first
    # by uncertainty alone the five would all come from group 0
    assert set(group[np.argsort(-scores)[:5]]) == {0}


def test_near_identical_images_are_picked_once_while_others_remain():
    rng = np.random.default_rng(1)
    x, _ = _groups(rng, centres=3, per_group=4, spread=0.5)
    copies = np.repeat(x[:1], 9, axis=0)  # nine copies of one image, the most uncertain of all
    x = np.concatenate([copies, x])
    scores = np.concatenate([np.full(9, 0.99), rng.uniform(0.2, 0.6, len(x) - 9)])
    picks = pick_diverse(scores, x, 6)
    assert len(set(picks)) == 6 and picks[0] < 10
    assert sum(p < 10 for p in picks) == 1  # copy or original, once
    # asked for every image but the duplicates: they come last, and all are picked
    assert sorted(pick_diverse(scores, x, len(x))) == list(range(len(x)))


def test_without_embeddings_or_with_few_images_the_most_uncertain_come_first():
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    assert pick_diverse(scores, None, 2) == [1, 3]
    assert pick_diverse(scores, np.eye(4), 10) == [1, 3, 2, 0]
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]])
    assert np.allclose(uncertainty(probs, "margin"), [1.0, 0.0, 0.6])
    assert np.allclose(uncertainty(probs, "entropy")[:2], [1.0, 0.0])
