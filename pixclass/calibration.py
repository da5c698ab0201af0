"""Temperature scaling: one number T, fitted on the validation split at the end of a training run,
that divides the network's logits before the softmax (Guo et al., 2017, "On calibration of modern
neural networks"). It changes how confident the answers are, not which class wins (with
test-time augmentation, whose views' probabilities are averaged, the top class can move in a
near tie).

The artifact stores T (`temperature` in pixclass.json; absent in older files, which means 1), and
tta.probabilities applies it, so every backend and export answers with calibrated probabilities."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .tta import combine_views

# a fitted T outside this range says the validation split is degenerate (a handful of images, all
# right or all wrong), not that the network needs it
TEMPERATURE_RANGE = (0.05, 20.0)

# Standard deviation of the prior on log T (a log-normal centred on T = 1). A validation split of a
# few dozen images that are nearly all right pulls a plain maximum-likelihood T towards 0 (ever
# sharper probabilities cost those images nothing), which leaves the model overconfident on the
# next images; the prior keeps such a split's T near 1, and weighs nothing against thousands of
# images (bench/calibration_floor.py and bench/RESULTS.md, "Calibration on small splits").
LOG_TEMPERATURE_PRIOR_SD = 1.0


def fit_temperature(logits: torch.Tensor, labels, prior_sd: float | None = LOG_TEMPERATURE_PRIOR_SD) -> float:
    """The T that maximises the posterior of `labels` under combine_views(logits, T): their summed
    negative log-likelihood plus a normal prior on log T with standard deviation `prior_sd`
    (None: plain maximum likelihood). `logits`: V x N x K (the network's logits on each test-time
    view of N validation images). LBFGS on log T (T stays positive); 1.0 without images."""
    logits = logits.detach().float().clone()  # a normal tensor: logits from inference mode cannot enter autograd
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll():
        optimizer.zero_grad()
        loss = negative_log_likelihood(logits, labels, log_t.exp()) * len(labels)
        if prior_sd is not None:
            loss = loss + log_t ** 2 / (2 * prior_sd ** 2)
        loss.backward()
        return loss

    optimizer.step(nll)
    low, high = TEMPERATURE_RANGE
    return round(float(np.clip(log_t.exp().item(), low, high)), 6)


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature) -> torch.Tensor:
    """Mean NLL of `labels` under the probabilities the artifact would give at `temperature`."""
    scaled = logits / temperature
    if scaled.shape[0] == 1:  # one view: the log-softmax, stable for confident networks
        return F.cross_entropy(scaled[0], labels)
    probs = combine_views(scaled)
    return F.nll_loss(probs.clamp_min(1e-12).log(), labels)
