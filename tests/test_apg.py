"""pyengine.optim.APG: SSS's modified Accelerated Proximal Gradient, checked against lasso
solutions from scikit-learn's coordinate descent."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from pyengine.methods.apg import APG, soft_threshold


def _problem(seed, n=120, d=40, corr=0.8):
    # correlated columns make the problem ill-conditioned, where acceleration pays
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 1))
    A = corr * base + (1 - corr) * rng.standard_normal((n, d)) + 0.3 * rng.standard_normal((n, d))
    x_true = np.zeros(d)
    x_true[rng.choice(d, 6, replace=False)] = rng.standard_normal(6) * 3
    b = A @ x_true + 0.1 * rng.standard_normal(n)
    return A, b


def _solve(A, b, gamma, momentum, nonneg=False, x_ref=None, tol=1e-6, max_iter=50000):
    """Run APG on f(x) = ||Ax - b||^2 / (2n) (the L1 term is the optimizer's); return the
    final iterate and the first iteration at which it is within ``tol`` of ``x_ref``."""
    n = A.shape[0]
    At, bt = torch.tensor(A), torch.tensor(b)
    L = float(np.linalg.eigvalsh(A.T @ A / n).max())
    x = torch.zeros(A.shape[1], dtype=torch.float64, requires_grad=True)
    opt = APG([x], lr=1.0 / L, gamma=gamma, momentum=momentum, nonneg=nonneg)
    hit = None
    for it in range(1, max_iter + 1):
        opt.zero_grad()
        loss = (At @ x - bt).square().sum() / (2 * n)
        loss.backward()
        opt.step()
        z = opt.state[x]["prox"]
        if x_ref is not None and hit is None and (z - x_ref).abs().max() < tol:
            hit = it
            break
    opt.finalize()
    return x.detach(), hit


@pytest.mark.parametrize("seed,gamma", [(0, 0.05), (1, 0.2), (2, 0.01)])
def test_lasso_matches_coordinate_descent_and_beats_ista(seed, gamma):
    A, b = _problem(seed)
    ref = Lasso(alpha=gamma, fit_intercept=False, tol=1e-14, max_iter=200000).fit(A, b).coef_
    x_ref = torch.tensor(ref)
    x_apg, it_apg = _solve(A, b, gamma, momentum=0.9, x_ref=x_ref)
    x_ista, it_ista = _solve(A, b, gamma, momentum=0.0, x_ref=x_ref)
    assert it_apg is not None, "APG did not reach the lasso solution"
    assert (x_apg - x_ref).abs().max() < 1e-4
    # same zero pattern, and the zeros are exact
    assert torch.equal(x_apg == 0, x_ref == 0)
    assert (x_apg == 0).sum() > 0
    # acceleration: fewer iterations than plain ISTA (which may not even get there)
    assert it_ista is None or it_apg < it_ista, (it_apg, it_ista)


def test_nonneg_lasso_matches_positive_coordinate_descent():
    A, b = _problem(3)
    gamma = 0.05
    ref = Lasso(alpha=gamma, fit_intercept=False, positive=True, tol=1e-14,
                max_iter=200000).fit(A, b).coef_
    x, hit = _solve(A, b, gamma, momentum=0.9, nonneg=True, x_ref=torch.tensor(ref))
    assert hit is not None
    assert (x >= 0).all()
    assert (x - torch.tensor(ref)).abs().max() < 1e-4


def test_no_double_counted_l1_exact_zeros_and_momentum_state():
    # f(x) = (x - c)^2 / 2 + gamma |x|  ->  x* = S_gamma(c) elementwise. Double-counting the
    # L1 term (also in the loss) would give S_{2 gamma}(c) instead.
    gamma = 0.3
    c = torch.tensor([1.0, -0.8, 0.25, -0.1, 0.45, 0.0], dtype=torch.float64)
    x = torch.ones_like(c, requires_grad=True)
    opt = APG([x], lr=0.5, gamma=gamma, momentum=0.9)
    zs = []
    for _ in range(400):
        opt.zero_grad()
        (x - c).square().sum().mul(0.5).backward()
        opt.step()
        zs.append(opt.state[x]["prox"].clone())
    want = soft_threshold(c, gamma)
    assert torch.allclose(zs[-1], want, atol=1e-10)
    assert not torch.allclose(zs[-1], soft_threshold(c, 2 * gamma), atol=1e-3)
    # exact zeros, in the iterate and (after two zero steps) in the look-ahead parameter
    assert torch.equal(zs[-1] == 0, want == 0) and (want == 0).sum() == 3
    assert (x.detach()[want == 0] == 0).all()
    # the momentum buffer lives in the state and is z_t - z_{t-1}
    v = opt.state[x]["momentum_buffer"]
    assert torch.allclose(v, zs[-1] - zs[-2], atol=1e-12)
    assert opt.state_dict()["state"][0]["momentum_buffer"] is not None


def test_lookahead_update_matches_formula():
    torch.manual_seed(1)
    p = torch.randn(7, dtype=torch.float64, requires_grad=True)
    lr, gamma, mu = 0.1, 0.5, 0.9
    opt = APG([p], lr=lr, gamma=gamma, momentum=mu)
    lam, v = p.detach().clone(), torch.zeros(7, dtype=torch.float64)
    for _ in range(5):
        g = torch.randn(7, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        z = soft_threshold(lam - lr * g, lr * gamma)
        v = z - lam + mu * v
        lam = z + mu * v
        assert torch.allclose(p.detach(), lam, atol=1e-14)
        assert torch.allclose(opt.state[p]["momentum_buffer"], v, atol=1e-14)


def test_nonneg_zero_is_immediate_and_no_weight_decay():
    p = torch.tensor([0.05, 2.0], requires_grad=True)
    opt = APG([p], lr=1.0, gamma=0.1, momentum=0.9, nonneg=True)
    p.grad = torch.zeros(2)
    opt.step()
    assert p[0].item() == 0.0                    # thresholded to exactly zero at once
    assert p[1].item() == pytest.approx(1.9 + 0.9 * (1.9 - 2.0))
    assert "weight_decay" not in opt.defaults


@pytest.mark.parametrize("kw", [dict(lr=-1, gamma=0.1), dict(lr=0.1, gamma=-0.1),
                                dict(lr=0.1, gamma=0.1, momentum=1.0)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        APG([torch.zeros(1, requires_grad=True)], **kw)
