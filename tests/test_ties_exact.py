"""TIES keeps exactly k entries (rule: exact), and reproduces mergekit 0.1.5 (rule: mergekit).

Every expectation comes from a plainly written reference in this file: a Python sort over
(−|value|, index) for the exact rule, and for mergekit's rule its own definition: k =
max(1, int(density·n)) on the float product, the first k of a descending torch.argsort of the fp32
magnitudes (mergekit's call; its order among equal magnitudes is torch's, not the lowest index),
weights before the sign vote, + elected where the sum is exactly 0, λ after the merge.
"""

from __future__ import annotations

import math

import pytest
import torch

from fmerge.errors import FmergeError
from fmerge.methods import MergeContext, TensorGroup, get_method
from fmerge.methods.ties import keep_above_and_first_equal, keep_magnitude_at_least, trim_to_top_k


# ----------------------------------------------------------------------------- references

def ref_exact_keep(values: list[float], density: float) -> set[int]:
    """Indices kept by rule exact: k = ⌈density·n⌉, largest magnitude first, ties by lowest index."""
    k = math.ceil(round(density * len(values), 9))
    return set(sorted(range(len(values)), key=lambda j: (-abs(values[j]), j))[:k])


def ref_threshold_keep_count(values: list[float], density: float) -> int:
    """How many entries the old rule kept: every entry with |v| ≥ the k-th largest magnitude."""
    k = math.ceil(round(density * len(values), 9))
    kth = sorted((abs(v) for v in values), reverse=True)[k - 1]
    return sum(1 for v in values if abs(v) >= kth)


def ref_mergekit_keep(values: list[float], density: float) -> set[int]:
    """mergekit 0.1.5's magnitude trim: the first max(1, int(density·n)) of a descending argsort."""
    if density >= 1:
        return set(range(len(values)))
    k = max(1, int(density * len(values)))
    order = torch.argsort(torch.tensor([abs(v) for v in values], dtype=torch.float32), descending=True)
    return set(order[:k].tolist())


def ref_sorted_keep(values: list[float], k: int) -> set[int]:
    """The k largest magnitudes when no two are equal (any correct sort agrees)."""
    return set(sorted(range(len(values)), key=lambda j: -abs(values[j]))[:k])


def ref_mergekit_ties(base, taus, densities, weights, lam, normalize) -> list[float]:
    """mergekit's TIES, one coordinate at a time."""
    kept = [ref_mergekit_keep(t, d) for t, d in zip(taus, densities)]
    out = []
    for j, b in enumerate(base):
        entries = [(w * t[j] if j in keep else 0.0, w) for t, keep, w in zip(taus, kept, weights)]
        elected = 1 if sum(e for e, _ in entries) >= 0 else -1  # + at an exactly zero sum
        agreeing = [(e, w) for e, w in entries if e != 0 and (e > 0) == (elected > 0)]
        mixed = sum(e for e, _ in agreeing)
        divisor = sum(w for _, w in agreeing) or 1.0
        out.append(b + lam * (mixed / divisor if normalize else mixed))
    return out


def ref_exact_ties(base, taus, density, weights, lam, normalize) -> list[float]:
    """rule exact's TIES, one coordinate at a time: λ·w before the vote, no sign at a zero sum."""
    kept = [ref_exact_keep(t, density) for t in taus]
    out = []
    for j, b in enumerate(base):
        entries = [(lam * w * t[j] if j in keep else 0.0, w) for t, keep, w in zip(taus, kept, weights)]
        total = sum(e for e, _ in entries)
        elected = (total > 0) - (total < 0)
        agreeing = [(e, w) for e, w in entries if e != 0 and ((e > 0) - (e < 0)) == elected]
        if elected == 0 or not agreeing:
            out.append(b)
            continue
        mixed = sum(e for e, _ in agreeing)
        out.append(b + (mixed / sum(w for _, w in agreeing) if normalize else mixed))
    return out


# ----------------------------------------------------------------------------- data

def bf16_finetune_deltas(shape=(256, 256), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """An LLM-like bf16 weight and its fine-tuned copy, 1 or 2 bf16 steps away in either direction:
    the task vector's magnitudes take few distinct values, so the k-th magnitude is tied a lot."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    steps = torch.randint(1, 3, shape, generator=gen) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
    tuned = (w.view(torch.int16) + steps.to(torch.int16)).view(torch.bfloat16)
    return w.float(), tuned.float()


def dyadic(shape, low, high, scale, gen) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen).float() / scale


def kept_indices(t: torch.Tensor) -> set[int]:
    return set(torch.nonzero(t.flatten()).flatten().tolist())


def close(got: torch.Tensor, expected: list[float], tol=1e-6) -> None:
    values = got.flatten().tolist()
    assert len(values) == len(expected)
    for j, (a, e) in enumerate(zip(values, expected)):
        assert math.isclose(a, e, rel_tol=tol, abs_tol=tol), f"coordinate {j}: {a} != {e}"


def run(params: dict, group: TensorGroup, names=("a", "b", "c"), method="ties") -> torch.Tensor:
    m = get_method(method)
    p = m.Params(**params)
    ctx = MergeContext(list(names))
    m.validate(p, ctx)
    return m.merge(group, p, ctx)


# ----------------------------------------------------------------------------- rule: exact

@pytest.mark.parametrize("density, old_at_least", [(0.2, 0.25), (0.5, 0.55)])
def test_exactly_k_kept_on_bf16_llm_like_deltas(density, old_at_least):
    base, tuned = bf16_finetune_deltas()
    tau = tuned - base
    values = tau.flatten().tolist()
    n = len(values)
    k = math.ceil(density * n)
    # the situation: keeping every entry tied with the k-th magnitude keeps far more than density
    assert ref_threshold_keep_count(values, density) / n >= old_at_least
    got = trim_to_top_k(tau.clone(), density)
    assert int((got != 0).sum()) == k and (got != 0).float().mean().item() == k / n
    assert kept_indices(got) == ref_exact_keep(values, density)
    # through the method (one model: the merge is the base plus the trimmed task vector)
    merged = run({"density": density}, TensorGroup("w", base, [tuned]), names=["a"])
    assert int((merged != base).sum()) == k
    assert torch.equal(merged - base, got)


def test_tie_break_is_deterministic_lowest_flat_index_first():
    base, tuned = bf16_finetune_deltas((64, 96), seed=3)
    tau = tuned - base
    first = trim_to_top_k(tau.clone(), 0.3)
    second = trim_to_top_k(tau.clone(), 0.3)
    assert torch.equal(first, second)
    assert kept_indices(first) == ref_exact_keep(tau.flatten().tolist(), 0.3)
    # flat order is the logical (row-major) order, whatever the memory layout
    transposed = trim_to_top_k(tau.t().contiguous().t(), 0.3)
    assert torch.equal(transposed, first)
    # every magnitude equal: the first k entries in flat order are kept
    flat = trim_to_top_k(torch.full((5, 4), -0.5), 0.25)
    assert kept_indices(flat) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 0.9])
@pytest.mark.parametrize("normalize", [True, False])
def test_exact_rule_merge_matches_coordinate_reference(density, normalize):
    gen = torch.Generator().manual_seed(5)
    base = dyadic((7, 9), -8, 8, 4, gen)
    taus = [dyadic((7, 9), -3, 4, 2, gen) for _ in range(3)]
    weights, lam = [1.0, 0.5, 2.0], 0.75
    got = run({"density": density, "weight": weights, "lambda": lam, "merge": "mean" if normalize else "sum"},
              TensorGroup("w", base, [base + t for t in taus]))
    close(got, ref_exact_ties(base.flatten().tolist(), [t.flatten().tolist() for t in taus],
                              density, weights, lam, normalize))


def test_global_trim_keeps_exactly_k_over_the_model_lowest_index_first():
    method = get_method("ties")
    gen = torch.Generator().manual_seed(9)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 3)}
    groups = []
    for name, shape in shapes.items():
        base = dyadic(shape, -4, 4, 4, gen)
        groups.append(TensorGroup(name, base, [base + dyadic(shape, -2, 3, 2, gen) for _ in range(2)]))
    params = method.Params(density=0.3, trim="global")
    ctx = MergeContext(["m1", "m2"])
    state = method.prepare(params, iter(groups), ctx)
    assert any(quota is not None for _, quota in state), "no tie straddles the global cut: the test proves little"
    for i in range(2):
        whole = [v for g in groups for v in (g.models[i] - g.base).flatten().tolist()]
        keep = ref_exact_keep(whole, 0.3)
        start, kept = 0, 0
        for g in groups:
            size = g.base.numel()
            tau = g.models[i] - g.base
            threshold, quota = state[i]
            trimmed = (keep_magnitude_at_least(tau.clone(), threshold) if quota is None
                       else keep_above_and_first_equal(tau.clone(), threshold, quota[g.name]))
            assert kept_indices(trimmed) == {j - start for j in keep if start <= j < start + size}
            kept += len(kept_indices(trimmed))
            start += size
        assert kept == math.ceil(0.3 * len(whole))


def test_zero_sign_sum_keeps_the_base_under_rule_exact_and_elects_plus_under_mergekit():
    base = torch.tensor([10.0, 20.0, 30.0])
    group = lambda: TensorGroup("w", base, [base + torch.tensor([2.0, 1.0, -4.0]),  # noqa: E731
                                            base + torch.tensor([-2.0, 3.0, 1.0])])
    # coordinate 0 sums to exactly 0: exact keeps 10, mergekit elects + and keeps the +2 (mean 2)
    assert run({"density": 1.0}, group(), names=["a", "b"]).tolist() == [10.0, 22.0, 26.0]
    assert run({"density": 1.0, "rule": "mergekit"}, group(), names=["a", "b"]).tolist() == [12.0, 22.0, 26.0]


# ----------------------------------------------------------------------------- rule: mergekit

def test_mergekit_k_is_the_floored_float_product_at_least_one():
    tau = torch.arange(1.0, 101.0)
    assert int((trim_to_top_k(tau.clone(), 0.29, "mergekit") != 0).sum()) == int(0.29 * 100) == 28
    assert int((trim_to_top_k(tau.clone(), 0.29) != 0).sum()) == 29  # exact: ⌈0.29·100⌉ on the decimal
    assert int((trim_to_top_k(tau.clone(), 0.001, "mergekit") != 0).sum()) == 1
    assert torch.equal(trim_to_top_k(tau.clone(), 1.0, "mergekit"), tau)


@pytest.mark.parametrize("density", [0.01, 0.2, 0.29, 0.5, 0.9])
def test_mergekit_trim_matches_reference_on_random_and_tied_inputs(density):
    gen = torch.Generator().manual_seed(1)
    random = torch.randn(97, 53, generator=gen)
    got = trim_to_top_k(random.clone(), density, "mergekit")
    values = random.flatten().tolist()
    assert kept_indices(got) == ref_sorted_keep(values, max(1, int(density * len(values))))
    for tied in (dyadic((97, 53), -4, 5, 8, gen), bf16_finetune_deltas((128, 96), seed=2)[1]
                 - bf16_finetune_deltas((128, 96), seed=2)[0]):
        got = trim_to_top_k(tied.clone(), density, "mergekit")
        values = tied.flatten().tolist()  # a kept entry equal to 0 stays 0: compare the non-zero ones
        assert kept_indices(got) == {j for j in ref_mergekit_keep(values, density) if values[j] != 0}
        assert torch.equal(got[got != 0], tied[got != 0])


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_mergekit_rule_merge_matches_coordinate_reference(density, normalize, tied):
    gen = torch.Generator().manual_seed(7)
    shape = (12, 10)
    base = dyadic(shape, -8, 8, 4, gen)
    taus = ([dyadic(shape, -3, 4, 2, gen) for _ in range(3)] if tied
            else [torch.randn(shape, generator=gen) for _ in range(3)])
    weights, lam = [1.0, 0.5, 2.0], 0.9
    got = run({"density": density, "weight": weights, "lambda": lam, "merge": "mean" if normalize else "sum",
               "rule": "mergekit"}, TensorGroup("w", base, [base + t for t in taus]))
    flat_taus = [(base + t - base).flatten().tolist() for t in taus]
    close(got, ref_mergekit_ties(base.flatten().tolist(), flat_taus, [density] * 3, weights, lam, normalize),
          tol=1e-5)
    if tied:  # the data must hold exactly zero sign sums where a + entry is merged
        sums = sum(w * t for w, t in zip(weights, taus))
        assert bool(((sums == 0) & torch.stack([t > 0 for t in taus]).any(0)).any())


def test_mergekit_rule_refuses_what_mergekit_has_no_meaning_for():
    group = TensorGroup("w", torch.zeros(4), [torch.ones(4), -torch.ones(4), torch.ones(4)])
    with pytest.raises(FmergeError, match="global"):
        run({"density": 0.5, "trim": "global", "rule": "mergekit"}, group)
    with pytest.raises(FmergeError, match="one λ"):
        run({"density": 0.5, "lambda": [1.0, 0.5, 1.0], "rule": "mergekit"}, group)
    with pytest.raises(FmergeError, match="only apply with combine: ties"):
        run({"p": 0.5, "rule": "mergekit"}, group, method="dare")


def test_dare_ties_trim_follows_the_rule():
    """dare with combine: ties reuses the TIES trim and vote: p = 0 isolates them."""
    base, tuned = bf16_finetune_deltas((32, 32), seed=4)
    group = lambda: TensorGroup("w", base, [tuned.clone()])  # noqa: E731
    exact = run({"p": 0.0, "combine": "ties", "density": 0.2}, group(), names=["a"], method="dare")
    assert kept_indices(exact - base) == ref_exact_keep((tuned - base).flatten().tolist(), 0.2)
    mk = run({"p": 0.0, "combine": "ties", "density": 0.2, "rule": "mergekit"}, group(), names=["a"], method="dare")
    assert kept_indices(mk - base) == ref_mergekit_keep((tuned - base).flatten().tolist(), 0.2)


# ----------------------------------------------------------------------------- configs from mergekit

class _Lines:
    @staticmethod
    def where(path) -> str:
        return ".".join(map(str, path))


@pytest.mark.parametrize("method, fmerge_method", [("ties", "ties"), ("dare_ties", "dare"), ("dare_linear", "dare")])
def test_configs_converted_from_mergekit_select_the_mergekit_rule(method, fmerge_method):
    from fmerge.mergekit import recipe_from_mergekit

    config = {"merge_method": method, "base_model": "org/base",
              "models": [{"model": "org/base"},
                         {"model": "org/m1", "parameters": {"density": 0.3, "weight": 1.0}},
                         {"model": "org/m2", "parameters": {"density": 0.5, "weight": 0.5}}]}
    recipe = recipe_from_mergekit(config, _Lines(), None)
    (step,) = recipe["steps"].values()
    assert step["method"] == fmerge_method
    params = get_method(fmerge_method).Params(**step["params"])
    if method == "dare_linear":  # no TIES step in dare_linear: the rule does not apply
        assert "rule" not in step["params"] and params.combine == "task_arithmetic"
    else:
        assert params.rule == "mergekit"
    assert get_method("ties").Params(density=0.5).rule == "exact"  # fmerge's own default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", ["exact", "mergekit"])
def test_cuda_keeps_the_same_entries_as_cpu(rule):
    base, tuned = bf16_finetune_deltas((512, 384), seed=6)
    tau = tuned - base
    for density in (0.2, 0.5):
        cpu = trim_to_top_k(tau.clone(), density, rule)
        cuda = trim_to_top_k(tau.cuda(), density, rule)
        assert torch.equal(cuda.cpu(), cpu)
