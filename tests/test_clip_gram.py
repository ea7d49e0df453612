"""RegMean on CLIP vision towers: Grams of every patch row (no padding), through the zero-shot task model."""

from __future__ import annotations

import torch

from fmerge import executor
from test_clip import RECIPE, project, runtime  # noqa: F401  (fixture)


def test_gram_of_the_vision_tower_equals_a_plain_loop_over_images(project):  # noqa: F811
    (project / "recipe.yaml").write_text(RECIPE + """
  grams: {kind: gram, examples: 5, batch_size: 2, models: [colors]}
""")
    rt = runtime(project)
    executor.run(rt, only=["grams"])
    art = rt.store.open(rt.planned["grams"][0].key)
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    got = art.get("gram/" + name)

    from fmerge.tasks import build_task_model, data_spec, load_subset, task_batches

    p = rt.planned["grams"][0]
    model = build_task_model(rt, "colors", head=p.inputs["head"])
    layer = dict(model.named_modules())[name.removesuffix(".weight")]
    spec = data_spec(rt, p.extra["data"], p.params["split"])
    want = torch.zeros_like(got)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        rows = load_subset(rt, p.extra["data"], p.params["split"], p.params["examples"], p.params["seed"]).rows
        for batch in task_batches(rt, "colors", rows, spec, 1, 16):
            model(pixel_values=batch["pixel_values"])  # one image at a time
    for x in seen:
        want += x.T @ x
    assert len(seen) == 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(n.startswith("vision_model.") for n in art.view("gram/").names())
