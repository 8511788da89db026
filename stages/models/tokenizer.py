"""Tokenizers as the stages use them: loaded from a model directory, and the id that pads a batch.

How prompts become ids (plain or through the chat template) and which ids end a response is
`stages.data.prompt_rendering`.
"""

from __future__ import annotations


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model directory's tokenizer (transformers is imported here, where it is needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS.

    Many hub tokenizers define no pad token, or set pad == EOS; padding never decides anything here
    (attention masks and lengths do), so EOS is a safe filler.
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
