"""Token-level losses of a causal LM (AdaMerging / Frank-Wolfe objectives) against a loop over
unpadded sequences and their tokens."""

from __future__ import annotations

import math

import pytest
import torch

from fmerge.fisher import causal_lm_extras
from fmerge.objective import next_token_losses, predicted_tokens, token_loss_sum
from test_fisher_lm import LENGTHS, PROMPT, make_sequences, padded_batches, tiny_causal_lm


def loop_token_loss(model, sequences, loss: str) -> tuple[float, int]:
    """Σ over sequences and counted tokens of −log p(y_t | x_<t), or of −Σ_v p_v log p_v, written out."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for s in sequences:
            logits = model(input_ids=s["input_ids"][None], use_cache=False).logits[0].double()
            for t in range(1, len(s["input_ids"])):
                if s["labels"][t] == -100:
                    continue
                row = logits[t - 1]
                log_z = math.log(sum(math.exp(float(v)) for v in row))
                if loss == "cross_entropy":
                    total += log_z - float(row[s["input_ids"][t]])
                else:
                    total -= sum(math.exp(float(v) - log_z) * (float(v) - log_z) for v in row)
                tokens += 1
    return total, tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("loss", ["cross_entropy", "entropy"])
def test_token_losses_equal_loop_whatever_the_padding(arch, loss):
    model = tiny_causal_lm(arch).eval()
    sequences = make_sequences()
    reference, tokens = loop_token_loss(model, sequences, loss)
    assert tokens == sum(n - 1 for n in LENGTHS) - sum(k - 1 for k in PROMPT.values())
    for batch_size, side, extra in ((6, "right", 0), (4, "left", 2), (2, "right", 3)):
        total, count = 0.0, 0
        for batch in padded_batches(sequences, batch_size, side, extra):
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               **causal_lm_extras(batch, {"use_cache", "position_ids"})).logits
            s, n = token_loss_sum(logits, batch, loss)
            assert n == predicted_tokens(batch)
            total, count = total + float(s), count + n
        assert count == tokens
        assert abs(total - reference) <= 1e-5 * abs(reference), (total, reference)


def test_losses_at_positions_that_do_not_count_are_zero_and_carry_no_gradient():
    batch = next(padded_batches(make_sequences(), 3, "left", 2))
    logits = torch.randn(*batch["input_ids"].shape, 60, requires_grad=True)
    per_token, valid = next_token_losses(logits, batch, "cross_entropy")
    assert (per_token[~valid] == 0).all() and (per_token[valid] > 0).all()
    per_token.sum().backward()
    pad_columns = batch["attention_mask"] == 0
    assert (logits.grad[pad_columns] == 0).all()
    assert (logits.grad[:, -1] == 0).all()  # the last position predicts nothing
