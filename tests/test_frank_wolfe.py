"""Frank-Wolfe merging against plain references, and its steps on a tiny offline project.

The pure algorithm runs on a toy quadratic (loss ½‖x − c‖², gradient x − c) and is compared with a
plain float64 loop written here. The steps run a tiny word-level BERT with three classifier
models; the batched gradient is compared with one unpadded example at a time through a plain
nn.Module.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from _iterative_project import HEADER, build, run
from conftest import fmerge_cli
from fmerge.errors import FmergeError
from fmerge.methods.adamerging import project_simplex
from fmerge.methods.frank_wolfe import (
    frank_wolfe_hard, frank_wolfe_soft, oracle_scores, select, step_size_at,
)
from fmerge.objective import TaskModel, task_loss_and_grad

NAMES = ["w1", "w2", "w3"]
SHAPES = {"w1": (3, 4), "w2": (5,), "w3": (2, 2)}


def body(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(SHAPES[n], generator=g) for n in NAMES}


def quadratic(targets: dict[str, dict[str, torch.Tensor]]):
    """GradientFn of the mean over tasks of ½‖x − c_task‖²."""
    def fn(x, draw, tasks):
        loss = sum(0.5 * sum(float((x[n] - targets[t][n]).pow(2).sum()) for n in NAMES) for t in tasks) / len(tasks)
        grad = {n: sum(x[n] - targets[t][n] for t in tasks) / len(tasks) for n in NAMES}
        return loss, grad
    return fn


def plain_scores(g, x, cands, oracle):
    """scores[k][n], plainly: cosine with zero-norm tensors scoring 0, or ⟨g, θ − x⟩."""
    out = []
    for cand in cands:
        row = []
        for n in NAMES:
            a, b = g[n].double().flatten().tolist(), cand[n].double().flatten().tolist()
            if oracle == "cosine":
                na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
                row.append(0.0 if na == 0 or nb == 0 else sum(p * q for p, q in zip(a, b)) / (na * nb))
            else:
                xs = x[n].double().flatten().tolist()
                row.append(sum(p * (q - r) for p, q, r in zip(a, b, xs)))
        out.append(row)
    return out


def plain_hard(x0, cands, c, iters, step_size, oracle, granularity):
    x = {n: x0[n].double().clone() for n in NAMES}
    cands = [{n: cand[n].double() for n in NAMES} for cand in cands]
    chosen = []
    for t in range(iters):
        g = {n: x[n] - c[n].double() for n in NAMES}
        s = plain_scores(g, x, cands, oracle)
        if granularity == "task":
            totals = [sum(row) for row in s]
            k = min(range(len(cands)), key=lambda i: (totals[i], i))
            pick = {n: k for n in NAMES}
        else:
            pick = {n: min(range(len(cands)), key=lambda i: (s[i][j], i)) for j, n in enumerate(NAMES)}
        chosen.append(pick)
        gamma = 2.0 / (t + 2) * step_size
        for n in NAMES:
            x[n] = x[n] + gamma * (cands[pick[n]][n] - x[n])
    return x, chosen


def test_step_size_schedule_has_no_hidden_factor():
    assert [step_size_at(t, 0.5) for t in range(4)] == pytest.approx([0.5, 1 / 3, 0.25, 0.2])
    assert step_size_at(0, 1.0) == 1.0


@pytest.mark.parametrize("oracle,granularity", list(itertools.product(["cosine", "linear"], ["task", "layer"])))
def test_hard_frank_wolfe_equals_plain_loop(oracle, granularity):
    x0, c = body(0), body(1)
    cands = [body(10 + k) for k in range(4)]
    x, trace = frank_wolfe_hard(x0, cands, cands, quadratic({"t": c}), names=NAMES, model_names=list("abcd"),
                                tasks=["t"], max_iters=5, step_size=0.7, oracle=oracle, granularity=granularity)
    ref, chosen = plain_hard(x0, cands, c, 5, 0.7, oracle, granularity)
    for n in NAMES:
        torch.testing.assert_close(x[n].double(), ref[n], rtol=1e-5, atol=1e-6)
    assert [row["step"] for row in trace] == pytest.approx([step_size_at(t, 0.7) for t in range(5)])
    if granularity == "task":
        assert [row["chosen"] for row in trace] == ["abcd"[pick["w1"]] for pick in chosen]
    assert all(row["grad_norm"] > 0 and math.isfinite(row["loss"]) for row in trace)
    assert x0["w1"].ne(x["w1"]).any()  # x0 itself is not modified in place: it still differs


def test_oracles_guard_zero_norms_and_pick_the_first_on_ties():
    x, c = body(0), body(1)
    c["w2"] = x["w2"].clone()                 # zero gradient on w2
    cands = [body(10 + k) for k in range(3)]
    cands[1]["w3"] = torch.zeros(2, 2)        # a zero tensor in a candidate
    g = {n: x[n] - c[n] for n in NAMES}
    for oracle in ("cosine", "linear"):
        scores = oracle_scores(g, x, cands, cands, NAMES, oracle)
        assert torch.isfinite(scores).all()
        torch.testing.assert_close(scores, torch.tensor(plain_scores(g, x, cands, oracle), dtype=torch.float64))
    assert (oracle_scores(g, x, cands, cands, NAMES, "cosine")[:, 1] == 0).all()
    zero = {n: torch.zeros(SHAPES[n]) for n in NAMES}
    scores = oracle_scores(zero, x, cands, cands, NAMES, "cosine")
    assert (scores == 0).all() and select(scores, "task") == [0, 0, 0]
    x1, trace = frank_wolfe_hard(x, cands, cands, lambda b, d, t: (0.0, zero), names=NAMES, model_names=list("abc"),
                                 tasks=["t"], max_iters=1, step_size=1.0)
    torch.testing.assert_close(x1["w1"], cands[0]["w1"])  # γ_0 = 1: x_1 is the chosen vertex
    assert trace[0]["chosen"] == "a" and trace[0]["grad_norm"] == 0


def test_noise_gradients_do_not_vote():
    """w2's true gradient is exactly 0 and only float noise remains: it scores 0 for every candidate,
    so the task scores are the sums over w1 and w3 alone, computed here by hand."""
    x, c = body(0), body(1)
    g = {n: x[n] - c[n] for n in NAMES}
    g["w2"] = 1e-9 * torch.randn(SHAPES["w2"], generator=torch.Generator().manual_seed(5))
    cands = [body(10 + k) for k in range(3)]
    cands[1]["w2"] = g["w2"] * 1e6            # aligned with the noise: cosine 1, the full vote it must not get
    for oracle in ("cosine", "linear"):
        plain = plain_scores(g, x, cands, oracle)
        expect = torch.tensor([[row[0], 0.0, row[2]] for row in plain], dtype=torch.float64)
        torch.testing.assert_close(oracle_scores(g, x, cands, cands, NAMES, oracle), expect)
        torch.testing.assert_close(oracle_scores(g, x, cands, cands, NAMES, oracle, grad_noise_rtol=0.0),
                                   torch.tensor(plain, dtype=torch.float64))
    noisy = oracle_scores(g, x, cands, cands, NAMES, "cosine", grad_noise_rtol=0.0)
    assert noisy[1, 1] == pytest.approx(1.0)  # without the threshold the noise casts a full vote
    # the threshold is relative to the largest tensor gradient norm, and a norm equal to it is noise
    largest = max(float(g[n].double().norm()) for n in NAMES)
    rtol = float(g["w2"].double().norm()) / largest
    assert (oracle_scores(g, x, cands, cands, NAMES, "cosine", grad_noise_rtol=rtol)[:, 1] == 0).all()
    assert (oracle_scores(g, x, cands, cands, NAMES, "cosine", grad_noise_rtol=rtol * 0.99)[:, 1] != 0).all()


def test_layer_granularity_picks_per_tensor_and_respects_taken():
    scores = torch.tensor([[0.5, -1.0, 0.0], [-0.2, 0.3, 0.0], [0.1, 0.1, -3.0]], dtype=torch.float64)
    assert select(scores, "layer") == [1, 0, 2]
    assert select(scores, "task") == [2, 2, 2]       # row sums −0.5, 0.1, −2.8
    taken = torch.zeros(3, 3, dtype=torch.bool)
    taken[2] = True
    assert select(scores, "task", taken) == [0, 0, 0]
    taken = torch.zeros(3, 3, dtype=torch.bool)
    taken[1, 0] = taken[0, 1] = taken[2, 1] = True
    assert select(scores, "layer", taken) == [2, 1, 2]


def brute_force_simplex(v: list[float]) -> list[float]:
    """The Euclidean projection on the simplex by enumerating supports (KKT: equal shift on the support)."""
    best, best_d = None, math.inf
    for r in range(1, len(v) + 1):
        for support in itertools.combinations(range(len(v)), r):
            shift = (sum(v[i] for i in support) - 1) / r
            x = [v[i] - shift if i in support else 0.0 for i in range(len(v))]
            if min(x) < -1e-12:
                continue
            d = sum((a - b) ** 2 for a, b in zip(x, v))
            if d < best_d:
                best, best_d = x, d
    return best


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_simplex_projection_equals_brute_force(n):
    g = torch.Generator().manual_seed(n)
    rows = torch.cat([torch.randn(20, n, generator=g, dtype=torch.float64) * 2,
                      torch.full((1, n), 0.3, dtype=torch.float64), torch.full((1, n), 1.0 / n, dtype=torch.float64)])
    projected = project_simplex(rows)
    assert (projected >= 0).all()
    torch.testing.assert_close(projected.sum(-1), torch.ones(len(rows), dtype=torch.float64))
    for row, p in zip(rows, projected):
        assert p.tolist() == pytest.approx(brute_force_simplex(row.tolist()), abs=1e-12)


@pytest.mark.parametrize("simplex", [False, True])
def test_soft_picks_distinct_models_per_task_then_weights_them(simplex):
    x0 = body(0)
    targets = {"t1": body(1), "t2": body(2)}
    cands = [body(10 + k) for k in range(3)]
    x1, trace = frank_wolfe_soft(x0, cands, cands, quadratic(targets), names=NAMES, model_names=list("abc"),
                                 tasks=["t1", "t2"], max_iters=1, ada_iters=0, ada_coeff=0.3, simplex=simplex)
    # plain selection: task 1 the best candidate, task 2 the best of the others
    s1 = [sum(r) for r in plain_scores({n: x0[n] - targets["t1"][n] for n in NAMES}, x0, cands, "cosine")]
    s2 = [sum(r) for r in plain_scores({n: x0[n] - targets["t2"][n] for n in NAMES}, x0, cands, "cosine")]
    k1 = min(range(3), key=lambda i: s1[i])
    k2 = min((i for i in range(3) if i != k1), key=lambda i: s2[i])
    assert trace[0]["chosen"] == f"t1->{'abc'[k1]}, t2->{'abc'[k2]}"
    w = 0.5 if simplex else 0.3   # (0.3, 0.3) projected on the simplex is (0.5, 0.5)
    for n in NAMES:
        torch.testing.assert_close(x1[n], x0[n] + w * (cands[k1][n] - x0[n]) + w * (cands[k2][n] - x0[n]))
    # the row is x_0's (its loss there); the step's coefficients are named as the step's
    loss0 = sum(quadratic(targets)(x0, 0, [t])[0] for t in ("t1", "t2")) / 2
    assert trace[0]["loss"] == pytest.approx(loss0) and trace[0]["step_coef_mean"] == pytest.approx(w)
    assert "coef_mean" not in trace[0]


def test_soft_adamerging_lowers_the_loss():
    x0, targets = body(0), {"t1": body(1), "t2": body(2)}
    cands = [body(10 + k) for k in range(3)]
    _, trace = frank_wolfe_soft(x0, cands, cands, quadratic(targets), names=NAMES, model_names=list("abc"),
                                tasks=["t1", "t2"], max_iters=2, ada_iters=30, ada_lr=0.05)
    assert all(row["ada_loss_last"] < row["ada_loss_first"] for row in trace)


# --- the gradient through real (tiny) networks ---------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return build(tmp_path_factory.mktemp("fw"))


@pytest.mark.parametrize("loss", ["cross_entropy", "entropy"])
def test_batched_gradient_equals_one_example_at_a_time(project, loss):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from fmerge.data import DataSpec, encode_batches, load_dataset_split

    net = BertForSequenceClassification.from_pretrained(project / "models" / "animal").eval()
    tok = AutoTokenizer.from_pretrained(project / "base")
    ds = load_dataset_split(DataSpec(path=str(project / "data" / "animal"), split="validation")).select(range(10))
    g = torch.Generator().manual_seed(0)
    body = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g) for n, p in net.named_parameters() if n.startswith("bert.")}
    spec = DataSpec(path=str(project / "data" / "animal"), split="validation")
    task = TaskModel(net.requires_grad_(False), {n: n for n in body},
                     lambda draw: list(encode_batches(tok, ds, spec, 4, 16)))
    value, grad = task_loss_and_grad(task, body, 0, loss)

    ref_net = BertForSequenceClassification.from_pretrained(project / "models" / "animal").eval()
    ref_net.load_state_dict(body, strict=False)
    ref_net.zero_grad()
    total = 0.0
    for row in ds:
        enc = tok(row["text"], return_tensors="pt", truncation=True, max_length=16)
        logp = torch.log_softmax(ref_net(**enc).logits, -1)[0]
        one = -logp[row["label"]] if loss == "cross_entropy" else -(logp.exp() * logp).sum()
        (one / len(ds)).backward()
        total += float(one.detach()) / len(ds)
    assert value == pytest.approx(total, rel=1e-5)
    params = dict(ref_net.named_parameters())
    for n in body:
        ref = params[n].grad if params[n].grad is not None else torch.zeros_like(body[n])
        torch.testing.assert_close(grad[n], ref, rtol=1e-5, atol=1e-7)


STEPS = """
  fw:
    kind: frank_wolfe
    max_iters: 2
    step_size: STEP
    dataset_size: 8
    chunk_size: 4
    max_length: 16
    export: out/fw
  fw_one:
    kind: frank_wolfe
    init: base
    oracle: linear
    granularity: task
    max_iters: 1
    step_size: 0.5
    dataset_size: 8
    max_length: 16
  fw_soft:
    kind: frank_wolfe_soft
    tasks: [sentiment, animal]
    merge_fn: ties
    merge_params: {density: 0.5}
    max_iters: 1
    ada_iters: 2
    dataset_size: 8
    max_length: 16
  eval: {kind: eval, merges: [fw, fw_soft], limit: 8, max_length: 16, individual: false}
"""


def test_steps_run_evaluate_export_and_rerun_only_what_changed(project):
    recipe = project / "fw.yaml"
    recipe.write_text(HEADER + STEPS.replace("STEP", "0.3"))
    rt, states, console = run(recipe)
    assert set(states.values()) == {"computed"} and "warning" not in console
    fw = rt.store.open(rt.planned["fw"][0].key)
    base = rt.source("__base__")
    assert fw.names("weights/") == base.names()
    trace = fw.meta["trace"]
    assert [r["iteration"] for r in trace] == [0, 1] and trace[1]["step"] == pytest.approx(0.3 * 2 / 3)
    assert all(r["chosen"] in ("sentiment", "animal", "color") for r in trace)
    assert fw.meta["splits"] == {"sentiment": "validation", "animal": "validation", "color": "validation"}
    results = {(r["variant"], r["task"]) for r in rt.results["eval"]}
    assert {v for v, _ in results} == {"base", "fw", "fw_soft"}
    assert (project / "out" / "fw" / "config.json").is_file() and (project / "out" / "fw" / "heads").is_dir()

    # one iteration from the base: (1 − γ)·θ_0 + γ·θ_chosen, tensor by tensor, in base naming
    one = rt.store.open(rt.planned["fw_one"][0].key)
    chosen = one.meta["trace"][0]["chosen"]
    model = rt.source(chosen)
    for name in ("encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        expect = 0.5 * base.get(name) + 0.5 * model.get("bert." + name)
        torch.testing.assert_close(one.view("weights/").get(name), expect)

    # TIES vertices read τ from cached task-vector artifacts (deps); task-arithmetic vertices need none
    assert not [d for d in rt.planned["fw"][0].deps if d.kind == "task_vectors"]
    tau_deps = [d for d in rt.planned["fw_soft"][0].deps if d.kind == "task_vectors"]
    assert {d.label for d in tau_deps} == {"sentiment", "animal", "color"} and all(rt.store.has(d.key) for d in tau_deps)

    soft = rt.store.open(rt.planned["fw_soft"][0].key).meta["trace"]
    assert len(soft) == 1 and soft[0]["chosen"].count("->") == 2

    show = fmerge_cli("show", fw.key, "--store", project / "store")
    assert "trace of" in show.stdout and "grad_norm" in show.stdout and trace[0]["chosen"] in show.stdout

    recipe.write_text(HEADER + STEPS.replace("STEP", "0.6"))
    _, states, _ = run(recipe)
    assert states == {"fw": "computed", "fw_one": "cached", "fw_soft": "cached", "eval": "computed"}


def test_soft_warns_when_every_candidate_is_picked(project):
    recipe = project / "soft.yaml"
    recipe.write_text(HEADER + """
  soft: {kind: frank_wolfe_soft, max_iters: 1, ada_iters: 1, dataset_size: 4, max_length: 16}
""")
    _, states, console = run(recipe)
    assert states == {"soft": "computed"}
    assert "warning" in console and "selection does nothing" in console


def test_user_errors_name_the_key(project):
    from fmerge.api import load_recipe

    bad = project / "bad.yaml"
    bad.write_text(HEADER + "  fw: {kind: frank_wolfe, init: no/such/dir}\n")
    with pytest.raises(FmergeError, match=r"steps\.fw\.init"):
        load_recipe(bad)
    bad.write_text(HEADER + "  fw: {kind: frank_wolfe, merge_fn: ties, merge_params: {densty: 0.2}}\n")
    with pytest.raises(FmergeError, match="merge_params.densty"):
        load_recipe(bad)
    bad.write_text(HEADER + "  fw: {kind: frank_wolfe, oracle: dot}\n")
    with pytest.raises(FmergeError, match="oracle"):
        load_recipe(bad)
    bad.write_text(HEADER + "  fw: {kind: frank_wolfe, grad_noise_rtol: 1.5}\n")
    with pytest.raises(FmergeError, match="grad_noise_rtol"):
        load_recipe(bad)


def test_merge_params_enter_the_key_with_defaults_filled_in(project):
    from fmerge.executor import plan_step
    from fmerge.api import load_recipe
    from fmerge.runtime import Runtime
    from fmerge.store import Store

    recipe = project / "keys.yaml"
    recipe.write_text(HEADER + """
  implicit: {kind: frank_wolfe, max_length: 16}
  explicit: {kind: frank_wolfe, max_length: 16, merge_params: {lambda: 0.3, weight: 1.0}}
  other: {kind: frank_wolfe, max_length: 16, merge_params: {lambda: 0.4}}
  ties_implicit: {kind: frank_wolfe, max_length: 16, merge_fn: ties}
""")
    r = load_recipe(recipe)
    rt = Runtime(r, Store(r.resolve(r.spec.store)))
    keys = {s: plan_step(rt, s)[0].key for s in ("implicit", "explicit", "other", "ties_implicit")}
    assert keys["implicit"] == keys["explicit"]
    assert len({keys["implicit"], keys["other"], keys["ties_implicit"]}) == 3
    assert rt.planned["implicit"][0].params["merge_params"] == {"lambda": 0.3, "weight": 1.0}
