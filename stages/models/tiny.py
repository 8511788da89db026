"""The offline `tiny` model: a small Qwen2 causal LM and a BPE tokenizer trained on the arith task.

Built locally and deterministically (no network), and saved in Hugging Face format, so every
later code path (`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained`,
`save_pretrained`) is the one a hub model takes. The weights are random: the `tiny` recipe
starts with SFT.

Tokenizer: byte-level BPE (every string encodes; `decode(encode(text)) == text` for NFC text)
with Qwen2's pre-tokenizer, which splits digits into single characters so that numbers are
learnable digit by digit; `<|endoftext|>` is EOS and `<|pad|>` padding (distinct ids); no BOS,
no chat template (prompts are plain text). `vocab_size` is an upper bound: the arith corpus runs
out of frequent pairs below 512, and the model's embedding matches the real vocabulary.

`tiny_model_path` caches builds under `$RLPIPE_CACHE` (default `~/.cache/rlpipe`), keyed by the
config hash; a build is written to a temporary folder and renamed into place, so a crash or a
concurrent builder never leaves a half-written model where a reader could find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from stages.config.models import TinyModelConfig
from stages.config.section import config_hash
from stages.config.task import ArithDifficulty
from stages.data.arith import arith_problems
from stages.data.problems import format_prompt

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CACHE_ENV = "RLPIPE_CACHE"
# Bump when the builder changes what it writes, so cached builds of the same config are not reused.
BUILD_VERSION = 1
# Qwen2's pre-tokenizer split (transformers `models/qwen2/tokenization_qwen2.py`): letters runs,
# single digits (`\p{N}`, so numbers are learnt digit by digit), punctuation runs, newlines, spaces.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# The tokenizer sees every phrasing the arith generator has, whatever difficulty a recipe trains on.
_CORPUS_DIFFICULTY = ArithDifficulty(min_ops=1, max_ops=3, max_operand=20, operations=("+", "-", "*", "/"))


def build_tiny_model(config: TinyModelConfig, out_dir: str | Path) -> Path:
    """Train the tokenizer, initialise the model, save both (safetensors) into `out_dir`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # step 1. the tokenizer, trained on the arith train split only (test problems stay unseen)
    tokenizer = _train_tokenizer(config)

    # step 2. the model, sized by the config and by the tokenizer's real vocabulary
    model_config = Qwen2Config(
        vocab_size=max(len(tokenizer), config.embedding_rows or 0),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = Qwen2ForCausalLM(model_config).float()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None

    # step 3. save like a hub model, plus the config it was built from
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"tiny_model_config": config.model_dump(), "build_version": BUILD_VERSION}
    (out_dir / "rlpipe_tiny.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out_dir


def _train_tokenizer(config: TinyModelConfig):
    """Byte-level BPE with Qwen2's normaliser and pre-tokenizer, wrapped as a `Qwen2Tokenizer`:
    `AutoTokenizer` rebuilds a qwen2 model's tokenizer from vocab + merges with exactly this
    pipeline, so the trained tokenizer and the loaded one agree token for token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    problems = arith_problems("train", config.corpus_size, config.seed, _CORPUS_DIFFICULTY)
    tok.train_from_iterator([format_prompt(p) + p.solution + EOS_TOKEN for p in problems], trainer)
    bpe = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(pair) for pair in bpe["merges"]],
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,  # byte-level: every string encodes
        model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def tiny_model_path(config: TinyModelConfig, cache_dir: str | Path | None = None) -> Path:
    """The folder of the built model for `config`, building it on first use.

    Cache root: `cache_dir`, else `$RLPIPE_CACHE`, else `~/.cache/rlpipe`. Concurrent callers may
    both build; the first rename wins and the other discards its copy.
    """
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlpipe") / "tiny"
    key = hashlib.sha256(f"{config_hash(config)}:v{BUILD_VERSION}".encode()).hexdigest()[:16]
    final = root / f"tiny-{key}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-{key}-", dir=root))
    try:
        build_tiny_model(config, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache/huggingface
        os.rename(staging, final)  # atomic; fails if another process got there first
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
