"""What the iterative methods hold while they compute the next gradient: no earlier merged body or
gradient (checked with weak references), and task models that own no body of their own.
bench/iterative_memory.py measures the resulting peak."""

from __future__ import annotations

import weakref

import torch

from _iterative_project import HEADER, build
from fmerge import executor
from fmerge.api import load_recipe
from fmerge.methods.adamerging import adamerging
from fmerge.methods.frank_wolfe import frank_wolfe_hard, frank_wolfe_soft
from fmerge.runtime import Runtime
from fmerge.store import Store

NAMES = ["w1", "w2"]


def body(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(3, 4, generator=g), "w2": torch.randn(5, generator=g)}


class Watched:
    """A GradientFn of ½‖x − c‖² that fails if a body or gradient of an earlier call is still alive."""

    def __init__(self):
        self.target, self.earlier, self.calls = body(99), [], 0

    def __call__(self, x, draw, tasks):
        alive = [what for ref, what in self.earlier if ref() is not None]
        assert not alive, f"call {self.calls}: still alive: {alive}"
        grad = {n: x[n] - self.target[n] for n in NAMES}
        loss = 0.5 * sum(float(g.pow(2).sum()) for g in grad.values())
        self.earlier = [(weakref.ref(t), f"gradient {n}") for n, t in grad.items()]
        if x is not self.iterate:  # a merged body made for this call (the iterate itself is kept)
            self.earlier += [(weakref.ref(t), f"body {n}") for n, t in x.items()]
        self.calls += 1
        return loss, grad

    iterate = None


def test_adamerging_drops_each_body_and_gradient_before_the_next():
    fn = Watched()
    adamerging(body(0), [body(1), body(2)], fn, names=NAMES, tasks=["a"], steps=4, lr=0.1)
    assert fn.calls == 4


def test_frank_wolfe_hard_drops_each_gradient_before_the_next():
    fn = Watched()
    x0, cands = body(0), [body(1), body(2)]

    def watch_iterate(x, draw, tasks):  # the iterate is updated in place and kept: only its gradients must go
        fn.iterate = x
        return fn(x, draw, tasks)

    frank_wolfe_hard(x0, cands, cands, watch_iterate, names=NAMES, model_names=["a", "b"], tasks=["a"],
                     max_iters=4, step_size=0.5)
    assert fn.calls == 4


def test_frank_wolfe_soft_drops_each_task_gradient_before_the_next():
    fn = Watched()
    cands = [body(1), body(2), body(3)]

    def watch_iterate(x, draw, tasks):
        if len(tasks) == 1:  # the selection: at the iterate, which is kept
            fn.iterate = x
        else:
            fn.iterate = None
        return fn(x, draw, tasks)

    frank_wolfe_soft(body(0), cands, cands, watch_iterate, names=NAMES, model_names=["a", "b", "c"],
                     tasks=["a", "b"], max_iters=2, ada_iters=3)
    assert fn.calls == 2 * (2 + 3)


def test_task_models_own_no_body(tmp_path):
    """Every body parameter of each task's network is a placeholder of its shape owning one
    element's bytes: the loss substitutes the body, so T tasks hold no T copies."""
    root = build(tmp_path)
    recipe = root / "fw.yaml"
    recipe.write_text(HEADER + "  fw: {kind: frank_wolfe, max_iters: 1, dataset_size: 4, max_length: 16}\n")
    r = load_recipe(recipe)
    rt = Runtime(r, Store(r.resolve(r.spec.store)))
    (p,) = executor.plan_step(rt, "fw")
    kind, cfg = rt.recipe.kinds["frank_wolfe"], rt.recipe.steps["fw"]
    plan = kind.tensor_plan(rt, cfg)
    objective = kind.objective(rt, cfg, p, plan, ("cross_entropy",), 4)
    assert set(objective.tasks) == {"sentiment", "animal", "color"}
    for task in objective.tasks.values():
        own = dict(task.net.named_parameters())
        assert len(task.params) == len(plan.merge)
        for name in task.params.values():
            assert own[name].untyped_storage().nbytes() == own[name].element_size(), name
        head = [p for n, p in own.items() if n not in task.params.values()]
        assert head and all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in head)
