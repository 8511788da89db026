"""Model sections: which models (policy, critic), the offline tiny model's size, and one engine's optimizer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.config.section import Section

DType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelConfig(Section):
    policy: str = Field(
        description="Policy to train: a Hugging Face model name or a local directory in HF format "
        "(the `tiny` recipe builds one offline). The frozen reference is loaded from the same place."
    )
    critic_mode: Literal["separate", "shared"] = Field(
        "separate",
        description="separate: the critic is its own model (own backbone, own optimizer; may be larger "
        "than the policy). shared: a scalar value head on the policy's backbone (one forward for both).",
    )
    critic_init: Literal["policy", "reward_model", "path"] = Field(
        "reward_model",
        description="Where the critic starts. reward_model: the trained RM's backbone AND score head "
        "(VAPO / Tulu 3 practice; needs the reward_model stage). policy: the policy's backbone with a "
        "zero value head. path: the model at `critic_path` (its score head if it has one, else zero).",
    )
    critic_path: str | None = Field(
        None,
        description="Critic source when critic_init=path: HF name or directory of a sequence classifier "
        "(its head is kept) or of a causal LM (backbone only, zero head). In shared mode only its "
        "score head is used and must match the policy's hidden size.",
    )
    dtype: DType = Field(
        "auto",
        description="Parameter dtype: auto = bfloat16 when a CUDA GPU is present, float32 on CPU.",
    )
    attn_implementation: str = Field(
        "sdpa",
        description="transformers attention backend: sdpa, eager, flash_attention_2, ...",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow model code from the checkpoint's repository to run (only for trusted models).",
    )


class TinyModelConfig(Section):
    """Size of the offline `tiny` model and of its tokenizer's training corpus."""

    vocab_size: int = Field(
        512,
        ge=260,
        le=65536,
        description="Target tokenizer vocabulary (256 bytes + 2 special tokens + merges).",
    )
    embedding_rows: int | None = Field(
        None,
        ge=260,
        description="Rows of the embedding and output layer: at least the tokenizer's vocabulary (extra rows "
        "are ids it never produces, as in hub models padded to a round size). Default: the tokenizer's size.",
    )
    hidden_size: int = Field(64, ge=8, description="Width of the transformer (must divide by num_heads).")
    num_layers: int = Field(2, ge=1, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads (query).")
    num_kv_heads: int = Field(
        2, ge=1, description="Key/value heads (grouped-query attention; divides num_heads)."
    )
    intermediate_size: int = Field(256, ge=1, description="Hidden width of each MLP (SwiGLU).")
    max_position_embeddings: int = Field(
        512, ge=16, description="Longest sequence (prompt + response) the model and tokenizer accept."
    )
    seed: int = Field(0, ge=0, description="Seed of the weight initialisation and of the tokenizer corpus.")
    corpus_size: int = Field(
        2000,
        ge=10,
        description="Number of arith train problems (prompt + solution) the tokenizer is trained on.",
    )

    @model_validator(mode="after")
    def _heads_fit(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        return self


class OptimConfig(Section):
    """Optimizer, schedule and DeepSpeed layout of one trainable model (policy, critic, reward model)."""

    lr: float = Field(1e-6, gt=0, description="Peak learning rate (reached at the end of warmup).")
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW decoupled weight decay; applied to matrices only, not to biases or norms.",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(
        0, ge=0, description="Optimizer steps of linear warmup to the peak lr; 0 starts at the peak."
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After warmup: constant lr, or cosine decay to min_lr_ratio * lr at total_steps.",
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Cosine schedule: final lr as a fraction of the peak lr."
    )
    total_steps: int | None = Field(
        None,
        ge=1,
        description="Cosine schedule: optimizer step at which the decay ends (required for cosine).",
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this value; null disables clipping."
    )
    zero_stage: Literal[0, 2, 3] = Field(
        2,
        description="DeepSpeed ZeRO stage: 0 replicates everything, 2 shards optimizer state and gradients, "
        "3 also shards parameters (infra/deepspeed/zero{0,2,3}.json).",
    )
    micro_batch_size: int = Field(
        1,
        ge=1,
        description="Most rows one device runs through the model at once (a memory knob only): each rank's "
        "share of an optimizer step is cut into micro-batches of this size (or the share, if smaller); "
        "gradient accumulation is derived from the stage's global batch size and the number of ranks.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Training precision: auto = bf16 on CUDA, fp32 on CPU (CPUs train in fp32)."
    )

    @model_validator(mode="after")
    def _cosine_needs_total_steps(self) -> OptimConfig:
        if self.schedule == "cosine" and self.total_steps is None:
            raise ValueError("schedule 'cosine' needs total_steps")
        if self.total_steps is not None and self.total_steps < self.warmup_steps:
            raise ValueError(
                f"total_steps ({self.total_steps}) is shorter than warmup_steps ({self.warmup_steps})"
            )
        return self
