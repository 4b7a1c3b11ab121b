"""Test-time BatchNorm adaptation: the statistics become the site's, nothing else moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidct.classification.adaptation import MIN_ADAPTATION_SCANS, adapt_batchnorm
from covidct.classification.data import to_model_input

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def test_statistics_are_the_sites_and_no_weight_moves() -> None:
    """After adaptation the BatchNorm's running mean and variance are those of the conv outputs
    over the site's pixels (one pass, the batches averaged), in eval mode."""
    net = _net()
    weights = {k: v.clone() for k, v in net.named_parameters()}
    images = np.random.default_rng(0).integers(0, 256, (40, 12, 12), dtype=np.uint8)
    adapt_batchnorm(net, images, MEAN, STD, CPU, batch_size=20)  # two equal batches: their mean is the mean
    with torch.no_grad():
        features = net[0](to_model_input(torch.from_numpy(images)[:, None], MEAN, STD, CPU))
    torch.testing.assert_close(net[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    # the batches' variances averaged: close to, not exactly, the pooled variance
    torch.testing.assert_close(net[1].running_var, features.var(dim=(0, 2, 3)), atol=1e-3, rtol=1e-2)
    assert not net.training
    assert all(torch.equal(weights[k], v) for k, v in net.named_parameters())


def test_too_few_scans_are_refused_before_anything_changes() -> None:
    net = _net()
    before = net[1].running_mean.clone()
    images = np.zeros((MIN_ADAPTATION_SCANS - 1, 12, 12), dtype=np.uint8)
    with pytest.raises(ValueError, match=f"at least {MIN_ADAPTATION_SCANS} scans.*got {MIN_ADAPTATION_SCANS - 1}"):
        adapt_batchnorm(net, images, MEAN, STD, CPU)
    assert torch.equal(net[1].running_mean, before)
