"""The same mergekit config through mergekit 0.1.5 (`mergekit-yaml`) and `fmerge run`: the outputs
must be the same bytes where mergekit is deterministic (slerp, nuslerp, model_stock, breadcrumbs,
passthrough slices; dtype: float32), tensors of more than 2^20 entries included. DELLA draws its
mask from the global torch RNG in mergekit's tensor order, which fmerge does not reproduce: given
mergekit's own mask (read off its output, the base being zero) fmerge's rescale gives its bytes,
and both tools keep entries at the rates the magnitude ranks ask for.

Skipped without mergekit: `bash bench/setup_mergekit.sh` installs it into bench/.venv-mergekit
(or put `mergekit-yaml` on PATH). All configs go through mergekit-yaml's own command in one
process, to pay its start-up once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_mergekit import make_llama_zoo

ROOT = Path(__file__).resolve().parents[1]
VENDORED = ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-yaml"
MERGEKIT_YAML = VENDORED if VENDORED.exists() else (Path(p) if (p := shutil.which("mergekit-yaml")) else None)
pytestmark = pytest.mark.skipif(
    MERGEKIT_YAML is None,
    reason="mergekit is not installed: run `bash bench/setup_mergekit.sh` (mergekit 0.1.5 into bench/.venv-mergekit) "
           "or put mergekit-yaml on PATH")
LAYERS = 2

CONFIGS = {
    "slerp": """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {m1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.37
""",
    "slerp_slices": """slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {m2}
        layer_range: [0, 2]
merge_method: slerp
base_model: {base}
parameters:
  t: 0.6
""",
    "slerp_wide": """merge_method: slerp
base_model: {wide_base}
models:
  - model: {wide_m1}
parameters:
  t: 0.3
""",
    "nuslerp": """merge_method: nuslerp
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.3}}
  - model: {m2}
    parameters: {{weight: 0.7}}
""",
    "nuslerp_rows_no_base": """merge_method: nuslerp
models:
  - model: {m1}
    parameters: {{weight: 1.0}}
  - model: {m3}
    parameters: {{weight: 2.0}}
parameters: {{nuslerp_flatten: false}}
""",
    "nuslerp_columns": """merge_method: nuslerp
base_model: {base}
models:
  - model: {m2}
    parameters: {{weight: 0.5}}
  - model: {m3}
    parameters: {{weight: 0.25}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
""",
    "model_stock": """merge_method: model_stock
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
""",
    "model_stock_filter_wise": """merge_method: model_stock
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
parameters: {{filter_wise: true}}
""",
    "breadcrumbs": """merge_method: breadcrumbs
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.7, gamma: 0.05}}
  - model: {m2}
    parameters: {{weight: 0.8, density: [0.9, 0.5], gamma: 0.1}}
  - model: {m3}
    parameters: {{weight: 0.3, density: 0.6}}
parameters: {{lambda: 0.9}}
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 1.0, density: 0.6, gamma: 0.02}}
  - model: {m2}
    parameters: {{weight: 0.5, density: 0.6, gamma: 0.02}}
  - model: {m3}
    parameters: {{weight: 0.7, density: 0.8, gamma: 0.0}}
parameters: {{normalize: true, rescale: true}}
""",
    "passthrough": """slices:
  - sources:
      - model: {m1}
        layer_range: [0, 2]
  - sources:
      - model: {m2}
        layer_range: [1, 2]
  - sources:
      - model: {base}
        layer_range: [0, 1]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
merge_method: passthrough
""",
    "della": """merge_method: della
base_model: {zero}
models:
  - model: {m1}
    parameters: {{weight: 1.0, density: 0.4, epsilon: 0.2}}
""",
}
DETERMINISTIC = [name for name in CONFIGS if name != "della"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{config name: (mergekit's weights, fmerge's weights, directory)} for every config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmerge import executor
    from fmerge.api import load_recipe
    from fmerge.runtime import Runtime
    from fmerge.store import Store

    root = tmp_path_factory.mktemp("parity")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    paths = {**make_llama_zoo(root, cfg, noise=0.02, dtype=torch.float32), "zero": root / "zero"}
    # embeddings of more than 2^20 entries: slerp sums norms and dot products over such chunks
    wide = LlamaConfig(**{**cfg.to_dict(), "vocab_size": 40000})
    for i, name in enumerate(("wide_base", "wide_m1")):
        torch.manual_seed(10 + i)
        paths[name] = root / name
        LlamaForCausalLM(wide).save_pretrained(paths[name])
    shutil.copytree(paths["base"], paths["zero"])
    zeros = {k: torch.zeros_like(v) for k, v in load_file(str(paths["base"] / "model.safetensors")).items()}
    save_file(zeros, str(paths["zero"] / "model.safetensors"), metadata={"format": "pt"})

    jobs = []
    for name, text in CONFIGS.items():
        config = root / f"{name}.yml"
        config.write_text(text.format(**paths) + "dtype: float32\n")
        jobs.append((str(config), str(root / f"mergekit-{name}")))
    driver = ("import sys, json\nfrom mergekit.scripts.run_yaml import main\n"
              "for config, out in json.loads(sys.argv[1]):\n"
              "    main([config, out, '--no-cuda', '--quiet', '--random-seed', '0'], standalone_mode=False)\n")
    python = MERGEKIT_YAML.read_text(errors="replace").splitlines()[0].removeprefix("#!").strip()  # its interpreter
    proc = subprocess.run([python, "-c", driver, json.dumps(jobs)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for name in CONFIGS:
        executor.run(Runtime(load_recipe(root / f"{name}.yml"), Store(root / "store")))
        out[name] = (load_file(str(root / f"mergekit-{name}" / "model.safetensors")),
                     load_file(str(root / f"{name}-merged" / "model.safetensors")), root)
    return out


def parity(ours: dict, theirs: dict) -> tuple[float, bool]:
    """(largest absolute difference, whether every tensor has the same bytes)."""
    assert sorted(ours) == sorted(theirs)
    worst, same = 0.0, True
    for name, want in theirs.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        worst = max(worst, float((got.double() - want.double()).abs().max()))
        same = same and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    return worst, same


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_same_bytes_as_mergekit(outputs, name):
    theirs, ours, _ = outputs[name]
    worst, same = parity(ours, theirs)
    print(f"\nparity {name}: max abs diff {worst:.3g}, bit-exact {same}")
    assert same, f"{name}: max abs diff {worst:.3g}"


def test_passthrough_writes_the_layer_count(outputs):
    _, ours, root = outputs["passthrough"]
    mine = json.loads((root / "passthrough-merged" / "config.json").read_text())
    theirs = json.loads((root / "mergekit-passthrough" / "config.json").read_text())
    assert mine["num_hidden_layers"] == theirs["num_hidden_layers"] == 4
    assert sum(1 for n in ours if n.endswith("self_attn.o_proj.weight")) == 4


def test_della_rescale_matches_mergekit_given_its_mask(outputs):
    """Base zero and one model: mergekit's output is the model's kept entries rescaled to its L1
    norm, so its mask is where the output is non-zero; fmerge's rescale on that mask gives its bytes."""
    from fmerge.methods.sparse_task_vectors import rescale_to_l1

    theirs, _, root = outputs["della"]
    model = load_file(str(root / "m1" / "model.safetensors"))
    for name, out in theirs.items():
        keep = (out != 0).to(torch.float32)
        # equal values; dropped entries are −0 before mergekit adds them to the zero base, +0 after
        assert torch.equal(rescale_to_l1(model[name], keep), out), name


def test_della_keep_rates_agree_with_mergekit(outputs):
    """Both tools keep about `density` of the entries, the largest-magnitude third most often."""
    theirs, ours, root = outputs["della"]
    model = load_file(str(root / "m1" / "model.safetensors"))
    rates = {}
    for tool, merged in (("mergekit", theirs), ("fmerge", ours)):
        kept, thirds = 0, torch.zeros(3)
        total, counts = 0, torch.zeros(3)
        for name, out in merged.items():
            if out.dim() != 2:
                continue
            ranks = model[name].abs().argsort(dim=1).argsort(dim=1).float() / (out.shape[1] - 1)
            third = (ranks * 3).clamp(max=2.999).long()
            keep = out != 0
            kept, total = kept + int(keep.sum()), total + keep.numel()
            thirds += torch.bincount(third[keep], minlength=3).float()
            counts += torch.bincount(third.flatten(), minlength=3).float()
        rates[tool] = (kept / total, (thirds / counts).tolist())
    for tool, (overall, by_third) in rates.items():
        assert abs(overall - 0.4) < 0.01, (tool, overall)
        # keep probability rises linearly from 0.2 to 0.6 over the ranks: thirds ≈ 0.267, 0.4, 0.533
        for got, want in zip(by_third, (0.2 + 0.4 / 6, 0.4, 0.6 - 0.4 / 6)):
            assert abs(got - want) < 0.02, (tool, by_third)
