"""The scalar reward of a sampled response: the verifier's score, an optional penalty for a response
cut at the token limit, plus the reward model's weighted score (`rollout_rows.score_samples`).

In evaluation a truncated response is simply wrong; in training it may get the extra penalty.
"""

from __future__ import annotations


def apply_missing_eos_penalty(score: float, finish_reason: str, penalty: float) -> float:
    """`score - penalty` for a response cut at the token limit (`finish_reason == "length"`), else
    `score`. Discourages rambling past the budget (cf. DAPO's overlong penalty, arXiv 2503.14476);
    `penalty=0` turns it off. In evaluation a truncated response is simply wrong."""
    return score - penalty if finish_reason == "length" else score


def combined_score(verifier_score: float, rm_score: float | None, rm_coef: float) -> float:
    """The scalar reward: `verifier_score + rm_coef * rm_score` (no RM score: the verifier alone)."""
    return verifier_score if rm_score is None else verifier_score + rm_coef * rm_score
