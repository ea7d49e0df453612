"""Merge methods against plainly written references.

References loop over coordinates with Python floats and never call the methods' helpers. Test
tensors are built from small dyadic values (k/2, k/4) so that fp32 sums are exact: magnitude ties,
zero task-vector entries and exactly-zero sign sums occur on purpose, and the reference and the
method must agree on them bit for bit (up to the final division).
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from fmerge.errors import FmergeError
from fmerge.methods import REGISTRY, MergeContext, TensorGroup, get_method
from fmerge.methods.base import tensor_seed

NAMES = ["cola", "sst2", "mrpc"]
ALL_METHODS = ["simple_average", "weighted_average", "task_arithmetic", "ties", "dare", "fisher"]


# ----------------------------------------------------------------------------- helpers

def ctx(names=NAMES, **summaries) -> MergeContext:
    return MergeContext(model_names=list(names), summaries=dict(summaries))


def dyadic(shape, low, high, scale, gen) -> torch.Tensor:
    """Integers in [low, high) divided by `scale`: exactly representable, with many ties."""
    return torch.randint(low, high, shape, generator=gen).float() / scale


def make_group(name="w", shape=(4, 5), n=3, seed=0, zero_frac=0.0) -> TensorGroup:
    gen = torch.Generator().manual_seed(seed)
    base = dyadic(shape, -8, 8, 4, gen)
    taus = [dyadic(shape, -6, 7, 2, gen) for _ in range(n)]
    if zero_frac:
        taus = [t * (torch.rand(shape, generator=gen) >= zero_frac) for t in taus]
    return TensorGroup(name=name, base=base, models=[base + t for t in taus])


def run(method_name, group, names=NAMES, state=None, context=None, **params):
    method = get_method(method_name)
    p = method.Params(**params)
    c = context or ctx(names)
    method.validate(p, c)
    return method.merge(group, p, c, state)


def flat(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.flatten().tolist()]


def close(actual: torch.Tensor, expected: list[float], tol=1e-6) -> None:
    got = flat(actual)
    assert len(got) == len(expected)
    for j, (a, e) in enumerate(zip(got, expected)):
        assert math.isclose(a, e, rel_tol=tol, abs_tol=tol), f"coordinate {j}: {a} != {e}"


def ref_lambdas(lam) -> list[float]:
    """A per-model parameter as a list in NAMES order."""
    if isinstance(lam, dict):
        return [lam[n] for n in NAMES]
    return lam if isinstance(lam, list) else [lam] * len(NAMES)


def ref_sign(x: float) -> int:
    return (x > 0) - (x < 0)


def ref_trim(values: list[float], density: float) -> list[float]:
    """Keep exactly k = ⌈density·n⌉ entries: largest magnitude first, equal magnitudes by lowest index."""
    k = math.ceil(round(density * len(values), 9))
    kept = set(sorted(range(len(values)), key=lambda j: (-abs(values[j]), j))[:k])
    return [v if j in kept else 0.0 for j, v in enumerate(values)]


def ref_ties_coordinate(entries: list[float], merge: str) -> float:
    """Elect the sign of the sum; combine the entries with that (non-zero) sign."""
    elected = ref_sign(sum(entries))
    agreeing = [e for e in entries if e != 0 and ref_sign(e) == elected]
    if elected == 0 or not agreeing:
        return 0.0
    return sum(agreeing) / len(agreeing) if merge == "mean" else sum(agreeing)


def ref_ties(base: list[float], trimmed: list[list[float]], lambdas, merge) -> list[float]:
    out = []
    for j, b in enumerate(base):
        entries = [lam * t[j] for lam, t in zip(lambdas, trimmed)]
        out.append(b + ref_ties_coordinate(entries, merge))
    return out


def task_vectors(group) -> list[list[float]]:
    base = flat(group.base)
    return [[x - b for x, b in zip(flat(m), base)] for m in group.models]


# ----------------------------------------------------------------------------- registry & params

def test_every_method_is_registered_with_documented_params():
    assert set(ALL_METHODS) <= set(REGISTRY)
    for name in ALL_METHODS:
        method = REGISTRY[name]
        assert method.name == name and method.version >= 1
        assert method.description and "\n" not in method.description
        for field_name, field in method.Params.model_fields.items():
            assert field.description, f"{name}.{field_name} has no description"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_unknown_param_key_is_rejected(name):
    required = {"p": 0.5} if name == "dare" else {}
    with pytest.raises(ValidationError):
        get_method(name).Params(**required, **{"lamda": 0.5})


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare", "fisher"])
def test_lambda_alias_and_python_name(name):
    required = {"p": 0.5} if name == "dare" else {}
    Params = get_method(name).Params
    assert Params(**required, **{"lambda": 0.7}).lambda_ == 0.7
    assert Params(**required, lambda_=0.7).lambda_ == 0.7


@pytest.mark.parametrize(
    "name, params",
    [
        ("ties", {"density": 0}),
        ("ties", {"density": 1.5}),
        ("ties", {"density": float("nan")}),
        ("ties", {"merge": "median"}),
        ("ties", {"trim": "layer"}),
        ("dare", {"p": 1}),
        ("dare", {"p": 1.2}),
        ("dare", {"p": -0.1}),
        ("dare", {}),  # p is required: there is no neutral default drop rate
        ("dare", {"p": 0.5, "density": 0}),
        ("dare", {"p": 0.5, "combine": "mean"}),
        ("fisher", {"floor": -1e-6}),
        ("fisher", {"floor": float("inf")}),
        ("weighted_average", {"weights": "heavy"}),
    ],
)
def test_out_of_range_params_are_rejected_at_parse(name, params):
    with pytest.raises(ValidationError):
        get_method(name).Params(**params)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("weighted_average", {"weights": [1.0, -1.0, 0.0]}, "sums to 0"),
        ("weighted_average", {"weights": 0.0, "normalize": False}, "0 for every model"),
        ("weighted_average", {"weights": [1.0, float("nan"), 1.0]}, "finite"),
        ("weighted_average", {"weights": [1.0, 2.0]}, "2 values but the merge has 3"),
        ("weighted_average", {"weights": {"cola": 1, "sst2": 1, "qnli": 1}}, "unknown model"),
        ("weighted_average", {"weights": {"cola": 1, "sst2": 1}}, "no value for model(s) mrpc"),
        ("task_arithmetic", {"lambda": 0.0}, "all λ are zero"),
        ("task_arithmetic", {"lambda": {"cola": 0, "sst2": 0, "mrpc": 0}}, "all λ are zero"),
        ("task_arithmetic", {"lambda": [0.3, float("inf"), 0.3]}, "finite"),
        ("ties", {"lambda": [1.0, 1.0]}, "2 values"),
        ("ties", {"lambda": 0}, "all λ are zero"),
        ("dare", {"p": 0.5, "density": 0.5}, "only apply with combine: ties"),
        ("dare", {"p": 0.5, "merge": "sum"}, "only apply with combine: ties"),
        ("dare", {"p": 0.5, "lambda": {"cola": 1.0, "sst": 1.0, "mrpc": 1.0}}, "unknown model"),
        ("fisher", {"fallback": "qnli"}, "neither 'average' nor a model"),
        ("fisher", {"lambda": [1.0, -0.5, 1.0]}, "must be ≥ 0"),
        ("fisher", {"normalize": True, "base_prior": True}, "cannot be combined"),
    ],
)
def test_validation_errors_name_the_problem(name, params, message):
    method = get_method(name)
    with pytest.raises(FmergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        method.validate(method.Params(**params), ctx(fisher_mean=[1.0, 1.0, 1.0]))


def test_weighted_average_zero_sum_is_legal_without_normalisation():
    method = get_method("weighted_average")
    method.validate(method.Params(weights=[1.0, -1.0, 0.0], normalize=False), ctx())


def test_fisher_checks_the_mean_fisher_once_it_is_known():
    method = get_method("fisher")
    method.validate(method.Params(normalize=True), ctx())  # at recipe load: no statistics yet
    with pytest.raises(FmergeError, match="Fisher of 0 everywhere"):
        method.validate(method.Params(normalize=True), ctx(fisher_mean=[1.0, 0.0, 2.0]))
    with pytest.raises(FmergeError, match="invalid mean Fisher"):
        method.validate(method.Params(), ctx(fisher_mean=[1.0, float("nan"), 2.0]))
    method.validate(method.Params(floor=0), ctx(fisher_mean=[1.0, 0.0, 2.0]))


@pytest.mark.parametrize("params", [{}, {"floor": 0, "normalize": True}])
def test_fisher_floor_and_normalize_need_the_mean_fisher_to_merge(params):
    with pytest.raises(FmergeError, match="fisher_mean"):
        run("fisher", fisher_group(seed=1), **params)


def test_fisher_reports_what_it_needs_per_params():
    method = get_method("fisher")
    assert not method.base_needed(method.Params())
    assert method.stats_needed(method.Params()) == ("fisher",)
    prior = method.Params(base_prior=True)
    assert method.base_needed(prior)
    assert set(method.stats_needed(prior)) == {"fisher", "fisher_base"}


def test_fisher_merge_without_statistics_names_the_tensor():
    group = make_group(name="encoder.layer.0.weight")
    with pytest.raises(FmergeError, match="encoder.layer.0.weight"):
        run("fisher", group, floor=0)


# ----------------------------------------------------------------------------- averages

def test_simple_average_matches_mean():
    group = make_group()
    models = [flat(m) for m in group.models]
    expected = [sum(m[j] for m in models) / len(models) for j in range(len(models[0]))]
    close(run("simple_average", group), expected)
    assert not get_method("simple_average").needs_base


@pytest.mark.parametrize(
    "weights", [[1.0, 2.0, 0.5], {"mrpc": 0.5, "cola": 1.0, "sst2": 2.0}, [3.0, -1.0, 0.5]]
)
@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_average_matches_formula(weights, normalize):
    group = make_group()
    w = ref_lambdas(weights)
    models = [flat(m) for m in group.models]
    total = sum(w) if normalize else 1.0
    expected = [sum(wi * m[j] for wi, m in zip(w, models)) / total for j in range(len(models[0]))]
    close(run("weighted_average", group, weights=weights, normalize=normalize), expected)


def test_weighted_average_default_is_the_simple_average():
    group = make_group(seed=3)
    assert torch.allclose(run("weighted_average", group), run("simple_average", group))


# ----------------------------------------------------------------------------- task arithmetic

@pytest.mark.parametrize(
    "lam", [0.3, [0.5, -0.25, 1.5], {"sst2": -0.25, "mrpc": 1.5, "cola": 0.5}, [0.0, 1.0, 0.0]]
)
def test_task_arithmetic_matches_formula(lam):
    group = make_group()
    lambdas = ref_lambdas(lam)
    base = flat(group.base)
    taus = task_vectors(group)
    expected = [b + sum(l * t[j] for l, t in zip(lambdas, taus)) for j, b in enumerate(base)]
    close(run("task_arithmetic", group, **{"lambda": lam}), expected)


def test_task_arithmetic_default_lambda_is_fusionbench_0_3():
    group = make_group(seed=5)
    taus = task_vectors(group)
    expected = [b + 0.3 * sum(t[j] for t in taus) for j, b in enumerate(flat(group.base))]
    close(run("task_arithmetic", group), expected)


# ----------------------------------------------------------------------------- TIES

@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize(
    "lam", [1.0, 0.5, [1.5, 0.5, -1.0], {"cola": 2.0, "sst2": 0.0, "mrpc": 1.0}]
)
def test_ties_per_tensor_matches_coordinate_loop(density, merge, lam):
    group = make_group(seed=11, zero_frac=0.2)
    lambdas = ref_lambdas(lam)
    trimmed = [ref_trim(t, density) for t in task_vectors(group)]
    expected = ref_ties(flat(group.base), trimmed, lambdas, merge)
    got = run("ties", group, density=density, merge=merge, **{"lambda": lam})
    close(got, expected)
    assert got.shape == group.base.shape


def test_ties_data_really_exercises_ties_and_zero_sign_sums():
    """Guard against the dyadic test data silently losing the corner cases it exists for."""
    group = make_group(seed=11, zero_frac=0.2)
    taus = task_vectors(group)
    k = math.ceil(0.5 * len(taus[0]))
    at_least_kth = [sum(1 for v in tau if abs(v) >= sorted(map(abs, tau), reverse=True)[k - 1]) for tau in taus]
    assert any(count > k for count in at_least_kth), "no magnitude tie at the cut"
    trimmed = [ref_trim(t, 1.0) for t in taus]
    sums = [sum(t[j] for t in trimmed) for j in range(len(taus[0]))]
    assert any(s == 0 and any(t[j] != 0 for t in trimmed) for j, s in enumerate(sums))


def test_ties_small_worked_example():
    """Three coordinates worked by hand (density 1, λ 1).

    coordinate 0: τ = +2, −2 → sum 0, no elected sign → base value
    coordinate 1: τ = +1, +3 → both agree → mean 2, sum 4
    coordinate 2: τ = −4, +1 → elected −, only −4 agrees → −4
    """
    base = torch.tensor([10.0, 20.0, 30.0])
    group = TensorGroup("w", base, [base + torch.tensor([2.0, 1.0, -4.0]),
                                    base + torch.tensor([-2.0, 3.0, 1.0])])
    names = ["a", "b"]
    assert run("ties", group, names, density=1.0).tolist() == [10.0, 22.0, 26.0]
    assert run("ties", group, names, density=1.0, merge="sum").tolist() == [10.0, 24.0, 26.0]


def test_ties_keeps_exactly_k_lowest_index_first_among_ties_at_the_cut():
    base = torch.zeros(6)
    tau = torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, 0.5])
    group = TensorGroup("w", base, [base + tau])
    # k = ⌈0.4·6⌉ = 3: the 3rd largest magnitude is 2; of the three 2s the first two are kept.
    got = run("ties", group, ["a"], density=0.4)
    assert got.tolist() == [3.0, -2.0, 2.0, 0.0, 0.0, 0.0]
    # rule: mergekit: k = max(1, ⌊0.4·6⌋) = 2, no tie at that cut; + elected at a zero sum (none here)
    assert run("ties", group, ["a"], density=0.4, rule="mergekit").tolist() == [3.0, -2.0, 0.0, 0.0, 0.0, 0.0]


def test_ties_density_is_not_rounded_up_by_float_error():
    # 0.07 × 100 is 7.000000000000001 in floating point; k must still be 7.
    base = torch.zeros(100)
    tau = torch.arange(1.0, 101.0)
    got = run("ties", TensorGroup("w", base, [base + tau]), ["a"], density=0.07)
    assert int((got != 0).sum()) == 7


def make_model(seed, n=3):
    """Several tensors of one model, with different scales so a global cut differs per tensor."""
    groups = []
    tensors = [("a", (3, 4), 1), ("b", (5,), 4), ("c", (2, 3), 0.25)]
    for k, (name, shape, scale) in enumerate(tensors):
        g = make_group(name=name, shape=shape, n=n, seed=seed + k, zero_frac=0.1)
        g.models = [g.base + (m - g.base) * scale for m in g.models]
        groups.append(g)
    return groups


@pytest.mark.parametrize("density", [0.1, 0.3, 0.75])
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties_global_trim_matches_concatenated_reference(density, merge):
    groups = make_model(seed=21)
    method = get_method("ties")
    params = method.Params(
        density=density, merge=merge, trim="global", **{"lambda": [1.0, 0.5, 2.0]}
    )
    c = ctx()
    method.validate(params, c)
    assert method.needs_prepare(params)
    state = method.prepare(params, iter(groups), c)

    # Reference: concatenate each model's task vector over all tensors, trim once, split back.
    per_tensor = [task_vectors(g) for g in groups]
    expected_all = []
    for g, taus in zip(groups, per_tensor):
        trimmed = []
        for i in range(3):
            whole = ref_trim([v for tv in per_tensor for v in tv[i]], density)  # lowest index in model order
            start = sum(len(tv[i]) for tv in per_tensor[:groups.index(g)])
            trimmed.append(whole[start:start + len(taus[i])])
        expected_all.append(ref_ties(flat(g.base), trimmed, [1.0, 0.5, 2.0], merge))

    for g, expected in zip(groups, expected_all):
        close(method.merge(g, params, c, state), expected)
    # The global cut must differ from the per-tensor one on this data (else the test proves little).
    per_tensor_params = params.model_copy(update={"trim": "tensor"})
    assert any(
        not torch.equal(method.merge(g, params, c, state), method.merge(g, per_tensor_params, c))
        for g in groups
    )


def test_ties_global_trim_at_density_one_needs_no_prepare():
    method = get_method("ties")
    params = method.Params(density=1.0, trim="global")
    assert not method.needs_prepare(params)
    group = make_group(seed=2)
    assert torch.equal(method.merge(group, params, ctx()), run("ties", group, density=1.0))


# ----------------------------------------------------------------------------- DARE

def ref_dare_mask(seed, name, i, shape, p) -> list[bool]:
    """The documented mask: CPU generator seeded by tensor_seed, keep where rand ≥ p."""
    gen = torch.Generator().manual_seed(tensor_seed(seed, name, i))
    return [u >= p for u in torch.rand(shape, generator=gen).flatten().tolist()]


@pytest.mark.parametrize("lam", [1.0, [0.5, 1.0, -0.5], {"cola": 1.0, "sst2": 0.25, "mrpc": 0.5}])
def test_dare_task_arithmetic_matches_formula_with_the_documented_mask(lam):
    p, seed = 0.5, 7
    group = make_group(name="layer.0.weight", seed=4)
    lambdas = ref_lambdas(lam)
    taus = task_vectors(group)
    masks = [ref_dare_mask(seed, group.name, i, group.base.shape, p) for i in range(3)]
    expected = [
        b + sum(l * (t[j] / (1 - p) if m[j] else 0.0) for l, t, m in zip(lambdas, taus, masks))
        for j, b in enumerate(flat(group.base))
    ]
    close(run("dare", group, p=p, seed=seed, **{"lambda": lam}), expected)


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_dare_ties_matches_coordinate_loop(density, merge):
    p, seed = 0.25, 3
    group = make_group(name="layer.1.bias", shape=(6, 5), seed=8)
    lambdas = [1.0, 0.5, 2.0]
    dropped = []
    for i, tau in enumerate(task_vectors(group)):
        mask = ref_dare_mask(seed, group.name, i, (6, 5), p)
        dropped.append([t / (1 - p) if keep else 0.0 for t, keep in zip(tau, mask)])
    expected = ref_ties(flat(group.base), [ref_trim(d, density) for d in dropped], lambdas, merge)
    got = run("dare", group, p=p, seed=seed, combine="ties", density=density, merge=merge,
              **{"lambda": lambdas})
    close(got, expected, tol=1e-5)


def test_dare_is_reproducible_and_seed_dependent():
    group = make_group(name="w", shape=(20, 20), seed=1)
    first = run("dare", group, p=0.5, seed=1)
    assert torch.equal(first, run("dare", group, p=0.5, seed=1))
    assert not torch.equal(first, run("dare", group, p=0.5, seed=2))


def test_dare_masks_do_not_depend_on_tensor_order_but_on_tensor_name():
    a = make_group(name="a", shape=(10, 10), seed=1)
    b = make_group(name="b", shape=(10, 10), seed=1)  # same values, other name
    forward = [run("dare", g, p=0.5) for g in (a, b)]
    backward = [run("dare", g, p=0.5) for g in (b, a)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))
    assert not torch.equal(forward[0], forward[1])


def test_dare_drop_fraction_and_unbiasedness_on_a_big_tensor():
    p, n = 0.3, 200_000
    base = torch.zeros(n)
    group = TensorGroup("big", base, [base + 1.0])  # τ = 1 everywhere
    delta = run("dare", group, ["a"], p=p)
    dropped = float((delta == 0).float().mean())
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma
    assert torch.all((delta == 0) | torch.isclose(delta, torch.tensor(1 / (1 - p))))
    assert abs(float(delta.mean()) - 1.0) < 5 * sigma / (1 - p)  # rescaling keeps E[τ]


def test_dare_with_no_drop_is_task_arithmetic():
    group = make_group(seed=6)
    lam = [0.5, 1.0, 0.25]
    assert torch.allclose(
        run("dare", group, p=0.0, **{"lambda": lam}),
        run("task_arithmetic", group, **{"lambda": lam}),
    )


# ----------------------------------------------------------------------------- Fisher

def fisher_group(seed=0, shape=(4, 6), zero_columns=(), base_fisher=False) -> TensorGroup:
    group = make_group(seed=seed, shape=shape)
    gen = torch.Generator().manual_seed(seed + 100)
    fishers = []
    for i in range(len(group.models)):
        f = torch.rand(shape, generator=gen) * 10 ** (i - 1)  # scales 0.1, 1, 10
        f[f < 0.02] = 0.0  # some exact zeros per model
        for c in zero_columns:
            f[:, c] = 0.0
        fishers.append(f)
    group.stats["fisher"] = fishers
    if base_fisher:
        f0 = torch.rand(shape, generator=gen)
        for c in zero_columns:
            f0[:, c] = 0.0
        group.stats["fisher_base"] = [f0]
    return group


def ref_fisher(group, lambdas, floor, means, normalize, fallback, base_prior) -> list[float]:
    thetas = [flat(m) for m in group.models]
    base = flat(group.base)
    fishers = [flat(f) for f in group.stats["fisher"]]
    prior = flat(group.stats["fisher_base"][0]) if base_prior else [0.0] * len(base)
    out = []
    for j in range(len(base)):
        weights = []
        for i in range(len(thetas)):
            f = fishers[i][j]
            if floor > 0:
                f = max(f, floor * means[i])
            if normalize:
                f = f / means[i]
            weights.append(lambdas[i] * f)
        if base_prior:
            num = sum(w * (t[j] - base[j]) for w, t in zip(weights, thetas))
            den = sum(weights) + prior[j]
        else:
            num = sum(w * t[j] for w, t in zip(weights, thetas))
            den = sum(weights)
        if den > 0:
            out.append(base[j] + num / den if base_prior else num / den)
        elif fallback == "average":
            out.append(sum(l * t[j] for l, t in zip(lambdas, thetas)) / sum(lambdas))
        else:
            out.append(thetas[NAMES.index(fallback)][j])
    return out


def fisher_means(group) -> list[float]:
    return [float(f.double().mean()) for f in group.stats["fisher"]]


@pytest.mark.parametrize(
    "params",
    [
        {"floor": 0},
        {"floor": 0, "lambda": [1.0, 0.5, 2.0]},
        {"floor": 0, "lambda": {"cola": 0.0, "sst2": 1.0, "mrpc": 3.0}},
        {"floor": 0.3},
        {"floor": 0.05, "normalize": True},
        {"floor": 0, "normalize": True, "lambda": [2.0, 1.0, 1.0]},
    ],
)
def test_fisher_matches_formula(params):
    group = fisher_group(seed=1)
    means = fisher_means(group)
    lambdas = ref_lambdas(params.get("lambda", 1.0))
    expected = ref_fisher(group, lambdas, params.get("floor", 1e-6), means,
                          params.get("normalize", False), "average", False)
    got = run("fisher", group, context=ctx(fisher_mean=means), **params)
    close(got, expected, tol=1e-5)


def test_fisher_floor_changes_the_result_only_where_fisher_is_small():
    group = fisher_group(seed=2)
    means = fisher_means(group)
    c = ctx(fisher_mean=means)
    no_floor = run("fisher", group, context=c, floor=0)
    floored = run("fisher", group, context=c, floor=0.5)
    small_somewhere = torch.zeros_like(group.base, dtype=torch.bool)
    for f, m in zip(group.stats["fisher"], means):
        small_somewhere |= f < 0.5 * m
    assert torch.equal(no_floor[~small_somewhere], floored[~small_somewhere])
    assert not torch.allclose(no_floor[small_somewhere], floored[small_somewhere])


@pytest.mark.parametrize("fallback", ["average", "sst2"])
@pytest.mark.parametrize("lam", [1.0, [1.0, 0.5, 2.0]])
def test_fisher_all_zero_coordinates_take_the_explicit_fallback(fallback, lam):
    group = fisher_group(seed=3, zero_columns=(0, 4))
    lambdas = ref_lambdas(lam)
    expected = ref_fisher(group, lambdas, 0, None, False, fallback, False)
    got = run("fisher", group, floor=0, fallback=fallback, **{"lambda": lam})
    close(got, expected, tol=1e-5)
    assert torch.isfinite(got).all()
    if fallback == "sst2":
        assert torch.equal(got[:, 0], group.models[1][:, 0])


def test_fisher_floor_rescues_all_zero_coordinates():
    group = fisher_group(seed=3, zero_columns=(2,))
    means = fisher_means(group)
    got = run("fisher", group, context=ctx(fisher_mean=means), floor=1e-3, fallback="cola")
    # The floor makes every weight positive, so the column is floor-weighted, not model cola's.
    floors = [1e-3 * m for m in means]
    expected_col = []
    for r in range(4):
        weighted = sum(f * float(t[r, 2]) for f, t in zip(floors, group.models))
        expected_col.append(weighted / sum(floors))
    close(got[:, 2], expected_col, tol=1e-5)


def test_fisher_normalize_makes_the_merge_invariant_to_each_models_fisher_scale():
    group = fisher_group(seed=4)
    scaled = fisher_group(seed=4)
    scaled.stats["fisher"][0] = scaled.stats["fisher"][0] * 1000.0
    for normalize, should_match in [(True, True), (False, False)]:
        a = run("fisher", group, context=ctx(fisher_mean=fisher_means(group)),
                floor=0.01, normalize=normalize)
        b = run("fisher", scaled, context=ctx(fisher_mean=fisher_means(scaled)),
                floor=0.01, normalize=normalize)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6) == should_match


@pytest.mark.parametrize("lam", [1.0, [0.5, 1.0, 2.0]])
def test_fisher_base_prior_matches_daheim_formula(lam):
    group = fisher_group(seed=5, zero_columns=(1,), base_fisher=True)
    lambdas = ref_lambdas(lam)
    expected = ref_fisher(group, lambdas, 0, None, False, "average", True)
    got = run("fisher", group, floor=0, base_prior=True, **{"lambda": lam})
    close(got, expected, tol=1e-5)


def test_fisher_base_prior_with_zero_prior_is_plain_fisher_merging():
    group = fisher_group(seed=6, base_fisher=True)
    group.stats["fisher_base"] = [torch.zeros_like(group.base)]
    assert torch.allclose(
        run("fisher", group, floor=0, base_prior=True), run("fisher", group, floor=0),
        rtol=1e-5, atol=1e-5,
    )


def test_fisher_base_prior_without_base_fisher_names_the_tensor():
    group = fisher_group(seed=6)
    with pytest.raises(FmergeError, match="base_prior"):
        run("fisher", group, floor=0, base_prior=True)


# ----------------------------------------------------------------------------- all methods

def method_cases():
    return [
        ("simple_average", {}),
        ("weighted_average", {"weights": [1.0, 2.0, 3.0]}),
        ("task_arithmetic", {"lambda": [0.3, 0.5, 0.7]}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.6, "merge": "sum", "lambda": [1.0, 0.5, 2.0]}),
        ("dare", {"p": 0.4}),
        ("dare", {"p": 0.4, "combine": "ties", "density": 0.5}),
        ("fisher", {"floor": 1e-3, "normalize": True}),
        ("fisher", {"floor": 0, "base_prior": True}),
    ]


@pytest.mark.parametrize("name, params", method_cases())
def test_methods_leave_their_inputs_untouched(name, params):
    group = fisher_group(seed=9, zero_columns=(3,), base_fisher=True)
    before = [group.base.clone(), *[m.clone() for m in group.models]]
    stats_before = {k: [t.clone() for t in v] for k, v in group.stats.items()}
    out = run(name, group, context=ctx(fisher_mean=fisher_means(group)), **params)
    assert out.dtype == torch.float32 and out.shape == group.base.shape
    assert all(torch.equal(x, y) for x, y in zip(before, [group.base, *group.models]))
    for key, tensors in stats_before.items():
        assert all(torch.equal(x, y) for x, y in zip(tensors, group.stats[key]))
    assert all(out.data_ptr() != t.data_ptr() for t in [group.base, *group.models])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, params", method_cases())
def test_methods_give_the_same_result_on_cuda(name, params):
    group = fisher_group(seed=10, zero_columns=(3,), base_fisher=True)
    cuda = TensorGroup(
        group.name, group.base.cuda(), [m.cuda() for m in group.models],
        {k: [t.cuda() for t in v] for k, v in group.stats.items()},
    )
    c = ctx(fisher_mean=fisher_means(group))
    on_cpu = run(name, group, context=c, **params)
    on_gpu = run(name, cuda, context=c, **params)
    assert on_gpu.is_cuda
    assert torch.allclose(on_cpu, on_gpu.cpu(), rtol=1e-5, atol=1e-6)


def whole_tensor_fisher(group, lambdas, floor, means, normalize, fallback, base_prior) -> torch.Tensor:
    """Fisher merging in whole-tensor float32 operations, in the order of the formula: the bits the
    blocked merge must reproduce on tensors of many blocks."""
    values = [t - group.base for t in group.models] if base_prior else group.models
    numerator = denominator = None
    for i, (lam, fisher, value) in enumerate(zip(lambdas, group.stats["fisher"], values)):
        weight = fisher.clamp_min(floor * means[i]) if floor > 0 else fisher
        weight = weight / means[i] if normalize else weight
        weight = weight * lam
        if numerator is None:
            numerator = weight * value
            denominator = group.stats["fisher_base"][0] + weight if base_prior else weight
        else:
            numerator = torch.addcmul(numerator, weight, value)
            denominator = denominator + weight
    merged = numerator / denominator
    if fallback == "average":
        average = torch.zeros_like(values[0])
        for lam, value in zip(lambdas, values):
            average = torch.add(average, value, alpha=lam)
        average = average / sum(lambdas)
    else:
        average = values[NAMES.index(fallback)]
    merged = torch.where(denominator == 0, average, merged)
    return merged + group.base if base_prior else merged


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"floor": 0, "lambda": [1.0, 0.0, 2.5], "fallback": "sst2"},
        {"floor": 0, "fallback": "average"},
        {"floor": 0.05, "normalize": True, "lambda": [0.5, 1.0, 3.0]},
        {"floor": 0, "normalize": True},
        {"floor": 0, "base_prior": True, "lambda": [0.5, 1.0, 2.0]},
    ],
)
def test_fisher_on_tensors_of_many_blocks_has_the_bits_of_whole_tensor_operations(params):
    """The CPU merge works block by block (fisher.BLOCK entries); a tensor of several blocks and a
    ragged tail, with all-zero Fisher columns in more than one block, gives exactly the bits of the
    same formula in whole-tensor operations."""
    from fmerge.methods.fisher import BLOCK

    shape = (3, BLOCK - 37)  # rows cross block boundaries; 3 blocks and a partial fourth
    group = fisher_group(seed=7, shape=shape, zero_columns=(5, BLOCK // 2, BLOCK - 40),
                         base_fisher=params.get("base_prior", False))
    means = fisher_means(group)
    lambdas = ref_lambdas(params.get("lambda", 1.0))
    expected = whole_tensor_fisher(group, lambdas, params.get("floor", 1e-6), means, params.get("normalize", False),
                                   params.get("fallback", "average"), params.get("base_prior", False))
    got = run("fisher", group, context=ctx(fisher_mean=means), **params)
    assert got.shape == group.base.shape and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert (group.stats["fisher"][0][:, 5] == 0).all()  # the zero columns are really there (inputs unchanged)
