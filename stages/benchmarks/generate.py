"""`rlpipe bench generate`: the KV-cache sampler against plain `model.generate`. Speed is printed, never asserted."""

from __future__ import annotations

import torch

from stages.benchmarks.storage_io import timed
from stages.models.tokenizer import pad_token_id


def bench_generate(
    model_dir: str, prompts: int = 64, max_new_tokens: int = 128, temperature: float = 1.0, seed: int = 0
) -> dict:
    """rlpipe's KV-cache sampler (`HFGenerator`: finished rows leave the batch) against plain
    `model.generate` (left-padded, sampling, the same budget); response tokens per second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.config.sampling import SamplingConfig
    from stages.config.task import TaskConfig
    from stages.data.tasks import encode_problems, task_problems
    from stages.sampling.hf_sampler import HFGenerator

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pad = pad_token_id(tokenizer)
    encoded = encode_problems(task_problems(TaskConfig(train_size=prompts), "train"), tokenizer)
    prompt_ids = [p.prompt_ids for p in encoded]
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    generator = HFGenerator(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    generator.generate(prompt_ids[:2], sampling, seed)  # warm-up
    ours_s, samples = timed(lambda: generator.generate(prompt_ids, sampling, seed))
    ours_tokens = sum(len(s.response_ids) for s in samples)

    width = max(map(len, prompt_ids))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    torch.manual_seed(seed)

    def plain():
        with torch.no_grad():
            return model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=temperature, top_k=0,
                top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip

    plain_s, out = timed(plain)
    responses = out[:, width:]
    ended = responses == tokenizer.eos_token_id
    # tokens up to and including the first EOS (what the sampler returns), the rest is padding
    first_eos = torch.where(
        ended.any(1), ended.float().argmax(1) + 1, torch.full((len(prompt_ids),), responses.shape[1])
    )
    plain_tokens = int(first_eos.sum())
    return {
        "prompts": prompts, "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
        "rlpipe_s": ours_s, "rlpipe_tokens": ours_tokens, "rlpipe_tokens_per_s": ours_tokens / ours_s,
        "hf_generate_s": plain_s, "hf_generate_tokens": plain_tokens, "hf_generate_tokens_per_s": plain_tokens / plain_s,
        "speedup": (ours_tokens / ours_s) / (plain_tokens / plain_s),
    }  # fmt: skip
