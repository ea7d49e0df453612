"""Worker for test_fisher's distributed check, and the tiny model, tokenizer and data it shares
with the tests.

Under `torchrun --nproc_per_node 2` each rank computes the Fisher of its rank::world_size shard,
the sums are all-reduced, and rank 0 saves them to the path given as the first argument. The
test calls `shard_fisher(..., rank=0, world_size=1)` in-process for the single-process answer.
"""

from __future__ import annotations

import sys

import torch

WORDS = "the a cat dog sat ran on under mat rug big small red blue fast slow and then it was".split()
ESTIMATORS = ("exact", "sampled", "empirical")


def tiny_tokenizer():
    """A word-level BERT-style tokenizer built in memory (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tiny_bert(num_labels: int = 3, seed: int = 0, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels, initializer_range=0.2, hidden_dropout_prob=0.3,
    )
    return BertForSequenceClassification(BertConfig(**{**config, **overrides}))


def tiny_rows(n: int = 10, seed: int = 1) -> dict[str, list]:
    """Sentences of varied length with labels 0..2."""
    g = torch.Generator().manual_seed(seed)
    rows = {"text": [], "label": []}
    for _ in range(n):
        length = int(torch.randint(2, 12, (1,), generator=g))
        rows["text"].append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)))
        rows["label"].append(int(torch.randint(0, 3, (1,), generator=g)))
    return rows


def shard_fisher(estimator: str, rank: int, world_size: int):
    from datasets import Dataset

    from fmerge.data import DataSpec, encode_batches
    from fmerge.data import shard_by_rank
    from fmerge.fisher import fisher_diagonal

    spec = DataSpec(path="memory")
    shard = shard_by_rank(Dataset.from_dict(tiny_rows()), rank, world_size)
    batches = encode_batches(tiny_tokenizer(), shard, spec, batch_size=3, max_length=32)
    return fisher_diagonal(tiny_bert(), batches, estimator, samples=2, seed=7)


def main(out_path: str) -> None:
    import torch.distributed as dist

    from fmerge.fisher import allreduce_sums

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {}
    for estimator in ESTIMATORS:
        fs = allreduce_sums(shard_fisher(estimator, rank, world_size))
        results[estimator] = {"sums": fs.sums, "count": fs.count, "examples": fs.examples}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
