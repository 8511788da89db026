"""The RL math of the pipeline: pure tensor functions, no I/O, no config objects, no `.item()`.

This package is a contract (DESIGN section 3): tests and tools outside the project call these
names, imported from `stages.algorithms`, with these argument orders. Its modules: `masked`
(masked statistics, whitening, explained variance), `advantages` (per-token rewards, GAE, GRPO),
`losses` (policy, value, KL, entropy, positive-example LM, Bradley-Terry, aggregation, truncated
importance weights).

Shape suffixes: B batch (sequences), T response tokens, V vocabulary, G groups.
Masks are bool, True = the position counts. A mask over response tokens is usually a prefix
per row (right padding), but every function also accepts holes (e.g. tool output that is
masked out): the GAE recurrence then skips the masked positions.

Alignment conventions (the models package follows them; the tests check them):
- Response token t sits at sequence position `prompt_len + t`. Its logprob, its reference
  logprob AND its value are all read from the hidden state at position `prompt_len + t - 1`
  (the state that predicts token t). So `values_BT[:, t]` is V(s_t), the value of the state
  before token t is emitted, and GAE bootstraps token t with `values_BT[:, t + 1]`.
- The scalar outcome reward of a response lands on its last generated token (the EOS, or the
  last token of a truncated response), never on padding: see `outcome_rewards_to_tokens`.
- GAE runs on whole sequences: if sequences are sharded across ranks (sequence parallelism),
  gather them before calling `compute_gae`.

Sources: PPO, Schulman et al. 2017 (arXiv 1707.06347); GAE, Schulman et al. 2015
(arXiv 1506.02438); VAPO, Yue et al. 2025 (arXiv 2504.05118) for decoupled GAE, length-adaptive
GAE and the positive-example LM loss; DAPO (arXiv 2503.14476) for clip-higher; k1/k2/k3 KL
estimators from J. Schulman, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html).
"""

from stages.algorithms.advantages import (
    compute_decoupled_gae,
    compute_gae,
    grpo_advantages,
    last_token_index,
    length_adaptive_lambda,
    outcome_rewards_to_tokens,
)
from stages.algorithms.losses import (
    Aggregation,
    KLEstimator,
    aggregate_loss,
    bradley_terry_loss,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    positive_example_lm_loss,
    truncated_importance_weights,
    value_loss,
)
from stages.algorithms.masked import (
    explained_variance,
    masked_mean,
    masked_moments_sums,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_from_sums,
)

__all__ = [
    "Aggregation",
    "KLEstimator",
    "aggregate_loss",
    "bradley_terry_loss",
    "compute_decoupled_gae",
    "compute_gae",
    "entropy_from_logits",
    "explained_variance",
    "grpo_advantages",
    "kl_penalty",
    "last_token_index",
    "length_adaptive_lambda",
    "masked_mean",
    "masked_moments_sums",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "moments_from_sums",
    "outcome_rewards_to_tokens",
    "policy_loss",
    "positive_example_lm_loss",
    "truncated_importance_weights",
    "value_loss",
]
