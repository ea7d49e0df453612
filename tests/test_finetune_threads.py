"""Fine-tuning draws from generators of its own: two fine-tunes in two threads of one process (or
a thread drawing from torch's global generator meanwhile) give the single-thread weights bit for bit."""

from __future__ import annotations

import threading

import torch

from fmerge.finetune import finetune_classifier, fresh_classifier, tensor_batches
from test_demo_data import _synthetic


def save_base(path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, initializer_range=0.05)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)


def finetuned(base, seed: int) -> dict[str, torch.Tensor]:
    model = fresh_classifier(base, num_labels=2, seed=seed)
    finetune_classifier(model, tensor_batches(_synthetic(), 32, seed), steps=6, lr=1e-2, weight_decay=0.01,
                        warmup=0.1, device="cpu")
    return model.state_dict()


def test_the_new_head_is_drawn_from_its_own_generator(tmp_path):
    save_base(tmp_path / "base")
    torch.manual_seed(1)  # whatever the global generator holds
    model = fresh_classifier(tmp_path / "base", num_labels=3, seed=7)
    expected = torch.randn(3, 32, generator=torch.Generator().manual_seed(7)) * 0.05
    assert torch.equal(model.classifier.weight.detach(), expected)
    assert torch.equal(model.classifier.bias.detach(), torch.zeros(3))


def test_two_finetunes_in_two_threads_equal_a_single_thread_run_bit_for_bit(tmp_path, one_thread):
    save_base(tmp_path / "base")
    alone = {seed: finetuned(tmp_path / "base", seed) for seed in (0, 1)}
    results: dict[int, dict] = {}
    stop = threading.Event()

    def train(seed):
        results[seed] = finetuned(tmp_path / "base", seed)

    def churn():  # another user of torch's global generator in the same process
        while not stop.is_set():
            torch.manual_seed(12345)
            torch.rand(1000)

    from transformers import PreTrainedModel

    tie_weights = PreTrainedModel.tie_weights  # from_pretrained swaps it during a load and back
    threads = [threading.Thread(target=train, args=(s,)) for s in (0, 1)]
    noise = threading.Thread(target=churn)
    noise.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    stop.set()
    noise.join(timeout=60)
    assert set(results) == {0, 1}
    for seed in (0, 1):
        assert results[seed].keys() == alone[seed].keys()
        for name, tensor in alone[seed].items():
            assert torch.equal(results[seed][name], tensor), (seed, name)
    assert not torch.equal(alone[0]["classifier.weight"], alone[1]["classifier.weight"])
    # Two loads at once must not leave transformers' placeholder behind (every later model untied).
    assert PreTrainedModel.tie_weights is tie_weights
