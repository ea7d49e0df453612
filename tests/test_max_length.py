"""Token budgets (issue 22, part 3): whatever `max_length` a route asks for is capped at the
model's position table, and texts are cut to a character budget before they are tokenized."""

from __future__ import annotations

import json
import time

import pytest

from conftest import make_zoo
from hostile import run
from test_lm_eval import WORDS, save_tokenizer, write_jsonl

from fmerge.compat import usable_positions
from fmerge.data import CHARS_PER_TOKEN, DataSpec, encode_batches


def test_usable_positions_read_from_the_config():
    assert usable_positions({"model_type": "bert", "max_position_embeddings": 512}) == 512
    assert usable_positions({"model_type": "gpt2", "n_positions": 1024}) == 1024
    # RoBERTa numbers positions from padding_idx + 1: 514 rows, 512 usable
    assert usable_positions({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512
    assert usable_positions({"model_type": "t5", "d_model": 16}) is None


@pytest.fixture
def classifier(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", n_models=1)  # tiny BERT: 32 positions
    save_tokenizer(zoo["task0"])
    return zoo["task0"]


def long_rows(n: int = 6, words: int = 300) -> list[dict]:
    return [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)), "label": i % 2} for i in range(n)]


def test_eval_and_fisher_of_texts_longer_than_the_position_table(tmp_path, classifier):
    data = write_jsonl(tmp_path / "long.jsonl", long_rows())

    def scores(*extra):
        result = run(["eval", classifier, "--data", data, "--store", tmp_path / "st", "--json", *extra])
        assert result.code == 0, result.err
        return json.loads(result.out)["scores"][0]["metrics"]

    # the default (512 tokens) asks for more than the model's 32 positions: read as 32, not a crash
    assert scores() == scores("--max-length", "32")
    result = run(["fisher", "--model", classifier, "--data", data, "--examples", "4", "--estimator", "exact",
                  "--store", tmp_path / "st"])
    assert result.code == 0, result.err


def test_texts_are_cut_to_characters_before_tokenizing_without_changing_the_tokens(classifier):
    from transformers import AutoTokenizer
    from datasets import Dataset

    tok = AutoTokenizer.from_pretrained(classifier)
    rows = long_rows(4, words=50) + [{"text": "", "label": 0}, {"text": WORDS[0] * 3, "label": 1}]
    spec = DataSpec(path="x", text_column="text", label_column="label", split="test")
    for max_length in (4, 16, 32):
        (batch,) = encode_batches(tok, Dataset.from_list(rows), spec, len(rows), max_length)
        # reference: the whole texts, tokenized and truncated by the tokenizer itself
        want = tok([r["text"] for r in rows], truncation=True, max_length=max_length)["input_ids"]
        got = [ids[:int(mask.sum())] for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"])]
        assert got == want, max_length


def test_a_huge_row_costs_the_character_budget_only(classifier):
    from transformers import AutoTokenizer
    from datasets import Dataset

    tok = AutoTokenizer.from_pretrained(classifier)
    huge = " ".join(WORDS[j % len(WORDS)] for j in range(2_000_000))  # ~10 MB, ~2M tokens
    spec = DataSpec(path="x", text_column="text", label_column=None, split="test")
    start = time.process_time()
    (batch,) = encode_batches(tok, Dataset.from_list([{"text": huge}]), spec, 1, 32)
    assert batch["input_ids"].shape == (1, 32)
    assert batch["input_ids"][0].tolist() == tok(huge[:CHARS_PER_TOKEN * 32], truncation=True, max_length=32)["input_ids"]
    assert time.process_time() - start < 60  # a hang guard: tokenizing the whole row takes far longer


def test_one_default_on_every_route():
    import inspect

    from fmerge import api, cli
    from fmerge.compat import DEFAULT_MAX_LENGTH
    from fmerge.steps import step_kinds

    kinds = step_kinds()
    steps = {k: kinds[k].Config.model_fields["max_length"].default for k in kinds
             if "max_length" in kinds[k].Config.model_fields}
    assert {"eval", "finetune", "fisher", "gram", "kfac", "adamerging", "frank_wolfe", "frank_wolfe_soft"} <= set(steps)
    functions = {f.__name__: inspect.signature(f).parameters["max_length"].default
                 for f in (api.fisher, api.fisher_many, api.evaluate, cli.fisher, cli.eval_command)}
    assert set(steps.values()) | {getattr(d, "default", d) for d in functions.values()} == {DEFAULT_MAX_LENGTH}
