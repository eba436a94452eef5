"""Pruning limit, the numerics: Hessian-vector products against finite differences and
autograd's dense Hessian, Lanczos quadrature against eigvalsh, the Gaussian-width threshold
against closed forms."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyengine.experiments.limit import (HessianOperator, cache_batches, flat_fraction, full_hessian,
                            gaussian_width, loss_spread, predict, pruned_distance, slq)
from pyengine.experiments.limit.models import DigitsMLP, digits_vit_small
from pyengine.experiments.limit.slq import Spectrum, lanczos, lanczos_block, tridiagonal_quadrature
from pyengine.experiments.limit.threshold import magnitude_order, solve


def _batches(sizes, img, n_cls=10, dtype=torch.float64):
    return [(torch.randn(b, 3, img, img, dtype=dtype), torch.randint(0, n_cls, (b,)))
            for b in sizes]


def _flat_grad(op, params):
    total = 0
    for x, y in op.batches:
        loss = F.cross_entropy(op.model(x), y) * (len(y) / op.samples)
        total = total + torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    return total


def _fd_hvp(op, v, h=1e-5):
    """Central finite difference of the gradient along v."""
    params = op.params
    vs = op._split(v)
    with torch.no_grad():
        for p, u in zip(params, vs):
            p.add_(h * u)
    gp = _flat_grad(op, params)
    with torch.no_grad():
        for p, u in zip(params, vs):
            p.sub_(2 * h * u)
    gm = _flat_grad(op, params)
    with torch.no_grad():
        for p, u in zip(params, vs):
            p.add_(h * u)
    return (gp - gm) / (2 * h)


@pytest.mark.parametrize("model_kind", ["mlp", "vit"])
def test_hvp_matches_finite_differences(model_kind):
    if model_kind == "mlp":
        model = DigitsMLP(img_size=5, hidden=(7, 3)).double()
        batches = _batches([9, 9, 4], 5)  # uneven last batch
    else:  # head dim 7, odd everything; SDPA must fall back to a double-differentiable path
        model = digits_vit_small(img_size=8, patch_size=4, embed_dim=14, num_heads=2, depth=2,
                                 mlp_ratio=1.5).double()
        batches = _batches([5, 3], 8)
    op = HessianOperator(model, batches)
    v = torch.randn(op.dim, dtype=torch.float64)
    hv = op.matvec(v)
    fd = _fd_hvp(op, v)
    assert torch.linalg.vector_norm(hv - fd) <= 1e-6 * torch.linalg.vector_norm(fd)
    # the block product is the same operator
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    HV = op.matmat(V)
    for j in range(3):
        torch.testing.assert_close(HV[:, j], op.matvec(V[:, j]), rtol=1e-10, atol=1e-12)


def test_full_hessian_matches_autograd_and_is_batch_split_invariant():
    model = DigitsMLP(img_size=3, hidden=(4,), num_classes=3).double()
    x, y = torch.randn(13, 3, 3, 3, dtype=torch.float64), torch.randint(0, 3, (13,))
    params = [model.layers[0].weight, model.layers[1].weight]
    shapes = [p.shape for p in params]

    def loss_of(flat):
        w0, w1 = torch.split(flat, [s.numel() for s in shapes])
        h = torch.relu(x[:, 0].flatten(1) @ w0.view(shapes[0]).T + model.layers[0].bias)
        return F.cross_entropy(h @ w1.view(shapes[1]).T + model.layers[1].bias, y)

    ref = torch.autograd.functional.hessian(loss_of, torch.cat([p.detach().reshape(-1) for p in params]))
    one = full_hessian(HessianOperator(model, [(x, y)]))
    split = full_hessian(HessianOperator(model, [(x[:5], y[:5]), (x[5:11], y[5:11]), (x[11:], y[11:])]))
    torch.testing.assert_close(one, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(split, ref, rtol=1e-9, atol=1e-12)


def test_hessian_operator_rejects_bad_input():
    model = DigitsMLP(img_size=3, hidden=(4,)).double()
    op = HessianOperator(model, _batches([4], 3))
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(op.dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="out of range"):
        op.row_l1(op.dim)
    with pytest.raises(ValueError, match="at least one batch"):
        HessianOperator(model, [])
    with pytest.raises(ValueError, match="max_samples"):
        cache_batches([(torch.zeros(2, 1), torch.zeros(2))], max_samples=0)


def _sym(n, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.randn(n - 3, generator=g, dtype=torch.float64) * spread,
                    torch.tensor([-2.0, 15.0, 40.0], dtype=torch.float64)])  # non-PSD, outliers
    return (Q * ev) @ Q.T, ev


def test_lanczos_quadrature_is_gauss_exact():
    """m steps integrate polynomials of degree < 2m exactly: sum w theta^k = v'A^k v / v'v."""
    A, _ = _sym(61, 1)
    v = torch.randint(0, 2, (61,), generator=torch.Generator().manual_seed(2)).double() * 2 - 1
    m = 7
    theta, w = tridiagonal_quadrature(*lanczos(lambda u: A @ u, v, m))
    assert len(theta) == m and abs(w.sum() - 1) < 1e-12
    u = v / v.norm()
    Ak = torch.eye(61, dtype=torch.float64)
    for k in range(2 * m):
        exact = float(u @ Ak @ u)
        assert abs(np.sum(w * theta ** k) - exact) <= 1e-9 * max(1.0, abs(exact)), k
        Ak = Ak @ A


def test_lanczos_full_length_recovers_eigenvalues_and_reorthogonalization_matters():
    A, ev = _sym(80, 3, spread=0.05)
    v = torch.randn(80, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    theta, w = tridiagonal_quadrature(*lanczos(lambda u: A @ u, v, 80))
    np.testing.assert_allclose(np.sort(theta), np.sort(ev.numpy()), atol=1e-9)
    # without reorthogonalisation the outliers come back as ghost copies (well-known failure)
    theta_bad, _ = tridiagonal_quadrature(*lanczos(lambda u: A @ u, v, 80, reorthogonalize=False))
    assert np.sum(np.abs(theta_bad - 40.0) < 1e-6) > 1
    assert np.sum(np.abs(theta - 40.0) < 1e-6) == 1


def test_lanczos_stops_on_an_invariant_subspace():
    ev = torch.tensor([1.0] * 20 + [3.0] * 20 + [-0.5] * 10, dtype=torch.float64)
    v = torch.ones(50, dtype=torch.float64)
    a, b = lanczos(lambda u: ev * u, v, 30)
    assert len(a) == 3  # three distinct eigenvalues: a 3-dimensional Krylov space
    theta, w = tridiagonal_quadrature(a, b)
    np.testing.assert_allclose(np.sort(theta), [-0.5, 1.0, 3.0], atol=1e-10)
    np.testing.assert_allclose(w[np.argsort(theta)], [0.2, 0.4, 0.4], atol=1e-10)
    # the block version stops each column on its own
    V = torch.stack([v, torch.randn(50, dtype=torch.float64)], 1)
    out = lanczos_block(lambda U: ev[:, None] * U, V, 30)
    assert len(out[0][0]) == 3 and len(out[1][0]) == 3


def test_slq_block_equals_sequential():
    A, _ = _sym(40, 5)
    seq = slq(lambda u: A @ u, dim=40, dtype=torch.float64, iters=9, probes=5, seed=7)
    blk = slq(lambda u: A @ u, dim=40, dtype=torch.float64, iters=9, probes=5, seed=7, block=3,
              matmat=lambda U: A @ U)
    for a, b in zip(seq.nodes + seq.weights, blk.nodes + blk.weights):
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_slq_moments_match_eigvalsh_on_a_trained_model():
    """Acceptance: SLQ through Hessian-vector products of a small trained digits MLP against
    the eigenvalues of its full Hessian; the density moments agree within 5%."""
    from pyengine.train.data import loaders
    torch.manual_seed(0)
    train, _, _ = loaders("digits", 8, 128, seed=0)
    model = DigitsMLP(img_size=8, hidden=(4,)).double()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(6):
        for x, y in train:
            loss = F.cross_entropy(model(x.double()), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    op = HessianOperator(model, cache_batches(train, 128, dtype=torch.float64))
    H = full_hessian(op)
    ev = torch.linalg.eigvalsh(H).numpy()
    assert ev.min() < 0  # a trained net's Hessian is indefinite: the case that matters
    probes = 2048
    spec = slq(op, iters=3, probes=probes, block=1024, seed=1)  # exact to degree 5 per probe
    Hk = np.eye(op.dim)
    for k in (1, 2, 3, 4):
        Hk = Hk @ H.numpy()
        exact = float(np.mean(ev ** k))
        # Hutchinson's standard error for Rademacher probes: the 5% bound is >= 2.5 of them
        se = np.sqrt(2 * ((Hk ** 2).sum() - (np.diag(Hk) ** 2).sum()) / probes) / op.dim
        assert se / abs(exact) < 0.02, k
        assert abs(spec.moment(k) - exact) <= 0.05 * abs(exact), (k, spec.moment(k), exact)
    # the density itself integrates to one and puts its mass where the eigenvalues are
    grid = np.linspace(ev.min() - 1, ev.max() + 1, 4000)
    d = spec.density(grid)
    assert abs(np.trapezoid(d, grid) - 1) < 1e-3


def test_gaussian_width_closed_forms():
    eps = 0.03
    R = np.array([0.0, 0.5, 2.0])
    # one eigenvalue: gw = r^2 / (R^2 + r^2) with r^2 = 2 eps / |lambda|; the sign is dropped
    for lam in (4.0, -4.0):
        r2 = 2 * eps / abs(lam)
        np.testing.assert_allclose(gaussian_width([lam], [1.0], R, eps), r2 / (R ** 2 + r2))
    # a zero eigenvalue is an unbounded direction: it always counts fully
    np.testing.assert_allclose(gaussian_width([0.0], [1.0], R, eps), 1.0)
    # mixture, unnormalised weights
    nodes, w = np.array([0.5, 2.0, -1.0]), np.array([2.0, 1.0, 1.0])
    ref = sum(wi * (2 * eps / abs(l)) / (R ** 2 + 2 * eps / abs(l)) for l, wi in zip(nodes, w)) / w.sum()
    np.testing.assert_allclose(gaussian_width(nodes, w, R, eps), ref)
    # flat correction = the paper's mass f/(1-f) of the total put at eigenvalue ~0
    f = 0.2
    paper = gaussian_width(np.r_[nodes, 1e-30], np.r_[w, f / (1 - f) * w.sum()], R, eps)
    np.testing.assert_allclose(gaussian_width(nodes, w, R, eps, flat=f), paper, rtol=1e-12)
    with pytest.raises(ValueError, match="eps"):
        gaussian_width(nodes, w, R, 0.0)
    with pytest.raises(ValueError, match="flat"):
        gaussian_width(nodes, w, R, eps, flat=1.0)


def test_pruned_distance_and_order_against_brute_force():
    params = [torch.randn(7, 5), torch.randn(11), torch.randn(3, 1, 2)]
    params[0][0, :3] = 0.25  # ties: exactly floor(rho n) weights go
    params[1][:2] = -0.25
    flat = torch.cat([p.reshape(-1) for p in params]).double()
    n = flat.numel()
    ratios = [0.0, 0.1, 0.37, 0.5, 0.99, 1.0]
    got = pruned_distance(params, ratios)
    order = magnitude_order(params)
    assert torch.equal(flat.abs()[order], torch.sort(flat.abs()).values)
    for r, g in zip(ratios, got):
        k = int(np.floor(r * n + 1e-9))
        pruned = flat.clone()
        pruned[order[:k]] = 0
        assert abs(g - float((flat - pruned).norm())) < 1e-12
        assert (pruned == 0).sum() >= k
    assert got[0] == 0 and abs(got[-1] - float(flat.norm())) < 1e-12
    with pytest.raises(ValueError, match="ratio"):
        pruned_distance(params, [1.5])


def test_predict_solves_the_crossing():
    """One eigenvalue, weights with known magnitudes: the predicted ratio is the grid point
    nearest the root of rho = 2eps / (2eps + R(rho)^2 lambda)."""
    w = torch.linspace(0.01, 1.0, 1000)
    lam, eps = 3.0, 0.5
    spec = Spectrum([np.array([lam])], [np.array([1.0])], dim=1000)
    ratios = [i / 200 for i in range(200)]
    p = predict(spec, [w], eps, ratios)
    R = pruned_distance([w], ratios)
    gw = 2 * eps / (2 * eps + R ** 2 * lam)
    assert p.ratio == ratios[int(np.argmin(np.abs(gw - np.array(ratios))))]
    assert 0 < p.ratio < 1 and p.ratio == p.ratio_uncorrected
    # more flatness can only move the predicted threshold up
    assert predict(spec, [w], eps, ratios, flat=0.3).ratio > p.ratio
    assert solve([0.0, 0.5, 1.0], np.array([1.0, 0.5, 0.2])) == 0.5


def test_loss_spread_is_the_std_of_batch_losses():
    model = DigitsMLP(img_size=4, hidden=(5,))
    batches = [(torch.randn(6, 3, 4, 4), torch.randint(0, 10, (6,))) for _ in range(4)]
    mean, std, per = loss_spread(model, batches)
    with torch.no_grad():
        ref = [float(F.cross_entropy(model(x), y)) for x, y in batches]
    np.testing.assert_allclose(per, ref, rtol=1e-6)
    assert abs(std - np.std(ref)) < 1e-7 and abs(mean - np.mean(ref)) < 1e-7
    with pytest.raises(ValueError, match="2 batches"):
        loss_spread(model, batches[:1])


def test_flat_fraction_counts_exactly_flat_rows():
    """Dead ReLU neurons make exactly-zero Hessian rows; sampling every weight once (rows = n)
    must count them exactly as the dense Hessian does."""
    model = DigitsMLP(img_size=3, hidden=(6,), num_classes=4).double()
    with torch.no_grad():
        model.layers[0].bias[[1, 4]] = -100.0  # never active on these inputs
    batches = _batches([8, 5], 3, n_cls=4)
    op = HessianOperator(model, batches)
    H = full_hessian(op)
    expected = float((H.abs().sum(1) < 1e-7).double().mean())
    assert expected > 0
    frac, rows = flat_fraction(op, op.params, rows=op.dim)
    assert abs(frac - expected) < 1e-12
    assert sorted(r["index"] for r in rows) == list(range(op.dim))
