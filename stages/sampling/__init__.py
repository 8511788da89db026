"""Rollout generation and its rows: the sampling backends (HF, vLLM), the scalar reward, scored rows in the rollout schema."""
