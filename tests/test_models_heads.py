"""DMPO heads: covariance pooling, Newton-Schulz square root, the triangle gather, loss-weight schedules."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmpo_edge.errors import DmpoEdgeError
from dmpo_edge.models import LossSchedule
from dmpo_edge.models.heads import CovariancePredictor, covariance, newton_schulz_sqrt, upper_triangle_indices


def _spd(d, lo=1.0, hi=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    ev = torch.linspace(lo, hi, d, dtype=torch.float64)
    return q @ torch.diag(ev) @ q.T, q @ torch.diag(ev.sqrt()) @ q.T


@pytest.mark.parametrize("iters, tol", [(10, 1e-5), (5, 5e-3)])
def test_newton_schulz_sqrt_matches_eigendecomposition(iters, tol):
    a, ref = _spd(8)
    trace = torch.trace(a)
    root = newton_schulz_sqrt((a / trace).float()[None], iters)[0].double() * trace.sqrt()
    err = (root - ref).norm() / ref.norm()
    assert err < tol, f"{iters} iterations: relative error {err:.2e}"
    # and the root really squares back to the matrix
    assert ((root @ root - a).norm() / a.norm()) < 10 * tol


def test_covariance_and_triangle_gather_match_numpy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 50, 6, generator=g)
    cov, trace = covariance(x)
    for n in range(2):
        ref = np.cov(x[n].numpy(), rowvar=False, bias=True)
        np.testing.assert_allclose(cov[n].numpy(), ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(trace[n].item(), np.trace(ref), rtol=1e-5)
    m = torch.arange(36.0).reshape(6, 6)
    r, c = np.triu_indices(6)
    np.testing.assert_array_equal(m.flatten()[upper_triangle_indices(6)].numpy(), m.numpy()[r, c])


def test_covariance_predictor_statistics_are_the_matrix_square_root():
    # token features whose covariance is well conditioned: the head's statistics = triu(sqrt(cov of reduced feats))
    head = CovariancePredictor("tokens", 6, 3, dim=6, iters=12).eval()
    with torch.no_grad():
        head.reduce[0].weight.copy_(torch.eye(6))
        head.reduce[0].bias.zero_()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 400, 6, generator=g).abs()  # positive: ReLU keeps them
    with torch.no_grad():
        reduced = head.reduce(x)
        stats = head.statistics(x)[0].double()
    c = np.cov(reduced[0].numpy(), rowvar=False, bias=True)
    w, v = np.linalg.eigh(c)
    ref = (v * np.sqrt(w)) @ v.T
    r, cc = np.triu_indices(6)
    np.testing.assert_allclose(stats.numpy(), ref[r, cc], rtol=1e-3, atol=1e-4)


def test_loss_schedule_two_phase_and_uniform():
    s = LossSchedule(4, epochs=10, switch_at=0.5)
    assert s.switch_epoch == 5
    p1, p2 = s.weights(0), s.weights(5)
    assert s.weights(4) == p1 and s.weights(9) == p2
    np.testing.assert_allclose(p1, [0.1, 0.4, 0.7, 1.0])  # deep exits first
    np.testing.assert_allclose(p2, [1.0, 1.0, 1.0, 0.5])  # then the weight moves onto the early exits
    assert p1[0] < p1[-1] and p2[0] > p1[0]
    u = LossSchedule(3, epochs=4, mode="uniform")
    assert all(u.weights(e) == [1.0, 1.0, 1.0] for e in range(4))
    custom = LossSchedule(2, epochs=4, switch_at=0.25, phase1=[0, 1], phase2=[2, 1])
    assert custom.weights(0) == [0.0, 1.0] and custom.weights(1) == [2.0, 1.0]
    assert LossSchedule.from_dict(custom.to_dict()).to_dict() == custom.to_dict()
    with pytest.raises(DmpoEdgeError, match="one per exit"):
        LossSchedule(3, epochs=4, phase1=[1, 1])
