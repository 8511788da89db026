"""Training forward passes: response log-probs, entropies and values, padded or packed.

Shape suffixes: B batch (sequences), L full sequence length (prompt + response, right-padded),
T response tokens (the longest response), V vocabulary, R packed rows, N packed row length.

Alignment (DESIGN section 3, same as `stages.algorithms`): response token t of sequence b sits
at position `prompt_len_b + t`. Its logprob AND its value are read from the model output at
position `prompt_len_b + t - 1`, the hidden state that predicts token t. So
`logprobs_BT[b, t] = log_softmax(logits_BLV[b, prompt_len_b + t - 1])[response_ids_BT[b, t]]` and
`values_BT[b, t] = values_BL[b, prompt_len_b + t - 1]` = V(state before token t).
`TokenBatch.logit_positions_BT` holds these indices; every path gathers with it.

Padding-free packing (`pack_batch`): the valid tokens of all sequences are concatenated into one
row (or a few, under a token budget), position ids restarting at 0 for each sequence, and an
attention mask that keeps every sequence to itself. With sdpa/eager that mask is a 4-D
block-diagonal causal additive mask [R, 1, N, N]: transformers 5 (`masking_utils.
_preprocess_mask_arguments`) passes a 4-D mask through unchanged to the attention function, eager
adds it to the scores and sdpa uses it as `attn_mask`, so it must be additive (0 / dtype min) in
the model's dtype (a bool mask would be added as 0/1 by eager). With flash attention no mask is
passed: transformers derives the sequence boundaries (cu_seqlens) from the restarting position ids.
Every forward here passes `use_cache=False`: besides wasting memory in training, a KV cache makes
transformers 5 skip its packed-sequence detection (`_preprocess_mask_arguments`), so maskless
packed inputs would attend across sequence boundaries without any error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch
from torch import nn

from stages.algorithms import entropy_from_logits
from stages.models import per_position_values

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
        stay inside the sequence (also when packed); `response_mask_BT` masks those entries out.
        """
        T = self.response_ids_BT.shape[1]
        t_T = torch.arange(T, device=self.prompt_lens_B.device)
        positions_BT = self.prompt_lens_B[:, None] + t_T[None, :] - 1
        return torch.minimum(positions_BT, self.seq_lens_B[:, None] - 1)

    def to(self, device: torch.device | str) -> TokenBatch:
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


def padding_fraction(batch: TokenBatch) -> float:
    """Share of the B x L padded layout that is padding (compute a packed forward saves)."""
    return 1.0 - float(batch.attention_mask_BL.sum()) / batch.attention_mask_BL.numel()


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedBatch:
    """The valid tokens of a TokenBatch laid end to end in R rows of N tokens.

    Sequence b occupies `input_ids_RN[row_B[b], offset_B[b] : offset_B[b] + seq_len_b]`.
    segment_ids_RN: which sequence a token belongs to (0..B-1); the padding that ends a short row
    is one more segment per row (B + row), so no real token attends to it and it attends only to
    itself (never an all-masked attention row, which would give NaN).
    """

    input_ids_RN: Tensor
    position_ids_RN: Tensor
    segment_ids_RN: Tensor
    row_B: Tensor
    offset_B: Tensor
    num_tokens: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / self.input_ids_RN.numel()

    def attention_mask_4d(self, dtype: torch.dtype) -> Tensor:
        """Block-diagonal causal additive mask [R, 1, N, N]: 0 where query i may see key j, dtype-min elsewhere."""
        N = self.input_ids_RN.shape[1]
        col_N = torch.arange(N, device=self.input_ids_RN.device)
        causal_NN = col_N[:, None] >= col_N[None, :]
        same_RNN = self.segment_ids_RN[:, :, None] == self.segment_ids_RN[:, None, :]
        allowed_RNN = same_RNN & causal_NN
        mask = torch.zeros(allowed_RNN.shape, dtype=dtype, device=allowed_RNN.device)
        return mask.masked_fill_(~allowed_RNN, torch.finfo(dtype).min)[:, None]


def pack_batch(batch: TokenBatch, max_tokens_per_row: int | None = None) -> PackedBatch:
    """Pack the sequences in order into rows of at most `max_tokens_per_row` tokens (None: one row).

    A sequence is never split; one longer than the budget gets a row of its own.
    """
    B, L = batch.input_ids_BL.shape
    seq_lens = batch.seq_lens_B.tolist()
    row_of, offset_of, row_fill = [], [], [0]
    for n in seq_lens:  # O(B) bookkeeping on sequence lengths, no per-token work
        if max_tokens_per_row is not None and row_fill[-1] > 0 and row_fill[-1] + n > max_tokens_per_row:
            row_fill.append(0)
        row_of.append(len(row_fill) - 1)
        offset_of.append(row_fill[-1])
        row_fill[-1] += n
    device = batch.input_ids_BL.device
    row_B = torch.tensor(row_of, dtype=torch.long, device=device)
    offset_B = torch.tensor(offset_of, dtype=torch.long, device=device)
    R, N = len(row_fill), max(row_fill)

    # every column of a row starts as padding: its own segment, positions counting from where it starts
    col_N = torch.arange(N, device=device)
    fill_R = torch.tensor(row_fill, dtype=torch.long, device=device)
    input_ids_RN = torch.zeros((R, N), dtype=torch.long, device=device)
    position_ids_RN = (col_N[None, :] - fill_R[:, None]).clamp(min=0)
    segment_ids_RN = (B + torch.arange(R, device=device))[:, None].expand(R, N).clone()

    # scatter the valid tokens (right-padded: token l of sequence b is valid iff l < seq_len_b)
    valid_BL = batch.attention_mask_BL
    rows = row_B[:, None].expand(B, L)[valid_BL]
    cols = (offset_B[:, None] + torch.arange(L, device=device)[None, :])[valid_BL]
    input_ids_RN[rows, cols] = batch.input_ids_BL[valid_BL]
    position_ids_RN[rows, cols] = batch.position_ids_BL[valid_BL]
    segment_ids_RN[rows, cols] = torch.arange(B, device=device)[:, None].expand(B, L)[valid_BL]
    return PackedBatch(input_ids_RN, position_ids_RN, segment_ids_RN, row_B, offset_B, int(valid_BL.sum()))


def _packed_attention_mask(model: nn.Module, packed: PackedBatch) -> Tensor | None:
    """4-D block mask for sdpa/eager; None for flash attention (boundaries from the position ids)."""
    module = getattr(model, "module", model)  # unwrap a DeepSpeed engine (its `.config` is DeepSpeed's)
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or ""
    if "flash" in impl:
        return None
    return packed.attention_mask_4d(next(module.parameters()).dtype)


# ---------------------------------------------------------------------------------------------
# forwards
# ---------------------------------------------------------------------------------------------
def _micro_batches(batch: TokenBatch, micro_batch_size: int | None):
    B = batch.input_ids_BL.shape[0]
    size = micro_batch_size or B
    for start in range(0, B, size):
        yield batch.rows(start, min(start + size, B))


def _supports_logits_to_keep(model: nn.Module) -> bool:
    module = getattr(model, "module", model)  # unwrap a DeepSpeed engine
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def _aligned_logits(
    model: nn.Module,
    mb: TokenBatch,
    packed: bool,
    max_tokens_per_row: int | None,
    with_values: nn.Module | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Logits [b, T, V] at `logit_positions_BT` (the outputs that predict each response token).

    With `with_values` (a scalar head), also that head on the final hidden state at the same
    positions, values [b, T], from the same forward.
    """
    if packed:
        pb = pack_batch(mb, max_tokens_per_row)
        inputs = {
            "input_ids": pb.input_ids_RN,
            "attention_mask": _packed_attention_mask(model, pb),
            "position_ids": pb.position_ids_RN,
        }
        rows_BT = pb.row_B[:, None].expand_as(mb.logit_positions_BT)
        cols_BT = pb.offset_B[:, None] + mb.logit_positions_BT
    else:
        inputs = {
            "input_ids": mb.input_ids_BL,
            "attention_mask": mb.attention_mask_BL,
            "position_ids": mb.position_ids_BL,
        }
        rows_BT = torch.arange(mb.input_ids_BL.shape[0], device=mb.input_ids_BL.device)[:, None]
        rows_BT = rows_BT.expand_as(mb.logit_positions_BT)
        cols_BT = mb.logit_positions_BT
    hidden = {"output_hidden_states": True} if with_values is not None else {}
    if _supports_logits_to_keep(model):
        # the LM head runs only on the columns that predict a response token (not on prompts)
        kept_K = torch.unique(cols_BT[mb.response_mask_BT]) if mb.response_mask_BT.any() else cols_BT[:1, 0]
        lookup_N = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.long, device=kept_K.device)
        lookup_N[kept_K] = torch.arange(kept_K.numel(), device=kept_K.device)
        out = model(**inputs, logits_to_keep=kept_K, use_cache=False, **hidden)
        kept_cols_BT = lookup_N[cols_BT]
    else:
        out = model(**inputs, use_cache=False, **hidden)
        kept_cols_BT = cols_BT
    logits = out.logits[rows_BT, kept_cols_BT]
    if with_values is None:
        return logits
    hidden_BTH = out.hidden_states[-1][rows_BT, cols_BT]  # the final (normed) hidden state
    return logits, with_values(hidden_BTH).squeeze(-1).float()


def response_logprobs(
    model: nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    with_entropy: bool = False,
    packed: bool = False,
    max_tokens_per_row: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(logprobs_BT, entropy_BT or None), float32, 0 where `response_mask_BT` is False.

    logprobs_BT[b, t] = log_softmax(logits[b, prompt_len_b + t - 1] / temperature)[response_ids_BT[b, t]]:
    the sampling distribution's log-prob (pass the generation temperature). The entropy is that
    of the same tempered distribution. Gradients flow (call under `torch.no_grad()` for old /
    reference log-probs). `micro_batch_size` bounds how many sequences go through the model at
    once; `packed=True` runs each micro-batch padding-free (see `pack_batch`), same numbers.
    Memory: per micro-batch the logits are gathered at the T aligned positions, then one float32
    [b, T, V] copy; log-probs are `z[token] - logsumexp(z)`, never a full log_softmax tensor.
    """
    logprob_parts, entropy_parts = [], []
    for mb in _micro_batches(batch, micro_batch_size):
        z_BTV = _aligned_logits(model, mb, packed, max_tokens_per_row).float() / temperature
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
    module = getattr(shared, "module", shared)
    logprob_parts, entropy_parts, value_parts = [], [], []
    for mb in _micro_batches(batch, micro_batch_size):
        z_BTV, values_BT = _aligned_logits(module.policy, mb, False, None, with_values=module.value_head)
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
    packed: bool = False,
    max_tokens_per_row: int | None = None,
) -> Tensor:
    """values_BT[b, t] = critic value at position prompt_len_b + t - 1 (float32, 0 where masked).

    Same alignment as `response_logprobs`: V(s_t) is read from the state that predicts token t.
    `critic` is anything `stages.models.per_position_values` accepts (separate or shared critic).
    """
    parts = []
    for mb in _micro_batches(batch, micro_batch_size):
        if packed:
            pb = pack_batch(mb, max_tokens_per_row)
            values_RN = per_position_values(
                critic, pb.input_ids_RN, _packed_attention_mask(critic, pb), pb.position_ids_RN
            )
            values_BT = values_RN[pb.row_B[:, None], pb.offset_B[:, None] + mb.logit_positions_BT]
        else:
            values_BL = per_position_values(critic, mb.input_ids_BL, mb.attention_mask_BL, mb.position_ids_BL)
            values_BT = values_BL.gather(1, mb.logit_positions_BT)
        parts.append(torch.where(mb.response_mask_BT, values_BT, 0.0))
    return torch.cat(parts)
