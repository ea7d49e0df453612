"""CLIP zero-shot merging, offline: a tiny random CLIPModel, synthetic images in an imagefolder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fmerge import executor
from fmerge.fisher import fisher_diagonal
from fmerge.io import ModelDir
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.store import Store

WORDS = ["a", "photo", "of", "the", "thing", ".", "red", "green", "blue"]
COLORS = ["blue", "green", "red"]  # imagefolder's ClassLabel: folder names, sorted
TEMPLATES = ["a photo of a {}.", "the {} thing"]
REPO = Path(__file__).resolve().parent.parent


def tiny_clip_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=4 + len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=8, patch_size=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)


def save_base(root: Path, seed: int = 0):
    """A CLIPModel with a word-level tokenizer and an image processor (8×8 crops)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<bos>", "<eos>"] + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}).save_pretrained(root)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config())
    model.save_pretrained(root)
    return model


def save_finetuned(root: Path, base, seed: int, full: bool = False):
    """The base's vision tower plus noise: a CLIPVisionModel, or (full) a whole CLIPModel whose
    text tower is perturbed too (which a merge must ignore)."""
    from transformers import CLIPModel, CLIPVisionModel

    torch.manual_seed(seed)
    if full:
        model = CLIPModel(base.config)
        model.load_state_dict(base.state_dict())
        tensors = list(model.parameters())
    else:
        model = CLIPVisionModel(base.config.vision_config)
        tower = getattr(model, "vision_model", model)
        tower.load_state_dict(base.vision_model.state_dict())
        tensors = list(model.parameters())
    with torch.no_grad():
        for p in tensors:
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(root)
    return model


def write_images(root: Path, seed: int, per_class=(4, 3)):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in COLORS:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = int(rng.integers(8, 14))
                mode = "L" if i % 2 else "RGB"  # grey images (MNIST-like) go through RGB conversion
                shape = (size, size + 2) + (() if mode == "L" else (3,))
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")


RECIPE = """
base: base
store: store
data:
  colors: {path: data/colors, image: image, templates: TEMPLATES}
  shades: {path: data/shades, image: image, classnames: [red, green, blue], templates: TEMPLATES}
models:
  colors: {path: ft_colors, data: colors}
  shades: {path: ft_shades, data: shades}
steps:
  heads: {kind: zeroshot_head}
  fisher_exact: {kind: fisher, examples: 6, batch_size: 4, chunk_size: 3}
  avg: {kind: merge, method: simple_average, export: out/avg}
  fisher: {kind: merge, method: fisher, fisher: fisher_exact}
  eval: {kind: eval, merges: [avg], batch_size: 4}
""".replace("TEMPLATES", repr(TEMPLATES))


def make_project(root: Path) -> Path:
    """A CLIP base, two fine-tuned vision towers (one a full CLIPModel) and their image data in
    `root`, with RECIPE as root/recipe.yaml."""
    base = save_base(root / "base")
    save_finetuned(root / "ft_colors", base, 1)
    save_finetuned(root / "ft_shades", base, 2, full=True)
    write_images(root / "data" / "colors", 3)
    write_images(root / "data" / "shades", 4)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def runtime(project: Path) -> Runtime:
    recipe = load_recipe(project / "recipe.yaml")
    return Runtime(recipe, Store(project / "store"), device="cpu")


def states(reports) -> dict[str, str]:
    return {r.step: r.state for r in reports}


def hand_head(base_dir: Path, classnames, templates) -> torch.Tensor:
    """One prompt at a time, no padding: normalise, average over templates, normalise."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(base_dir).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = []
    with torch.no_grad():
        for name in classnames:
            total = torch.zeros(model.config.projection_dim)
            for t in templates:
                ids = torch.tensor([tok(t.replace("{}", name))["input_ids"]])
                e = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
                total += e / e.norm()
            mean = total / len(templates)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_zeroshot_head_equals_hand_computation_and_is_cached_by_content(project):
    rt = runtime(project)
    first = states(executor.run(rt, only=["heads"]))
    assert first == {"heads": "computed"}
    heads = {p.label: rt.store.open(p.key) for p in rt.planned["heads"]}
    # classnames of 'colors' come from the imagefolder's labels; 'shades' gives its own order
    torch.testing.assert_close(heads["colors"].get("head"), hand_head(project / "base", COLORS, TEMPLATES),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heads["shades"].get("head"), hand_head(project / "base", ["red", "green", "blue"], TEMPLATES),
                               rtol=1e-5, atol=1e-6)
    base = ModelDir(project / "base")
    assert torch.equal(heads["colors"].get("visual_projection"), base.get("visual_projection.weight"))
    assert states(executor.run(runtime(project), only=["heads"])) == {"heads": "cached"}

    # A new vision tower in the base leaves the heads' key alone; a new text tower changes it.
    from safetensors.torch import save_file

    state = {n: base.get(n).clone() for n in base.names()}
    state["vision_model.post_layernorm.bias"] += 1.0
    save_file(state, str(project / "base" / "model.safetensors"), metadata={"format": "pt"})
    assert states(executor.run(runtime(project), only=["heads"])) == {"heads": "cached"}
    state["text_model.final_layer_norm.bias"] += 1.0
    save_file(state, str(project / "base" / "model.safetensors"), metadata={"format": "pt"})
    rt = runtime(project)
    assert states(executor.run(rt, only=["heads"])) == {"heads": "computed"}
    changed = rt.store.open(rt.planned["heads"][0].key).get("head")
    assert not torch.allclose(changed, heads["colors"].get("head"))


def test_fisher_through_the_head_equals_per_example_loop(project):
    from fmerge.tasks import build_task_model, load_subset, task_batches

    rt = runtime(project)
    executor.run(rt, only=["heads"])
    head = next(p.key for p in rt.planned["heads"] if p.label == "colors")
    model = build_task_model(rt, "colors", head=head)
    assert [n for n, _ in model.named_parameters()][0].startswith("vision_model.")
    sub = load_subset(rt, "colors", "train", 6, 0, model.config)
    batches = list(task_batches(rt, "colors", sub.rows, sub.spec, 4, 64))
    fast = fisher_diagonal(model, batches, "exact", chunk_size=3).mean()

    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    brute = {n: torch.zeros_like(p) for n, p in params.items()}
    pixels = torch.cat([b["pixel_values"] for b in batches])
    for x in pixels:
        log_p = torch.log_softmax(model(pixel_values=x[None]).logits[0], dim=-1)
        for c in range(log_p.numel()):
            grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True)
            for n, g in zip(params, grads):
                brute[n] += log_p[c].exp().detach() * g.square()
    assert set(fast) == set(brute)
    largest = max(float(t.max()) for t in brute.values()) / len(pixels)
    for n in brute:
        expected = brute[n] / len(pixels)
        # Relative to the tensor's largest entry; tensors whose Fisher is exactly zero (attention
        # key biases) hold only rounding noise, compared with the whole model's largest entry.
        scale = max(float(expected.max()), 1e-6 * largest)
        assert float((fast[n] - expected).abs().max()) / scale < 1e-5, n


def test_merge_touches_only_the_vision_tower(project):
    from transformers import CLIPVisionModel

    rt = runtime(project)
    assert states(executor.run(rt, only=["avg", "fisher"])) == {"fisher_exact": "computed", "avg": "computed",
                                                                  "fisher": "computed"}
    merged = rt.store.open(rt.planned["avg"][0].key).view("weights/")
    base, colors, shades = (ModelDir(project / d) for d in ("base", "ft_colors", "ft_shades"))
    vision = [n for n in base.names() if n.startswith("vision_model.")]
    assert sorted(merged.names()) == sorted(vision)
    # ft_colors is a CLIPVisionModel saved without the 'vision_model.' prefix; ft_shades a full CLIPModel.
    for n in vision:
        expected = (colors.get(n[len("vision_model."):]) + shades.get(n)) / 2
        torch.testing.assert_close(merged.get(n), expected)
    fisher = rt.store.open(rt.planned["fisher"][0].key).view("weights/")
    assert sorted(fisher.names()) == sorted(vision)
    exported = CLIPVisionModel.from_pretrained(project / "out" / "avg")
    tower = getattr(exported, "vision_model", exported)
    torch.testing.assert_close(tower.post_layernorm.bias, merged.get("vision_model.post_layernorm.bias"))
    assert all(n.startswith("vision_model.") for n in ModelDir(project / "out" / "avg").names())


def test_eval_accuracy_equals_count_by_hand(project):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    rt = runtime(project)
    executor.run(rt, only=["eval"])
    results = {(r["variant"], r["task"]): r for r in rt.results["eval"]}
    merged = rt.store.open(rt.planned["avg"][0].key).view("weights/")
    processor = CLIPImageProcessor.from_pretrained(project / "base")
    heads = {"colors": hand_head(project / "base", COLORS, TEMPLATES),
             "shades": hand_head(project / "base", ["red", "green", "blue"], TEMPLATES)}
    pristine = CLIPModel.from_pretrained(project / "base").eval()
    for variant in ("avg", "individual", "base"):
        for task in ("colors", "shades"):
            clip = copy.deepcopy(pristine)
            if variant == "avg":
                clip.load_state_dict({n: merged.get(n) for n in merged.names()}, strict=False)
            elif variant == "individual":
                ft = ModelDir(project / f"ft_{task}")
                clip.vision_model.load_state_dict({n.removeprefix("vision_model."): ft.get(n) for n in ft.names()
                                                   if not n.startswith(("text_model", "text_proj", "visual_proj", "logit"))})
            head = heads[task]
            correct = total = 0
            for folder in sorted((project / "data" / task / "test").iterdir()):
                for f in sorted(folder.iterdir()):
                    pixels = processor(images=[Image.open(f).convert("RGB")], return_tensors="pt")["pixel_values"]
                    with torch.no_grad():
                        feats = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)[0]
                    pred = int((feats / feats.norm() @ head.T).argmax())
                    correct += int(pred == COLORS.index(folder.name))
                    total += 1
            r = results[(variant, task)]
            assert r["n"] == total
            assert r["accuracy"] == pytest.approx(correct / total), (variant, task)


@pytest.mark.parametrize("name", ["clip_vit_b32_ta8.yaml", "gpt2_glue.yaml"])
def test_pool_recipes_validate_offline(name, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("validation must not download anything")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    recipe = load_recipe(REPO / "recipes" / name)
    assert len(recipe.models) >= 7


ITERATIVE = """
  ada: {kind: adamerging, split: train, steps: 6, lr: 0.05, batch_size: 6, examples: 6, chunk_size: 4}
  fw: {kind: frank_wolfe, split: train, init: base, max_iters: 1, step_size: 0.5, dataset_size: 6, chunk_size: 4}
  eval_iterative: {kind: eval, merges: [fw], batch_size: 4, individual: false, base: false}
"""


def vision_tensor(source: ModelDir, name: str) -> torch.Tensor:
    """A vision tensor of a CLIPModel or of a CLIPVisionModel saved with or without the prefix."""
    return source.get(name) if name in source.names() else source.get(name.removeprefix("vision_model."))


def test_adamerging_learns_the_vision_tower_only(project):
    (project / "recipe.yaml").write_text(RECIPE + ITERATIVE)
    rt = runtime(project)
    assert states(executor.run(rt, only=["ada"])) == {"ada": "computed"}
    art = rt.store.open(rt.planned["ada"][0].key)
    base = ModelDir(project / "base")
    vision = sorted(n for n in base.names() if n.startswith("vision_model."))
    assert sorted(art.names("weights/")) == vision
    losses = [r["loss"] for r in art.meta["trace"]]
    assert len(losses) == 6 and losses[-1] < losses[0]  # the same 6 images every step
    # the stored coefficients rebuild a tensor by θ_0 + Σ Λ τ, through both fine-tunes' namings
    coeffs, meta = art.get("coefficients"), art.meta
    name = "vision_model.encoder.layers.1.mlp.fc1.weight"
    j = meta["tensors"].index(name)
    expect = base.get(name) + sum(coeffs[i, j] * (vision_tensor(ModelDir(project / f"ft_{m}"), name) - base.get(name))
                                  for i, m in enumerate(meta["models"]))
    torch.testing.assert_close(art.view("weights/").get(name), expect, rtol=1e-5, atol=1e-6)


def test_frank_wolfe_iteration_evaluates_and_its_key_follows_the_heads(project):
    (project / "recipe.yaml").write_text(RECIPE + ITERATIVE)
    rt = runtime(project)
    assert states(executor.run(rt, only=["eval_iterative"])) == {"fw": "computed", "eval_iterative": "computed"}
    art = rt.store.open(rt.planned["fw"][0].key)
    base = ModelDir(project / "base")
    vision = sorted(n for n in base.names() if n.startswith("vision_model."))
    assert sorted(art.names("weights/")) == vision
    chosen = ModelDir(project / f"ft_{art.meta['trace'][0]['chosen']}")
    for name in ("vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(art.view("weights/").get(name), 0.5 * base.get(name) + 0.5 * vision_tensor(chosen, name))
    assert {(r["variant"], r["task"]) for r in rt.results["eval_iterative"]} == {("fw", "colors"), ("fw", "shades")}

    # Another class order for one task changes its zero-shot head, hence the step's key.
    (project / "recipe.yaml").write_text((RECIPE + ITERATIVE).replace("[red, green, blue]", "[blue, red, green]"))
    assert executor.plan_step(runtime(project), "fw")[0].key != rt.planned["fw"][0].key
    (project / "recipe.yaml").write_text(RECIPE + ITERATIVE)
    assert executor.plan_step(runtime(project), "fw")[0].key == rt.planned["fw"][0].key
