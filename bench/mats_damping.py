"""MaTS K-FAC damping on rank-deficient factors: what δ makes Σ_i (Ã_i ⊗ G̃_i) well-posed.

Three tiny BERT classifiers (hidden 16, the tests' size) around one base, K-FAC factors (`exact`)
from a few short random examples each, so several factors are rank-deficient. Per δ, over every
linear layer: in how many layers Σ Ã_i ⊗ G̃_i is not positive semi-definite when the factors are
rounded to fp32 (as kfac step version 1 stored them) and damped as before, the largest condition
number of the float64 system fmerge now builds, the most preconditioned CG steps fmerge runs (at
the default 300) and its largest error against the dense solve, and the price of the damping: the
damped solution's largest relative residual in the undamped system. About a minute of CPU.

    .venv/bin/python bench/mats_damping.py [--examples 4] [--tokens 8]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from fmerge.kfac import kfac_factors  # noqa: E402
from fmerge.methods import MergeContext, TensorGroup, get_method  # noqa: E402
from fmerge.methods.mats import MatsParams, damped_factor  # noqa: E402

DELTAS = (1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def classifiers(count: int) -> list[BertForSequenceClassification]:
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).state_dict()
    models = []
    for i in range(count):
        torch.manual_seed(1 + i)
        model = BertForSequenceClassification(config)
        model.load_state_dict({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                               for k, v in base.items()})
        models.append(model)
    return models


def dense(inputs, outputs, weights):
    """The Kronecker matrix Σ A_i ⊗ G_i (vec stacks columns), its right-hand side and solution."""
    m = sum(torch.kron(a, g) for a, g in zip(inputs, outputs))
    rhs = sum(torch.kron(a, g) @ w.T.reshape(-1) for a, g, w in zip(inputs, outputs, weights))
    return m, rhs, torch.linalg.solve(m, rhs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    models = classifiers(3)
    g = torch.Generator().manual_seed(0)
    factors = []
    for model in models:
        batch = {"input_ids": torch.randint(5, 64, (args.examples, args.tokens), generator=g),
                 "attention_mask": torch.ones(args.examples, args.tokens, dtype=torch.long)}
        factors.append(kfac_factors(model, [batch], "exact").factors())
    layers = list(factors[0])
    print(f"{len(layers)} linear layers, {args.examples} examples of {args.tokens} tokens per model")
    print("delta | fp32 factors: layers not PSD | float64: condition number max | CG steps max | CG error max | "
          "undamped residual max")
    for delta in DELTAS:
        not_psd = steps = 0
        cond = error = price = 0.0
        for n in layers:
            weights = [dict(m.named_parameters())[n].detach().double() for m in models]
            rounded = [(f[n][0].float().double(), f[n][1].float().double()) for f in factors]
            plain = sum(torch.kron(a + delta * a.diagonal().mean() * torch.eye(len(a), dtype=a.dtype),
                                   gg + delta * gg.diagonal().mean() * torch.eye(len(gg), dtype=gg.dtype))
                        for a, gg in rounded)
            not_psd += float(torch.linalg.eigvalsh(plain).min()) < 0
            a64 = [damped_factor(f[n][0], delta, 1.0)[0] for f in factors]
            g64 = [damped_factor(f[n][1], delta, 1.0)[0] for f in factors]
            m, rhs, solution = dense(a64, g64, weights)
            values = torch.linalg.eigvalsh(m)
            cond = max(cond, float(values.max() / values.min()))
            # the price of δ: how far the damped solution is from solving the undamped system
            undamped, undamped_rhs, _ = dense([f[n][0] for f in factors], [f[n][1] for f in factors], weights)
            price = max(price, float((undamped_rhs - undamped @ solution).norm() / undamped_rhs.norm()))
            group = TensorGroup(n, None, [w.float() for w in weights],
                                {"kfac_a": [f[n][0] for f in factors], "kfac_g": [f[n][1] for f in factors]})
            ctx = MergeContext(["a", "b", "c"])
            params = MatsParams(damping=delta, init="simple_average", max_residual=1.0)
            merged = get_method("mats").merge(group, params, ctx).double()
            steps = max(steps, ctx.diagnostics["mats"][n]["iterations"])
            error = max(error, float((merged.T.reshape(-1) - solution).norm() / solution.norm()))
        print(f"{delta:5.0e} | {not_psd:28d} | {cond:32.2g} | {steps:12d} | {error:12.1e} | {price:.1e}")

if __name__ == "__main__":
    main()
