"""Which unlabeled images to label next: uncertain ones that differ from each other.

Uncertainty alone picks clusters of similar images (ten frames of the same scene the model
hesitates on teach it one thing, and on CIFAR-10 it was no better than picking at random), so the
ranking is diverse mini-batch active learning (Zhdanov 2019, "Diverse mini-batch Active
Learning"): the `CANDIDATES` x n most uncertain images are clustered by k-means on their
embeddings, weighted by uncertainty, into n clusters, and each cluster gives the image nearest its
centre. No library offers this ranking on precomputed probabilities and embeddings (modAL and
scikit-activeml wrap their own estimators), so it is a few lines over scikit-learn's k-means.
Near-identical images (cosine above `SIMILAR`) are still never picked twice while others remain."""

from __future__ import annotations

import warnings

import numpy as np

MEASURES = ("margin", "entropy")
# cosine similarity of backbone embeddings above which two images count as near-identical
SIMILAR = 0.9
# how many times n of the most uncertain images the clusters are formed from
CANDIDATES = 5
# up to this many picks the clusters come from full k-means (3 starts) on the embeddings; above
# it from mini-batch k-means (one start) on their first REDUCED_DIMENSIONS principal components:
# full k-means costs about candidates x n x n x dimensions per iteration, which for 2,000 picks
# of 1,280-dimensional embeddings was minutes (bench/RESULTS.md)
EXACT_KMEANS_UP_TO = 500
REDUCED_DIMENSIONS = 64


def uncertainty(probs: np.ndarray, measure: str = "margin") -> np.ndarray:
    """N scores in [0, 1], higher = less sure: 1 - (top1 - top2), or the entropy over log(K)."""
    if probs.shape[1] < 2:
        return np.zeros(len(probs))
    if measure == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        return -(p * np.log(p)).sum(1) / np.log(probs.shape[1])
    top = np.sort(probs, axis=1)[:, -2:]
    return 1.0 - (top[:, 1] - top[:, 0])


def pick_diverse(scores: np.ndarray, embeddings: np.ndarray | None, n: int, similar: float = SIMILAR,
                 candidates: int = CANDIDATES, seed: int = 0) -> list[int]:
    """Indices of `n` images, most uncertain first: one per cluster of the most uncertain
    images (see the module's doc), none (while there are enough) with a cosine similarity above
    `similar` to another pick. Without embeddings: the n most uncertain."""
    order = np.argsort(-scores, kind="stable")
    n = min(n, len(order))
    if embeddings is None or n == len(order):
        return order[:n].tolist()
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    picks = _Picks(unit, similar)
    pool = order[:min(len(order), candidates * n)]
    for members, everyone in _by_cluster(unit[pool], scores[pool], n, seed):
        if not picks.take_first_fresh(pool[members]):  # each member taken or near-identical to a pick
            picks.take_first_fresh(pool[everyone()])
    # fewer distinct clusters than asked (duplicates): the most uncertain of the rest, fresh ones first
    picks.take_first_fresh(order, n - len(picks.taken))
    picks.take_first_fresh(order, n - len(picks.taken), allow_similar=True)
    return sorted(picks.taken, key=lambda i: (-scores[i], i))


class _Picks:
    """The picks so far, and how close every image is to the nearest of them."""

    def __init__(self, unit: np.ndarray, similar: float):
        self.unit, self.similar, self.taken = unit, similar, []
        self.closest = np.full(len(unit), -1.0)
        self.is_taken = np.zeros(len(unit), bool)

    def take_first_fresh(self, ranked: np.ndarray, count: int = 1, allow_similar: bool = False) -> int:
        """Take the first `count` images of `ranked` not taken yet and (unless allowed) not
        near-identical to a pick; how many it took."""
        took = 0
        for i in ranked:
            if took == count:
                break
            if self.is_taken[i] or (not allow_similar and self.closest[i] > self.similar):
                continue
            self.taken.append(int(i))
            self.is_taken[i] = True
            np.maximum(self.closest, self.unit @ self.unit[i], out=self.closest)
            took += 1
        return took


def _by_cluster(unit: np.ndarray, scores: np.ndarray, n: int, seed: int):
    """For each of n uncertainty-weighted k-means clusters of `unit`, heaviest first: its members'
    positions ordered by distance to its centre, and a function giving every position so ordered
    (for a cluster none of whose members can be taken). Never an N x n distance matrix: at
    thousands of picks it would not fit in memory."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.decomposition import PCA
    weights = scores + 1e-6
    if n <= EXACT_KMEANS_UP_TO:
        kmeans = KMeans(n, n_init=3, random_state=seed)
    else:
        kmeans = MiniBatchKMeans(n, n_init=1, batch_size=1024, random_state=seed)
        if unit.shape[1] > REDUCED_DIMENSIONS:
            unit = PCA(REDUCED_DIMENSIONS, random_state=seed).fit_transform(unit)
    with warnings.catch_warnings():  # duplicates can leave fewer distinct points than clusters
        warnings.simplefilter("ignore")
        kmeans.fit(unit, sample_weight=weights)
    labels, centres = kmeans.labels_, kmeans.cluster_centers_

    def by_distance(positions: np.ndarray, c: int) -> np.ndarray:
        return positions[np.argsort(np.linalg.norm(unit[positions] - centres[c], axis=1), kind="stable")]
    everyone = np.arange(len(unit))
    for c in np.argsort(-np.bincount(labels, weights=weights, minlength=n), kind="stable"):
        yield by_distance(np.flatnonzero(labels == c), c), lambda c=c: by_distance(everyone, c)
