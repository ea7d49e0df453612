"""The Fisher engine against a plain per-example loop, and the data module's user errors.

Every reference below runs one unpadded example at a time: model(...), then torch.autograd.grad
of each log-likelihood term, squared and weighted. The engine must agree to 1e-5 (relative, per
tensor) whatever the batch size, chunk size and padding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _fisher_dist_worker import ESTIMATORS, shard_fisher, tiny_bert, tiny_tokenizer
from fmerge.data import DataSpec, encode_batches, label_names_for, label_targets, load_dataset_split, select_examples
from fmerge.errors import FmergeError
from fmerge.data import shard_by_rank
from fmerge.fisher import example_generator, fisher_diagonal

LENGTHS = [5, 9, 3, 12, 7, 4]
LAYOUTS = [  # (batch size, chunk size, extra padding on every batch)
    (6, 32, 0),
    (2, 1, 5),
    (4, 3, 2),
]


def make_examples(vocab: int = 100, seed: int = 3, regression: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, length in enumerate(LENGTHS):
        label = torch.randn((), generator=g) if regression else torch.randint(0, 3, (), generator=g)
        examples.append({
            # example 1 holds the pad id as a real token: PyTorch never updates a padding_idx row
            "input_ids": torch.randint(4, vocab, (length,), generator=g).index_fill_(0, torch.tensor([2]), 0)
            if i == 1 else torch.randint(4, vocab, (length,), generator=g),
            "token_type_ids": torch.randint(0, 2, (length,), generator=g),
            "label": label,
            "id": 100 + i,  # ids that are not positions: the draws must follow them
        })
    return examples


def pad_batches(examples: list[dict], batch_size: int, extra: int = 0, token_types: bool = True):
    """Right-padded batches; `extra` pads even each batch's longest example."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk) + extra
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
        for row, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[row, :n], types[row, :n], mask[row, :n] = e["input_ids"], e["token_type_ids"], 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([e["label"] for e in chunk]),
                 "example_ids": torch.tensor([e["id"] for e in chunk])}
        if token_types:
            batch["token_type_ids"] = types
        yield batch


def loop_fisher(model, examples, terms, token_types: bool = True) -> dict[str, torch.Tensor]:
    """Brute force: per example, Σ over (weight, log-likelihood) terms of weight · grad²."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    for e in examples:
        inputs = {"input_ids": e["input_ids"][None]}
        if token_types:
            inputs["token_type_ids"] = e["token_type_ids"][None]
        output = model(**inputs).logits[0]
        for weight, term in terms(output, e):
            grads = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    sums[name] += weight * grad**2
    return sums


def first_at_least(cdf: torch.Tensor, u: float) -> int:
    """Inverse-CDF sampling, written out: the first class whose cumulative mass reaches u."""
    return next(c for c in range(len(cdf)) if cdf[c] >= u * cdf[-1])


def classifier_terms(estimator: str, samples: int = 1, seed: int = 0):
    def terms(logits, e):
        log_p = torch.log_softmax(logits, -1)
        p = log_p.exp().detach()
        if estimator == "exact":
            return [(p[c], log_p[c]) for c in range(len(p))]
        if estimator == "empirical":
            return [(1.0, log_p[e["label"]])]
        draws = torch.rand(samples, generator=example_generator(seed, e["id"]))
        return [(1.0 / samples, log_p[first_at_least(p.cumsum(0), u)]) for u in draws.tolist()]

    return terms


def assert_fisher_close(sums: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float = 1e-5):
    """Per tensor, ‖a − b‖ ≤ rtol‖b‖; tensors whose true gradient is zero (e.g. attention key
    biases) only carry rounding noise, which a floor of 1e-7 of the whole Fisher's norm absorbs."""
    assert sums.keys() == reference.keys()
    total = torch.sqrt(sum(r.double().norm() ** 2 for r in reference.values()))
    assert total > 0
    for name, ref in reference.items():
        err = (sums[name].double() - ref.double()).norm()
        assert err <= rtol * ref.double().norm() + 1e-7 * total, f"{name}: error {err:.3g}, norm {ref.norm():.3g}"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def classifier():
    return tiny_bert()


@pytest.fixture(scope="module")
def examples():
    return make_examples()


@pytest.mark.parametrize("estimator,samples", [("exact", 1), ("empirical", 1), ("sampled", 3)])
def test_classifier_estimators_match_loop_in_every_layout(classifier, examples, estimator, samples):
    reference = loop_fisher(classifier, examples, classifier_terms(estimator, samples, seed=5))
    classifier.train()  # the engine must switch dropout off, and restore the mode
    for batch_size, chunk_size, extra in LAYOUTS:
        fs = fisher_diagonal(classifier, pad_batches(examples, batch_size, extra), estimator,
                             samples=samples, seed=5, chunk_size=chunk_size)
        assert (fs.count, fs.examples, fs.count_unit) == (len(examples), len(examples), "examples")
        assert_fisher_close(fs.sums, reference)
    assert classifier.training
    assert all(p.requires_grad for p in classifier.parameters())


@pytest.mark.parametrize("num_labels", [2, 5])
def test_exact_for_other_class_counts(examples, num_labels):
    model = tiny_bert(num_labels=num_labels, seed=num_labels)
    reference = loop_fisher(model, examples, classifier_terms("exact"))
    assert_fisher_close(fisher_diagonal(model, pad_batches(examples, 4, extra=1), "exact").sums, reference)


def test_estimators_differ_and_seed_matters(classifier, examples):
    """Guards against a comparison that cannot fail: the estimators are different quantities."""
    exact = fisher_diagonal(classifier, pad_batches(examples, 6), "exact")
    empirical = fisher_diagonal(classifier, pad_batches(examples, 6), "empirical")
    seeds = [fisher_diagonal(classifier, pad_batches(examples, 6), "sampled", seed=s) for s in (0, 1)]
    name = "classifier.weight"
    assert not torch.allclose(exact.sums[name], empirical.sums[name], rtol=1e-3)
    assert not torch.allclose(seeds[0].sums[name], seeds[1].sums[name], rtol=1e-3)


def test_sampled_is_unbiased_for_exact(classifier, examples):
    exact = fisher_diagonal(classifier, pad_batches(examples, 6), "exact")
    sampled = fisher_diagonal(classifier, pad_batches(examples, 6), "sampled", samples=200, seed=1)
    flat = lambda fs: torch.cat([t.flatten() for t in fs.sums.values()])  # noqa: E731
    a, b = flat(sampled), flat(exact)
    assert (a - b).norm() / b.norm() < 0.1
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99


def test_param_filter_selects_tensors(classifier, examples):
    full = fisher_diagonal(classifier, pad_batches(examples, 3), "exact")
    only = fisher_diagonal(classifier, pad_batches(examples, 3), "exact", param_filter=lambda n: "embeddings" in n)
    assert only.sums and all("embeddings" in n for n in only.sums)
    assert_fisher_close(only.sums, {n: full.sums[n] for n in only.sums})


def test_regression_gaussian_fisher_matches_loop():
    model = tiny_bert(num_labels=1, seed=2)
    examples = make_examples(regression=True)

    def terms(estimator):
        def each(output, e):
            f = output[0]
            if estimator == "exact":
                return [(1.0, f)]
            if estimator == "empirical":
                return [((e["label"] - f.detach()) ** 2, f)]
            noise = torch.randn(2, 1, generator=example_generator(0, e["id"]))
            return [(float(z) ** 2 / 2, f) for z in noise[:, 0]]
        return each

    for estimator in ("exact", "empirical", "sampled"):
        reference = loop_fisher(model, examples, terms(estimator))
        fs = fisher_diagonal(model, pad_batches(examples, 4, extra=3), estimator, samples=2, chunk_size=3)
        assert fs.count == len(examples)
        assert_fisher_close(fs.sums, reference)


def test_fusionbench_matches_its_definition(classifier, examples):
    """Per batch: square Σ_n Σ_c sqrt(p_nc)·∇log p_nc, built here from unpadded per-example grads."""
    params = dict(classifier.named_parameters())
    classifier.eval()
    reference = {n: torch.zeros_like(p) for n, p in params.items()}
    batch_size = 4
    for start in range(0, len(examples), batch_size):
        batch_grad = {n: torch.zeros_like(p) for n, p in params.items()}
        for e in examples[start : start + batch_size]:
            logits = classifier(input_ids=e["input_ids"][None], token_type_ids=e["token_type_ids"][None]).logits[0]
            log_p = torch.log_softmax(logits, -1)
            for c in range(len(log_p)):
                grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True, allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        batch_grad[n] += log_p[c].exp().detach().sqrt() * g
        for n in params:
            reference[n] += batch_grad[n] ** 2
    fs = fisher_diagonal(classifier, pad_batches(examples, batch_size, extra=2), "fusionbench")
    assert fs.count == len(examples)
    assert_fisher_close(fs.sums, reference)
    other = fisher_diagonal(classifier, pad_batches(examples, 2), "fusionbench")
    assert not torch.allclose(other.sums["classifier.weight"], fs.sums["classifier.weight"], rtol=1e-3)


def test_fusionbench_vanishes_on_uniform_predictions(examples):
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    fusionbench = fisher_diagonal(model, pad_batches(examples, 6), "fusionbench")
    exact = fisher_diagonal(model, pad_batches(examples, 6), "exact")
    assert exact.sums["classifier.weight"].sum() > 1e-3
    assert fusionbench.sums["classifier.weight"].abs().max() < 1e-12


def test_label_outside_head_is_an_error(classifier, examples):
    bad = [dict(e, label=torch.tensor(3)) if i == 2 else e for i, e in enumerate(examples)]
    with pytest.raises(FmergeError, match=r"Label 3 .*0\.\.2"):
        fisher_diagonal(classifier, pad_batches(bad, 3), "empirical")


def test_distributed_sums_equal_single_process(tmp_path):
    out = tmp_path / "sums.pt"
    worker = Path(__file__).with_name("_fisher_dist_worker.py")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out)
    for estimator in ESTIMATORS:
        single = shard_fisher(estimator, rank=0, world_size=1)
        assert (results[estimator]["count"], results[estimator]["examples"]) == (single.count, single.examples)
        assert_fisher_close(results[estimator]["sums"], single.sums)


def test_shard_keeps_global_example_ids():
    from datasets import Dataset

    ds = Dataset.from_dict({"text": list("abcdefg")})
    shards = [shard_by_rank(ds, r, 3) for r in range(3)]
    assert [s["text"] for s in shards] == [list("adg"), list("be"), list("cf")]
    assert sorted(i for s in shards for i in s["fmerge_example_id"]) == list(range(7))


# ---------------------------------------------------------------- data.py


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_encode_pairs_and_string_labels(tmp_path):
    rows = [{"premise": f"the cat sat {'on the mat ' * i}", "hypothesis": "a dog ran", "y": lab}
            for i, lab in enumerate(["pos", "neg", "neu", "pos", "neg"])]
    spec = DataSpec(path=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), text_column="premise",
                    text_pair_column="hypothesis", label_column="y")
    ds = load_dataset_split(spec)
    names = label_names_for(ds, spec)
    assert names == ["neg", "neu", "pos"]
    targets = label_targets(ds, spec, 3, names)
    assert targets.tolist() == [2, 0, 1, 2, 0]
    mapped = ds.remove_columns("y").add_column("y", targets)
    batches = list(encode_batches(tiny_tokenizer(), mapped, spec, batch_size=2, max_length=12))
    assert [b["labels"].tolist() for b in batches] == [[2, 0], [1, 2], [0]]
    assert [b["example_ids"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    first = batches[0]
    assert first["input_ids"].shape == first["token_type_ids"].shape == first["attention_mask"].shape
    assert first["token_type_ids"].max() == 1
    lengths = first["attention_mask"].sum(1)
    assert lengths.max() == first["input_ids"].shape[1] <= 12  # padded to the batch's longest row
    assert (first["input_ids"][0, lengths[0]:] == 0).all()  # on the right
    with pytest.raises(FmergeError, match="label_names"):
        label_targets(ds, spec, 3)
    with pytest.raises(FmergeError, match="row 3 .*'neu'"):
        label_targets(ds, spec, 2, ["neg", "pos"])
    with pytest.raises(FmergeError, match="not mapped by the label rule"):  # raw strings never reach a batch
        next(encode_batches(tiny_tokenizer(), ds, spec, 2, 12))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FmergeError, match="does not exist") as err:
        load_dataset_split(DataSpec(path=str(missing)))
    assert str(missing) in str(err.value)


def test_missing_columns_are_listed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a b", "label": 0}, {"sentence": "c", "label": 1}])
    with pytest.raises(FmergeError, match=r"no column 'text'.*sentence, label"):
        load_dataset_split(DataSpec(path=str(path)))
    with pytest.raises(FmergeError, match=r"no column 'gold'.*label_column"):
        load_dataset_split(DataSpec(path=str(path), text_column="sentence", label_column="gold"))
    assert len(load_dataset_split(DataSpec(path=str(path), text_column="sentence", label_column=None))) == 2


def test_empty_dataset_is_an_error(tmp_path):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("text,label\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("")
    for path in (header_only, blank):
        with pytest.raises(FmergeError, match="no rows") as err:
            load_dataset_split(DataSpec(path=str(path)))
        assert str(path) in str(err.value)


def test_label_targets_name_value_column_and_range(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": i} for i in (0, 2, 5, 1)])
    spec = DataSpec(path=str(path))
    ds = load_dataset_split(spec)
    assert label_targets(ds, spec, num_labels=6).tolist() == [0, 2, 5, 1]
    with pytest.raises(FmergeError, match=r"row 3 of label column 'label' holds 5, .*0\.\.2"):
        label_targets(ds, spec, num_labels=3)


def test_select_examples_is_seeded_random_and_extends(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}", "label": i % 3} for i in range(50)])
    ds = load_dataset_split(DataSpec(path=str(path)))
    a = select_examples(ds, 10, seed=0)
    b = select_examples(ds, 10, seed=0)
    c = select_examples(ds, 10, seed=1)
    assert a["text"] == b["text"]
    assert a["text"] != c["text"]
    assert select_examples(ds, 15, seed=0)["text"][:10] == a["text"]  # more rows extend fewer
    assert a["text"] != ds.select(range(10))["text"]
    assert len(set(a["text"])) == 10
    with pytest.raises(FmergeError, match="only 50 rows"):
        select_examples(ds, 51, seed=0)
