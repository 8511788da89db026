#!/usr/bin/env bash
# Prepares .whl/ for infra/gpu_check.sh: the packages the training stages import that a GPU machine
# with only PyTorch, transformers and the usual scientific stack (numpy, pyarrow, pyyaml, fsspec,
# sympy, ninja, psutil, msgpack, einops, tqdm) lacks, for CPython 3.12 on x86-64 Linux (run it with
# PYTHON set to any pip). About 5 MiB: DeepSpeed as its source package (it compiles nothing at
# install; its ops build at first use against the local torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
binary=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 hjson==3.1.0 math-verify==0.9.0 latex2sympy2-extended==1.11.0
        antlr4-python3-runtime==4.13.2)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${binary[@]}"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
du -sh .whl
