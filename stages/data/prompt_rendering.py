"""How a prompt's text becomes the token ids a model reads, and which ids end its response.

One rendering for everyone: SFT, the reward model, critic warmup, PPO and evaluation all turn a
prompt into ids with `prompt_token_ids` and end a response with `response_end_id`, so the critic and
the reward model score exactly what the policy was prompted with. `task.prompt_format` chooses:
`chat` (one user turn through the tokenizer's chat template), `plain` (the text as is), or `auto`
(chat when the tokenizer has a template). The functions take any Hugging Face tokenizer.
"""

from __future__ import annotations

from stages.config.section import ConfigError
from stages.config.task import PromptFormat

# A sentinel assistant reply: rendering it shows what the chat template writes after a response.
_RESPONSE_MARK = "RLPIPE_RESPONSE_MARK"


class PromptFormatError(ConfigError):
    """`prompt_format: chat` with a tokenizer that has no chat template."""


def uses_chat(tokenizer, prompt_format: PromptFormat) -> bool:
    """Whether prompts go through the tokenizer's chat template: `auto` when it has one."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if prompt_format == "chat" and not has_template:
        raise PromptFormatError(
            "task.prompt_format is chat but the model's tokenizer has no chat template (use auto or plain)"
        )
    return prompt_format == "chat" or (prompt_format == "auto" and has_template)


def render_prompt(text: str, tokenizer, chat: bool) -> str:
    """The prompt as the model reads it: chat = one user turn through the chat template, ending with
    the assistant header (where generation starts); plain = `text` itself."""
    if not chat:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def prompt_token_ids(text: str, tokenizer, chat: bool) -> list[int]:
    """The ids of prompt `text` (rendered by `render_prompt`), after which the response starts.

    chat: the template writes its own BOS (if it wants one), so the tokenizer adds no special tokens
    of its own (no double BOS). plain: the tokenizer's usual special tokens (a base model's BOS).
    """
    rendered = render_prompt(text, tokenizer, chat)
    return list(tokenizer(rendered, add_special_tokens=not chat)["input_ids"])


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`, ...), or None when it closes with none (or has no template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _RESPONSE_MARK}], tokenize=False
    )
    _, _, after = rendered.partition(_RESPONSE_MARK)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) else None


def response_end_id(tokenizer, chat: bool) -> int:
    """The token a complete response ends with: the turn end in chat, else EOS (SFT targets and
    reward-model pairs end with it; generation stops on it)."""
    end = turn_end_id(tokenizer) if chat else None
    return tokenizer.eos_token_id if end is None else end


def stop_token_ids(tokenizer, prompt_format: PromptFormat) -> list[int]:
    """Every id that ends a response in generation: EOS and, when prompts go through the chat
    template, its turn end (first the one a complete training response ends with)."""
    ids = [response_end_id(tokenizer, uses_chat(tokenizer, prompt_format))]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
