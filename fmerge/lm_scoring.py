"""Scoring a causal LM: per-token log-likelihoods, perplexity and multiple-choice accuracy.

Pure functions on tensors. Labels follow the transformers convention: `labels[b, t]` is the
token at position t, predicted from the logits at position t - 1, and IGNORE_INDEX marks a
position that is not scored (padding, a prompt, the first token of a window).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

IGNORE_INDEX = -100


def target_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[:, t] | tokens before t) for t >= 1, shape [batch, length - 1]; 0 where not scored.
    Computed in float32 whatever the logits' dtype, so half-precision models lose nothing here."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def scored_count(labels: torch.Tensor) -> int:
    """How many tokens `labels` scores (position 0 never is: nothing comes before it)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of one batch; totals add up over batches."""
    return -float(target_logprobs(logits, labels).double().sum()), scored_count(labels)


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(total NLL / total scored tokens): the per-token perplexity over a whole dataset
    (not a mean of per-sequence perplexities)."""
    if tokens < 1:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_nll / tokens)


def sequence_logliks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-likelihood of its scored tokens (a continuation given its context)."""
    return target_logprobs(logits, labels).double().sum(-1)


def choice_accuracy(logliks: Sequence[Sequence[float]], choices: Sequence[Sequence[str]],
                    answers: Sequence[int]) -> dict[str, float]:
    """lm-evaluation-harness's multiple-choice accuracies: `acc` picks the choice with the highest
    summed log-likelihood, `acc_norm` the highest log-likelihood per character of the choice
    (the choice's string, not its tokens, so the figure does not depend on the tokenizer).
    Ties go to the first choice."""
    if not len(answers) == len(logliks) == len(choices):
        raise ValueError("one list of log-likelihoods and one of choices per answer")
    hits = hits_norm = 0
    for ll, texts, gold in zip(logliks, choices, answers):
        per_char = [x / len(t) for x, t in zip(ll, texts)]
        hits += _first_argmax(ll) == gold
        hits_norm += _first_argmax(per_char) == gold
    n = len(answers)
    return {"acc": hits / n, "acc_norm": hits_norm / n}


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))
