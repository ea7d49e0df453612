"""AdaMerging against plain references: the coefficients' gradient equals autograd through the
merge, Adam lowers the loss under each constraint, and the step stores coefficients that rebuild
its weights by the plain formula θ_0 + Σ Λ τ."""

from __future__ import annotations

import pytest
import torch

from _iterative_project import HEADER, build, run
from fmerge.methods.adamerging import adamerging, coefficient_gradient, merge_body

NAMES = ["w1", "w2"]
SHAPES = {"w1": (4, 3), "w2": (6,)}


def body(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(SHAPES[n], generator=g) for n in NAMES}


def quadratic(target):
    def fn(x, draw, tasks):
        return (0.5 * sum(float((x[n] - target[n]).pow(2).sum()) for n in NAMES),
                {n: x[n] - target[n] for n in NAMES})
    return fn


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_coefficient_gradient_equals_autograd_through_the_merge(granularity):
    base, target = body(0), body(1)
    vectors = [body(10 + i) for i in range(3)]
    coeffs = torch.rand(3 if granularity == "task" else (3, 2), generator=torch.Generator().manual_seed(5))
    leaf = coeffs.clone().requires_grad_(True)
    merged = {}
    for j, n in enumerate(NAMES):  # the plain formula, differentiable in Λ
        merged[n] = base[n] + sum((leaf[i] if granularity == "task" else leaf[i, j]) * vectors[i][n] for i in range(3))
    loss = 0.5 * sum((merged[n] - target[n]).pow(2).sum() for n in NAMES)
    (expected,) = torch.autograd.grad(loss, leaf)
    x = merge_body(base, vectors, coeffs, NAMES)
    _, grad = quadratic(target)(x, 0, ["t"])
    torch.testing.assert_close(coefficient_gradient(grad, vectors, NAMES, granularity), expected, rtol=1e-5, atol=1e-6)


def test_each_trace_row_describes_the_coefficients_before_its_step():
    base, target = body(0), body(1)
    vectors = [body(10 + i) for i in range(3)]
    seen = []

    def recording(x, draw, tasks):
        seen.append({n: x[n].clone() for n in NAMES})
        return quadratic(target)(x, draw, tasks)

    result = adamerging(base, vectors, recording, names=NAMES, tasks=["t"], granularity="task", steps=4, lr=0.1,
                        init=0.3)
    flat = lambda b: torch.cat([b[n].reshape(-1) for n in NAMES])  # noqa: E731
    basis = torch.stack([flat(v) for v in vectors], dim=1).double()
    for row, x in zip(result.trace, seen):  # Λ_s recovered from the body the loss was measured at
        coefficients = torch.linalg.lstsq(basis, (flat(x) - flat(base)).double()[:, None]).solution[:, 0]
        assert row["coef_mean"] == pytest.approx(float(coefficients.mean()), abs=1e-6)
        assert row["loss"] == pytest.approx(quadratic(target)(x, 0, ["t"])[0])
    assert result.trace[0]["coef_mean"] == pytest.approx(0.3)
    assert float(result.coefficients.mean()) != pytest.approx(result.trace[-1]["coef_mean"], abs=1e-6)


@pytest.mark.parametrize("granularity,clamp,simplex", [("task", False, False), ("layer", True, False), ("layer", False, True)])
def test_adam_lowers_the_loss_within_the_constraints(granularity, clamp, simplex):
    base, target = body(0), body(1)
    vectors = [body(10 + i) for i in range(3)]
    result = adamerging(base, vectors, quadratic(target), names=NAMES, tasks=["t"], granularity=granularity,
                        steps=40, lr=0.05, init=0.3, clamp=clamp, simplex=simplex)
    losses = [r["loss"] for r in result.trace]
    assert losses[-1] < losses[0] - 1e-3
    c = result.coefficients
    if clamp:
        assert c.min() >= 0 and c.max() <= 1
    if simplex:
        assert c.min() >= 0
        torch.testing.assert_close(c.sum(0), torch.ones(c.shape[1]))
    for n, t in merge_body(base, vectors, c, NAMES).items():
        torch.testing.assert_close(result.body[n], t)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ada"))


def test_step_learns_stores_coefficients_and_records_the_split(project):
    recipe = project / "ada.yaml"
    recipe.write_text(HEADER + """
  ada:
    kind: adamerging
    steps: 12
    lr: 0.05
    batch_size: 8
    examples: 8
    max_length: 16
  eval: {kind: eval, merges: [ada], limit: 8, max_length: 16, individual: false, base: false}
""")
    rt, states, _ = run(recipe)
    assert states == {"ada": "computed", "eval": "computed"}
    art = rt.store.open(rt.planned["ada"][0].key)
    meta = art.meta
    assert meta["adaptation_splits"] == {"sentiment": "validation", "animal": "validation", "color": "validation"}
    assert art.attrs["params"]["splits"] == list(meta["adaptation_splits"].values())  # by position: no name in a key
    losses = [r["loss"] for r in meta["trace"]]
    assert len(losses) == 12 and losses[-1] < losses[0]   # the same 8 examples every step
    coeffs = art.get("coefficients")
    assert coeffs.shape == (3, len(meta["tensors"])) and coeffs.min() >= 0 and coeffs.max() <= 1
    base = rt.source("__base__")
    name = "encoder.layer.1.output.dense.weight"
    j = meta["tensors"].index(name)
    expect = base.get(name) + sum(coeffs[i, j] * (rt.source(m).get("bert." + name) - base.get(name))
                                  for i, m in enumerate(meta["models"]))
    torch.testing.assert_close(art.view("weights/").get(name), expect, rtol=1e-5, atol=1e-6)
    assert {r["variant"] for r in rt.results["eval"]} == {"ada"}
    # the task vectors were read from their cached artifacts, computed first as the step's deps
    deps = [d for d in rt.planned["ada"][0].deps if d.kind == "task_vectors"]
    assert [d.label for d in deps] == meta["models"] and all(rt.store.has(d.key) for d in deps)
    tau = rt.store.open(deps[0].key).view("tau/").get(name)
    torch.testing.assert_close(tau, rt.source(meta["models"][0]).get("bert." + name) - base.get(name))
    _, states, _ = run(recipe)
    assert states == {"ada": "cached", "eval": "cached"}
