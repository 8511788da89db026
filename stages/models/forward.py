"""Training forward passes: response log-probs, entropies and values of right-padded batches.

Shape suffixes: B batch (sequences), L full sequence length (prompt + response, right-padded),
T response tokens (the longest response), V vocabulary.

Alignment (DESIGN section 3, same as `stages.algorithms`): response token t of sequence b sits
at position `prompt_len_b + t`. Its logprob AND its value are read from the model output at
position `prompt_len_b + t - 1`, the hidden state that predicts token t. So
`logprobs_BT[b, t] = log_softmax(logits_BLV[b, prompt_len_b + t - 1])[response_ids_BT[b, t]]` and
`values_BT[b, t] = values_BL[b, prompt_len_b + t - 1]` = V(state before token t).
`TokenBatch.logit_positions_BT` holds these indices; every path gathers with it.

Every forward here passes `use_cache=False`: a KV cache only wastes memory in training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from stages.algorithms import entropy_from_logits
from stages.models.value_head import per_position_values, supports_logits_to_keep
from stages.runtime.devices import model_device

Tensor = torch.Tensor


@dataclass(frozen=True)
class TokenBatch:
    """Prompt + response token ids of B sequences, right-padded to L = max(prompt_len + response_len).

    attention_mask_BL: bool, True on real tokens. position_ids_BL: 0.. per sequence.
    response_ids_BT / response_mask_BT: the responses alone, right-padded to T (mask True = counts).
    """

    input_ids_BL: Tensor
    attention_mask_BL: Tensor
    position_ids_BL: Tensor
    prompt_lens_B: Tensor
    response_lens_B: Tensor
    response_ids_BT: Tensor
    response_mask_BT: Tensor

    @property
    def seq_lens_B(self) -> Tensor:
        return self.prompt_lens_B + self.response_lens_B

    @property
    def logit_positions_BT(self) -> Tensor:
        """Position (in the padded row) of the output that predicts response token t: prompt_len + t - 1.

        Where the response is padding the index is clamped to the sequence's last token, so gathers
        stay inside the sequence; `response_mask_BT` masks those entries out.
        """
        T = self.response_ids_BT.shape[1]
        t_T = torch.arange(T, device=self.prompt_lens_B.device)
        positions_BT = self.prompt_lens_B[:, None] + t_T[None, :] - 1
        return torch.minimum(positions_BT, self.seq_lens_B[:, None] - 1)

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch on `device` (itself when it is there already)."""
        if self.input_ids_BL.device == torch.device(device):
            return self
        return TokenBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Sequences start..stop-1, L trimmed to their own longest sequence, T kept (outputs stay [b, T])."""
        L = int(self.seq_lens_B[start:stop].max())
        sliced = {f.name: getattr(self, f.name)[start:stop] for f in fields(self)}
        for name in ("input_ids_BL", "attention_mask_BL", "position_ids_BL"):
            sliced[name] = sliced[name][:, :L]
        return TokenBatch(**sliced)


def build_token_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> TokenBatch:
    """Right-padded tensors for B (prompt, response) pairs; every prompt must have at least one token.

    Token t of response b lands at position `len(prompt_ids[b]) + t` of `input_ids_BL[b]`.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError(
            "every prompt needs at least one token (the first response token is predicted from it)"
        )
    prompt_lens_B = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    response_lens_B = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    seq_lens_B = prompt_lens_B + response_lens_B
    B, L, T = len(prompt_ids), int(seq_lens_B.max()), int(response_lens_B.max())

    flat = torch.tensor(
        [tok for p, r in zip(prompt_ids, response_ids, strict=True) for tok in (*p, *r)], dtype=torch.long
    )
    positions_BL = torch.arange(L).expand(B, L)
    attention_mask_BL = positions_BL < seq_lens_B[:, None]
    input_ids_BL = torch.full((B, L), pad_id, dtype=torch.long)
    input_ids_BL[attention_mask_BL] = flat  # row-major fill: each row's prompt then its response

    # response token t of row b is input token prompt_len_b + t: one gather with an index tensor
    t_BT = torch.arange(T).expand(B, T)
    response_mask_BT = t_BT < response_lens_B[:, None]
    source_BT = (prompt_lens_B[:, None] + t_BT).clamp(max=L - 1)
    response_ids_BT = torch.where(response_mask_BT, input_ids_BL.gather(1, source_BT), pad_id)
    return TokenBatch(
        input_ids_BL=input_ids_BL,
        attention_mask_BL=attention_mask_BL,
        position_ids_BL=torch.where(attention_mask_BL, positions_BL, 0),
        prompt_lens_B=prompt_lens_B,
        response_lens_B=response_lens_B,
        response_ids_BT=response_ids_BT,
        response_mask_BT=response_mask_BT,
    )


@dataclass(frozen=True)
class TokenRows:
    """A step's rows as token id lists; `batch(idx)` pads the rows `idx` into a TokenBatch."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def batch(self, idx: Tensor | list[int] | None = None) -> TokenBatch:
        rows = range(len(self)) if idx is None else (idx.tolist() if isinstance(idx, Tensor) else list(idx))
        return build_token_batch(
            [self.prompt_ids[i] for i in rows], [self.response_ids[i] for i in rows], self.pad_id
        )


# ---------------------------------------------------------------------------------------------
# forwards
# ---------------------------------------------------------------------------------------------
def _micro_batches(batch: TokenBatch, micro_batch_size: int | None, model: nn.Module):
    """The batch in micro-batches, each on the model's device (the outputs stay there)."""
    B = batch.input_ids_BL.shape[0]
    size = micro_batch_size or B
    on = model_device(model)
    for start in range(0, B, size):
        yield batch.rows(start, min(start + size, B)).to(on)


def _aligned_logits(model: nn.Module, mb: TokenBatch, shared: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Logits [b, T, V] at `logit_positions_BT` (the outputs that predict each response token).

    `shared`: `model` is a PolicyWithValueHead (or its engine); then also its values [b, T] at the
    same positions, from the same forward. The forward goes through `model` itself (an engine's own
    forward: see `per_position_values`).
    """
    inputs = {
        "input_ids": mb.input_ids_BL,
        "attention_mask": mb.attention_mask_BL,
        "position_ids": mb.position_ids_BL,
    }
    rows_BT = torch.arange(mb.input_ids_BL.shape[0], device=mb.input_ids_BL.device)[:, None]
    rows_BT = rows_BT.expand_as(mb.logit_positions_BT)
    cols_BT = mb.logit_positions_BT
    module = getattr(model, "module", model)
    kept_cols_BT, keep = cols_BT, {}
    if supports_logits_to_keep(module.policy if shared else module):
        # the LM head runs only on the columns that predict a response token (not on prompts)
        kept_K = torch.unique(cols_BT[mb.response_mask_BT]) if mb.response_mask_BT.any() else cols_BT[:1, 0]
        lookup_N = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.long, device=kept_K.device)
        lookup_N[kept_K] = torch.arange(kept_K.numel(), device=kept_K.device)
        kept_cols_BT, keep = lookup_N[cols_BT], {"logits_to_keep": kept_K}
    if shared:
        logits, values_BL = model(**inputs, **keep)
        return logits[rows_BT, kept_cols_BT], values_BL[rows_BT, cols_BT].float()
    return model(**inputs, **keep, use_cache=False).logits[rows_BT, kept_cols_BT]


def response_logprobs(
    model: nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(logprobs_BT, entropy_BT or None), float32, 0 where `response_mask_BT` is False.

    logprobs_BT[b, t] = log_softmax(logits[b, prompt_len_b + t - 1] / temperature)[response_ids_BT[b, t]]:
    the sampling distribution's log-prob (pass the generation temperature). The entropy is that
    of the same tempered distribution. Gradients flow (call under `torch.no_grad()` for old /
    reference log-probs). `micro_batch_size` bounds how many sequences go through the model at
    once.
    Memory: per micro-batch the logits are gathered at the T aligned positions, then one float32
    [b, T, V] copy; log-probs are `z[token] - logsumexp(z)`, never a full log_softmax tensor.
    """
    logprob_parts, entropy_parts = [], []
    for mb in _micro_batches(batch, micro_batch_size, model):
        z_BTV = _aligned_logits(model, mb).float() / temperature
        logprobs_BT = z_BTV.gather(-1, mb.response_ids_BT[..., None]).squeeze(-1) - torch.logsumexp(
            z_BTV, dim=-1
        )
        logprob_parts.append(torch.where(mb.response_mask_BT, logprobs_BT, 0.0))
        if with_entropy:
            entropy_parts.append(torch.where(mb.response_mask_BT, entropy_from_logits(z_BTV), 0.0))
    entropy_BT = torch.cat(entropy_parts) if with_entropy else None
    return torch.cat(logprob_parts), entropy_BT


def response_logprobs_and_values(
    shared: nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(logprobs_BT, entropy_BT or None, values_BT) of a shared critic (`PolicyWithValueHead`, or a
    DeepSpeed engine wrapping one) from ONE trunk forward: the same numbers as `response_logprobs`
    on its policy plus `response_values` on it, at the cost of one forward instead of two."""
    logprob_parts, entropy_parts, value_parts = [], [], []
    for mb in _micro_batches(batch, micro_batch_size, shared):
        z_BTV, values_BT = _aligned_logits(shared, mb, shared=True)
        z_BTV = z_BTV.float() / temperature
        logprobs_BT = z_BTV.gather(-1, mb.response_ids_BT[..., None]).squeeze(-1) - torch.logsumexp(
            z_BTV, dim=-1
        )
        logprob_parts.append(torch.where(mb.response_mask_BT, logprobs_BT, 0.0))
        value_parts.append(torch.where(mb.response_mask_BT, values_BT, 0.0))
        if with_entropy:
            entropy_parts.append(torch.where(mb.response_mask_BT, entropy_from_logits(z_BTV), 0.0))
    entropy_BT = torch.cat(entropy_parts) if with_entropy else None
    return torch.cat(logprob_parts), entropy_BT, torch.cat(value_parts)


def response_values(
    critic: nn.Module,
    batch: TokenBatch,
    micro_batch_size: int | None = None,
) -> Tensor:
    """values_BT[b, t] = critic value at position prompt_len_b + t - 1 (float32, 0 where masked).

    Same alignment as `response_logprobs`: V(s_t) is read from the state that predicts token t.
    `critic` is anything `stages.models.value_head.per_position_values` accepts (separate or shared critic).
    """
    parts = []
    for mb in _micro_batches(batch, micro_batch_size, critic):
        values_BL = per_position_values(critic, mb.input_ids_BL, mb.attention_mask_BL, mb.position_ids_BL)
        values_BT = values_BL.gather(1, mb.logit_positions_BT)
        parts.append(torch.where(mb.response_mask_BT, values_BT, 0.0))
    return torch.cat(parts)
