"""Models and engines: loading HF models, value heads, tokenizers, where model files come from, the offline tiny model, DeepSpeed engines and checkpoints, training forwards, mini-batching."""
