"""The causal-LM Fisher, per token, against a plain loop over tokens.

The reference runs one unpadded sequence at a time and, for every predicted token alone, one
backward pass of that token's log-likelihood (weighted per the estimator), squares the gradient
and adds it up; the estimate is the sum divided by the number of predicted tokens. The engine
must agree whatever the batch size, chunk size, padding side and padding width, with prompt
tokens (label -100) left out.
"""

from __future__ import annotations

import pytest
import torch

from fmerge.errors import FmergeError
from fmerge.fisher import example_generator, fisher_diagonal
from test_fisher import assert_fisher_close, first_at_least

LENGTHS = [5, 9, 3, 12, 7, 4]
PROMPT = {1: 4, 3: 2}  # example -> number of leading prompt tokens (label -100)
LAYOUTS = [  # (batch size, chunk size, padding side, extra padding on every batch)
    (6, 32, "right", 0),
    (2, 1, "left", 3),
    (4, 3, "right", 2),
]


def tiny_causal_lm(arch: str, vocab: int = 60):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    if arch == "gpt2":  # tied input and output embeddings, Conv1D layers, learned positions
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)
    # RMSNorm (the generic torch.func path) and rotary positions
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def make_sequences(vocab: int = 60, lengths=LENGTHS) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i, length in enumerate(lengths):
        ids = torch.randint(1, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: PROMPT.get(i, 0)] = -100
        out.append({"input_ids": ids, "labels": labels, "id": 200 + 3 * i})
    return out


def padded_batches(sequences, batch_size: int, side: str = "right", extra: int = 0):
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s["input_ids"]) for s in chunk) + extra
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full_like(ids, 5)  # junk under padding: the mask must exclude it
        mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):
            n = len(s["input_ids"])
            where = slice(width - n, width) if side == "left" else slice(0, n)
            ids[row, where], labels[row, where], mask[row, where] = s["input_ids"], s["labels"], 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "example_ids": torch.tensor([s["id"] for s in chunk])}


def loop_token_fisher(model, sequences, estimator: str, samples: int = 1, seed: int = 0):
    """Brute force: per sequence, per predicted token, Σ weight · (∇ log p(y | x_<t))², one backward each."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    tokens = 0
    for s in sequences:
        ids = s["input_ids"]
        log_p = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0], -1)
        uniforms = torch.rand(len(ids), samples, generator=example_generator(seed, s["id"]))
        for t in range(1, len(ids)):
            if s["labels"][t] == -100:
                continue
            tokens += 1
            row = log_p[t - 1]
            p = row.exp().detach()
            if estimator == "empirical":
                terms = [(1.0, row[ids[t]])]
            elif estimator == "exact":
                terms = [(p[c], row[c]) for c in range(len(row))]
            else:
                terms = [(1.0 / samples, row[first_at_least(p.cumsum(0), float(u))]) for u in uniforms[t]]
            for weight, term in terms:
                grads = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
                for name, grad in zip(params, grads):
                    if grad is not None:
                        sums[name] += weight * grad**2
    return {name: s / tokens for name, s in sums.items()}, tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("estimator,samples", [("empirical", 1), ("sampled", 2)])
def test_per_token_fisher_matches_token_loop(arch, estimator, samples):
    model = tiny_causal_lm(arch)
    sequences = make_sequences()
    reference, tokens = loop_token_fisher(model, sequences, estimator, samples, seed=3)
    assert tokens == sum(n - 1 for n in LENGTHS) - sum(k - 1 for k in PROMPT.values())
    for batch_size, chunk_size, side, extra in LAYOUTS:
        fs = fisher_diagonal(model, padded_batches(sequences, batch_size, side, extra), estimator,
                             samples=samples, seed=3, chunk_size=chunk_size)
        assert (fs.count, fs.count_unit, fs.examples) == (tokens, "tokens", len(sequences))
        assert_fisher_close(fs.mean(), reference)


def test_per_token_differs_from_per_sequence_square():
    """Guards against a comparison that cannot fail: squaring each sequence's summed gradient
    (the old estimator) keeps cross-token terms and gives another answer."""
    model = tiny_causal_lm("llama")
    sequences = make_sequences()[:3]
    per_token = fisher_diagonal(model, padded_batches(sequences, 3), "empirical").sums
    name = "model.layers.0.mlp.up_proj.weight"
    per_sequence = torch.zeros_like(per_token[name])
    for s in sequences:
        log_p = torch.log_softmax(model(input_ids=s["input_ids"][None]).logits[0, :-1], -1)
        counted = s["labels"][1:] != -100
        total = log_p[torch.arange(len(log_p)), s["input_ids"][1:]][counted].sum()
        per_sequence += torch.autograd.grad(total, [model.get_parameter(name)])[0] ** 2
    assert not torch.allclose(per_token[name], per_sequence, rtol=0.1)


def test_sampled_draws_do_not_depend_on_layout():
    model = tiny_causal_lm("gpt2")
    sequences = make_sequences()
    a = fisher_diagonal(model, padded_batches(sequences, 6), "sampled", samples=2, seed=9)
    b = fisher_diagonal(model, padded_batches(sequences, 1, "left", 4), "sampled", samples=2, seed=9, chunk_size=1)
    c = fisher_diagonal(model, padded_batches(sequences, 6), "sampled", samples=2, seed=10)
    assert_fisher_close(a.sums, b.sums)
    assert not torch.allclose(a.sums["transformer.wte.weight"], c.sums["transformer.wte.weight"], rtol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_for_a_tiny_vocabulary_matches_token_loop(arch):
    model = tiny_causal_lm(arch, vocab=12)
    sequences = make_sequences(vocab=12, lengths=[4, 6])
    reference, tokens = loop_token_fisher(model, sequences, "exact")
    fs = fisher_diagonal(model, padded_batches(sequences, 2, "left", 1), "exact")
    assert fs.count == tokens
    assert_fisher_close(fs.mean(), reference)


def test_exact_is_refused_for_a_big_vocabulary():
    model = tiny_causal_lm("gpt2", vocab=300)
    with pytest.raises(FmergeError, match=r"300 entries.*'sampled'"):
        fisher_diagonal(model, padded_batches(make_sequences(), 3), "exact")


def test_target_outside_vocabulary_is_named():
    model = tiny_causal_lm("llama")
    batch = next(padded_batches(make_sequences(), 3))
    batch["labels"][0, 2] = 70
    with pytest.raises(FmergeError, match=r"Target token id 70 .*0\.\.59"):
        fisher_diagonal(model, [batch], "empirical")


def test_fisher_command_on_a_causal_lm_equals_token_loop(tmp_path):
    """`fmerge fisher --model <a tiny Llama> --data <texts>`: the causal LM and its text data (no
    label column) go through the step; the export is the per-token Fisher of a loop built here."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hostile
    from test_lm_eval import make_tiny_lm, write_jsonl

    texts = ["the cat sat on the mat", "a dog ran to the park and it saw a bird", "red car",
             "what is the capital of france", "the sky is blue and the tree is green"]
    make_tiny_lm(tmp_path / "lm")
    write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    result = hostile.run(["fisher", "--model", "lm", "--data", "texts.jsonl", "--estimator", "empirical",
                          "--examples", "5", "--batch-size", "2", "--export", "f.safetensors", "--store", "store"],
                         cwd=tmp_path)
    assert result.code == 0, result.err
    exported = load_file(tmp_path / "f.safetensors")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    sequences = []
    for i, text in enumerate(texts):  # each text after BOS, every token scored
        ids = torch.tensor([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]])
        sequences.append({"input_ids": ids, "labels": ids, "id": i})
    reference, tokens = loop_token_fisher(model, sequences, "empirical")
    assert tokens == sum(len(t.split()) for t in texts)
    assert_fisher_close(exported, reference)


def test_fisher_command_refuses_exact_for_a_big_vocabulary(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import hostile
    from test_lm_eval import save_tokenizer, write_jsonl

    config = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    save_tokenizer(tmp_path / "lm")
    write_jsonl(tmp_path / "texts.jsonl", [{"text": "the cat sat"}])
    result = hostile.run(["fisher", "--model", "lm", "--data", "texts.jsonl", "--store", "store"], cwd=tmp_path)
    hostile.assert_refused(result, "1000 entries", "'sampled'")


def test_windows_of_one_text_count_as_one_example():
    """The data cuts a long text into windows that share its example id: the step extends a
    cached Fisher by rows, so `examples` must count rows, not windows."""
    sequences = make_sequences()
    windows = [dict(s, id=sequences[i - i % 2]["id"]) for i, s in enumerate(sequences)]  # pairs share an id
    fs = fisher_diagonal(tiny_causal_lm("llama"), padded_batches(windows, 4), "empirical")
    assert fs.examples == len(sequences) // 2
    assert fs.count == sum(n - 1 for n in LENGTHS) - sum(k - 1 for k in PROMPT.values())
