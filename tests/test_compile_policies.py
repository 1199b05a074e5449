"""The in-graph exit scores (torch twins) match the numpy reference policies the runtime and calibration use."""

import numpy as np
import pytest

from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.policies import POLICIES

torch = pytest.importorskip("torch")

from dmpo_edge.compile.policies_torch import torch_policy  # noqa: E402


def _logits(seed=0):
    rng = np.random.default_rng(seed)
    # ordinary, sharp, nearly tied and very large logits (softmax must stay stable)
    return np.concatenate([
        rng.normal(size=(64, 10)), rng.normal(size=(16, 10)) * 25.0,
        np.tile(rng.normal(size=(1, 10)), (4, 1)) + rng.normal(size=(4, 10)) * 1e-4,
        rng.normal(size=(4, 10)) * 1e3,
    ]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_torch_twin_matches_numpy_reference(name):
    z = _logits()
    ref = POLICIES[name](z)
    got = torch_policy(name)(torch.from_numpy(z)).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)


def test_scores_order_samples_alike():
    # a one-hot-like sample scores higher than a flat one under every policy
    z = np.array([[10.0, 0, 0, 0], [0.1, 0, 0, 0]], np.float32)
    for name in POLICIES:
        s = torch_policy(name)(torch.from_numpy(z)).numpy()
        assert s[0] > s[1], name


def test_unknown_policy_is_one_clear_error():
    with pytest.raises(DmpoEdgeError, match="unknown policy 'softmax'.*max_softmax"):
        torch_policy("softmax")
