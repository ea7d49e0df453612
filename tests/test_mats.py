"""MaTS against the closed forms it generalises and a dense Kronecker solve written here.

Diagonal curvature must give Fisher merging, Gram-only curvature RegMean's closed form, and K-FAC
curvature the solution of Σ_i (A_i ⊗ G_i) vec(W) = Σ_i (A_i ⊗ G_i) vec(W_i) that
torch.linalg.solve finds on the dense Kronecker matrix (vec stacks columns), also at the default
parameters on rank-deficient factors, where the recorded residual must be the true one.
"""

from __future__ import annotations

import pytest
import torch

from fmerge.errors import FmergeError
from fmerge.methods import MergeContext, TensorGroup, get_method
from fmerge.methods.fisher import FisherParams
from fmerge.methods.mats import MatsParams, MatsResidualWarning, System, damped_factor, preconditioned_cg
from fmerge.methods.regmean import RegMeanParams

CTX_NAMES = ["a", "b", "c"]


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def psd(n: int, seed: int, rows: int = 12) -> torch.Tensor:
    x = randn(rows, n, seed=seed)
    return x.T @ x


def models(shape, seed=0):
    base = randn(*shape, seed=seed)
    return base, [base + 0.1 * randn(*shape, seed=seed + 1 + i) for i in range(len(CTX_NAMES))]


def mats(group, **params):
    ctx = MergeContext(CTX_NAMES)
    p = MatsParams.model_validate(params)
    method = get_method("mats")
    method.validate(p, ctx)
    return method.merge(group, p, ctx), ctx.diagnostics.get("mats", {}).get(group.name)


def test_diagonal_curvature_is_fisher_merging():
    base, thetas = models((4, 5))
    fishers = [randn(4, 5, seed=20 + i).abs() + 0.01 for i in range(3)]
    group = TensorGroup("w", base, thetas, {"fisher": fishers})
    expect = get_method("fisher").merge(group, FisherParams(floor=0.0), MergeContext(CTX_NAMES))
    got, record = mats(group, curvature="diagonal", damping=0.0)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    # the preconditioner is the operator: exact at once, up to the fp32 rounding of the returned weights
    assert record["iterations"] == 1 and record["residual"] < 1e-6 < record["residual_init"]


@pytest.mark.parametrize("layout", ["gram", "gram_in_out"])
def test_gram_curvature_is_regmean(layout):
    base, thetas = models((5, 4) if layout == "gram" else (4, 5))   # nn.Linear out × in; Conv1D in × out
    grams = [psd(4, seed=30 + i) for i in range(3)]
    group = TensorGroup("w", base, thetas, {layout: grams})
    expect = get_method("regmean").merge(group, RegMeanParams(alpha=0.6, jitter=0.0), MergeContext(CTX_NAMES))
    got, record = mats(group, curvature="gram", alpha=0.6, damping=0.0, tolerance=1e-12)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    assert record["iterations"] == 1 and record["residual"] < 1e-6


def dense_kfac_solve(inputs, outputs, weights):
    """W (out × in) solving Σ (A_i ⊗ G_i) vec(W) = Σ (A_i ⊗ G_i) vec(W_i), vec stacking columns."""
    vec = lambda w: w.T.reshape(-1)  # noqa: E731
    m = sum(torch.kron(a, g) for a, g in zip(inputs, outputs))
    rhs = sum(torch.kron(a, g) @ vec(w) for a, g, w in zip(inputs, outputs, weights))
    out_dim, in_dim = weights[0].shape
    return torch.linalg.solve(m, rhs).reshape(in_dim, out_dim).T, m, rhs


@pytest.mark.parametrize("layout", ["kfac", "kfac_in_out"])
def test_kfac_conjugate_gradient_reaches_the_dense_kronecker_solve(layout):
    out_dim, in_dim = 5, 4
    base, thetas = models((out_dim, in_dim) if layout == "kfac" else (in_dim, out_dim))
    a = [psd(in_dim, seed=40 + i).double() for i in range(3)]
    g = [psd(out_dim, seed=50 + i).double() for i in range(3)]
    weights = [(t if layout == "kfac" else t.T).double() for t in thetas]
    expect, m, rhs = dense_kfac_solve(a, g, weights)
    suffix = "" if layout == "kfac" else "_in_out"
    group = TensorGroup("w", base, thetas, {"kfac_a" + suffix: [x.float() for x in a],
                                            "kfac_g" + suffix: [x.float() for x in g]})
    got, record = mats(group, curvature="kfac", damping=0.0, iterations=200, tolerance=1e-13)
    got = got if layout == "kfac" else got.T
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)
    assert record["residual"] < 1e-6

    # a few iterations: the recorded residual is the dense one at the returned weights
    with pytest.warns(MatsResidualWarning, match="after 3 steps"):
        few, record = mats(group, curvature="kfac", damping=0.0, iterations=3)
    few = (few if layout == "kfac" else few.T).double()
    dense = float((rhs - m @ few.T.reshape(-1)).norm() / rhs.norm())
    assert record["iterations"] == 3 and record["residual"] == pytest.approx(dense, rel=1e-3)
    assert record["residual"] < record["residual_init"]


def test_zero_iterations_return_the_initial_merge_and_damping_is_relative():
    base, thetas = models((5, 4))
    stats = {"kfac_a": [psd(4, seed=60 + i) for i in range(3)], "kfac_g": [psd(5, seed=70 + i) for i in range(3)]}
    group = TensorGroup("w", base, thetas, stats)
    with pytest.warns(MatsResidualWarning, match="after 0 steps"):
        got, record = mats(group, curvature="kfac", iterations=0, init_params={"lambda": 0.5})
    torch.testing.assert_close(got, base + 0.5 * sum(t - base for t in thetas))
    assert record["iterations"] == 0 and record["residual"] == record["residual_init"]
    # damping δ: A + δ·mean(diag A)·I, so scaling every factor by 1000 leaves the merge unchanged
    scaled = TensorGroup("w", base, thetas, {k: [1000 * x for x in v] for k, v in stats.items()})
    one, _ = mats(group, curvature="kfac", damping=0.1, iterations=200, tolerance=1e-13)
    other, _ = mats(scaled, curvature="kfac", damping=0.1, iterations=200, tolerance=1e-13)
    torch.testing.assert_close(one, other, rtol=1e-5, atol=1e-6)


def test_tensors_without_curvature_fall_back():
    base, thetas = models((6,))
    plain = TensorGroup("bias", base, thetas)
    got, record = mats(plain, curvature="kfac", init_params={"lambda": 0.4})
    torch.testing.assert_close(got, base + 0.4 * sum(t - base for t in thetas))  # the init merge
    assert record is None
    # with Fishers: the damped diagonal system, with the K-FAC default δ = 1e-2 of each Fisher's mean
    fishers = [randn(6, seed=80 + i).abs() + 0.01 for i in range(3)]
    fishers[0][:2] = 0.0  # coordinates only the other models' curvature reaches
    with_fisher = TensorGroup("bias", base, thetas, {"fisher": fishers})
    damped = [f.double() + 1e-2 * f.double().mean() for f in fishers]
    expect = sum(f * t.double() for f, t in zip(damped, thetas)) / sum(damped)
    got, record = mats(with_fisher, curvature="kfac")
    torch.testing.assert_close(got.double(), expect, rtol=1e-6, atol=1e-7)
    assert record["curvature"] == "diagonal" and record["iterations"] == 1 and record["residual"] < 1e-6
    expect = get_method("fisher").merge(with_fisher, FisherParams(), MergeContext(CTX_NAMES, summaries={
        "fisher_mean": [float(f.mean()) for f in fishers]}))
    got, _ = mats(with_fisher, curvature="kfac", fallback="fisher", fallback_params={"floor": 0.0})
    torch.testing.assert_close(got, expect)
    got, _ = mats(plain, curvature="gram", fallback="simple_average")
    torch.testing.assert_close(got, sum(thetas) / 3)


def few_example_factor(n: int, rows: int, seed: int) -> torch.Tensor:
    """A second-moment matrix of `rows` < n examples, accumulated in fp32 as kfac step 1 stored it:
    rank-deficient, with rounding-level negative eigenvalues."""
    x = randn(rows, n, seed=seed) * torch.logspace(0, -2, n)
    return (x.T @ x) / rows


def damped_dense(k: torch.Tensor, delta: float) -> torch.Tensor:
    k = k.double()
    return k + delta * k.diagonal().mean() * torch.eye(k.shape[0], dtype=torch.float64)


def true_residual(inputs, outputs, weights, merged) -> float:
    """‖Σ (A_i ⊗ G_i) vec(θ − θ_i)‖ / ‖Σ (A_i ⊗ G_i) vec(θ_i)‖ on the dense matrices."""
    vec = lambda w: w.T.reshape(-1)  # noqa: E731
    difference = sum(torch.kron(a, g) @ vec(merged - w) for a, g, w in zip(inputs, outputs, weights))
    return float(difference.norm() / sum(torch.kron(a, g) @ vec(w) for a, g, w in zip(inputs, outputs, weights)).norm())


def rank_deficient_group(out_dim=6, in_dim=10, rows=3):
    base, thetas = models((out_dim, in_dim), seed=90)
    a = [few_example_factor(in_dim, rows, seed=100 + i) for i in range(3)]
    g = [few_example_factor(out_dim, rows - 1, seed=110 + i) for i in range(3)]
    return TensorGroup("layer.weight", base, thetas, {"kfac_a": a, "kfac_g": g}), a, g


def test_kfac_defaults_reach_the_dense_solve_on_rank_deficient_factors():
    group, a, g = rank_deficient_group()
    assert min(float(torch.linalg.eigvalsh(k.double()).min()) for k in a + g) < 1e-12  # rank-deficient
    got, record = mats(group)  # every parameter at its default
    inputs, outputs = [damped_dense(k, 1e-2) for k in a], [damped_dense(k, 1e-2) for k in g]  # default δ = 1e-2
    weights = [t.double() for t in group.models]
    expect, _, _ = dense_kfac_solve(inputs, outputs, weights)
    assert float((got.double() - expect).norm() / expect.norm()) <= 1e-3
    assert record["curvature"] == "kfac" and record["iterations"] > 1  # three models, no shared factor: CG
    # the recorded residual is the true one, at the weights returned
    assert record["residual"] == pytest.approx(true_residual(inputs, outputs, weights, got.double()), rel=1e-6)
    assert record["residual"] < 1e-6


def test_one_model_or_a_shared_factor_is_solved_exactly_at_once():
    group, a, g = rank_deficient_group()
    shared = TensorGroup("layer.weight", group.base, group.models, {"kfac_a": a, "kfac_g": [g[0]] * 3})
    got, record = mats(shared, damping=1e-4, init="simple_average")
    inputs, outputs = [damped_dense(k, 1e-4) for k in a], [damped_dense(g[0], 1e-4)] * 3
    expect, _, _ = dense_kfac_solve(inputs, outputs, [t.double() for t in group.models])
    assert record["iterations"] == 1
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


def test_an_unconverged_solve_warns_with_its_true_residual_and_the_fix():
    group, a, g = rank_deficient_group()
    with pytest.warns(MatsResidualWarning) as caught:
        got, record = mats(group, iterations=2, damping=1e-5)
    message = str(caught[0].message)
    assert "tensor 'layer.weight'" in message and f"{record['residual']:.3g}" in message
    assert "Raise 'iterations' (now 2) or 'damping' (now 1e-05" in message and "max_residual" in message
    inputs, outputs = [damped_dense(k, 1e-5) for k in a], [damped_dense(k, 1e-5) for k in g]
    assert record["residual"] == pytest.approx(
        true_residual(inputs, outputs, [t.double() for t in group.models], got.double()), rel=1e-6)
    assert record["iterations"] == 2 and record["residual"] > 1e-6


def test_cg_returns_the_iterate_with_the_smallest_true_residual():
    q, _ = torch.linalg.qr(randn(30, 30, seed=120).double())
    m = (q * torch.logspace(0, 3, 30, dtype=torch.float64)) @ q.T  # SPD, condition number 1e3
    b = randn(30, seed=121).double()
    x, r = torch.zeros(30, dtype=torch.float64), b.clone()
    iterates, p = [x], r.clone()
    for _ in range(12):  # textbook CG, no preconditioner
        step = float(r @ r) / float(p @ m @ p)
        x = x + step * p
        r_next = r - step * (m @ p)
        p = r_next + float(r_next @ r_next) / float(r @ r) * p
        r = r_next
        iterates.append(x)
    residuals = [float((b - m @ it).norm() / b.norm()) for it in iterates]
    # CG's residual is not monotone: stop where the last iterate is not the best
    steps = next(k for k in range(1, 13) if residuals[k] > min(residuals[:k]) and min(residuals[:k]) < 1)
    system = System(lambda v: m @ v, lambda v: v, b, lambda v: v, lambda v: v)
    got, record = preconditioned_cg(system, torch.zeros(30, dtype=torch.float64), steps, 0.0, check_every=1)
    best = min(range(steps + 1), key=residuals.__getitem__)
    assert 0 < best < steps
    torch.testing.assert_close(got, iterates[best])
    assert record["residual"] == pytest.approx(residuals[best]) and record["iterations"] == steps


def test_a_solution_beyond_the_dtype_is_refused(monkeypatch):
    import fmerge.methods.mats as mats_module

    group, _, _ = rank_deficient_group()
    solve = mats_module.preconditioned_cg

    def overflowing(*args):  # a float64 solution that fp32 cannot hold
        x, record = solve(*args)
        return x * 1e300, record

    monkeypatch.setattr(mats_module, "preconditioned_cg", overflowing)
    with pytest.raises(FmergeError, match="Tensor 'layer.weight': MaTS' solution holds NaN or Inf"):
        mats(group)


def test_factors_that_are_not_positive_semi_definite_are_projected():
    k = torch.tensor([[2.0, 0.0], [0.0, -1e-3]])  # an fp32 factor with a negative eigenvalue
    damped, clipped = damped_factor(k, 1e-6, 1.0)
    assert clipped
    torch.testing.assert_close(damped, torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64)) + 1e-6 * 0.9995 * torch.eye(2, dtype=torch.float64))
    damped, clipped = damped_factor(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), 0.5, 0.5)  # positive definite
    assert not clipped
    torch.testing.assert_close(damped, torch.tensor([[3.0, 0.5], [0.5, 3.0]], dtype=torch.float64))


def test_user_errors_are_clear():
    method = get_method("mats")
    ctx = MergeContext(CTX_NAMES)
    with pytest.raises(FmergeError, match="'init' cannot be 'mats'"):
        method.validate(MatsParams(init="mats"), ctx)
    with pytest.raises(FmergeError, match="unknown merge method 'tas'"):
        method.validate(MatsParams(fallback="tas"), ctx)
    with pytest.raises(FmergeError, match="'init_params' is not valid for method 'task_arithmetic'"):
        method.validate(MatsParams(init_params={"lamda": 0.3}), ctx)
    with pytest.raises(FmergeError, match="fallback_params"):
        method.validate(MatsParams(fallback_params={"lambda": 0.3}), ctx)
    assert method.stats_needed(MatsParams(curvature="kfac", init="regmean")) == ("kfac", "gram")
    base, thetas = models((5, 4))
    bad = TensorGroup("w", base, thetas, {"kfac_a": [psd(3, seed=1)] * 3, "kfac_g": [psd(5, seed=2)] * 3})
    with pytest.raises(FmergeError, match="input factor is \\[3, 3\\] but the weight has 4 inputs"):
        mats(bad, curvature="kfac")
    negative = TensorGroup("w", base, thetas, {"fisher": [torch.full((5, 4), -1.0)] * 3})
    with pytest.raises(FmergeError, match="Tensor 'w': a diagonal Fisher has negative entries"):
        mats(negative, curvature="diagonal")
