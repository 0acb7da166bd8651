#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels the lent GPU machine's image lacks, for benchmarks/gpu_suite.sh.
#
#   bash benchmarks/gpu_wheels.sh        # here, with network; then carry ".whl" in the device call
#
# That image (Python 3.12, no network) already has torch, transformers, accelerate, safetensors, tokenizers,
# jinja2, tqdm, numpy, pyarrow, pandas, matplotlib, sympy, psutil, xxhash, fsspec, huggingface-hub, pyyaml
# and pytest. Missing there: math-verify and the server's packages (nanoseek dependencies; 2026-12-04: no
# starlette there, so the serve tests failed to import) and TRL (the RL benchmark's peer), with the packages they
# need that the image lacks. Pinned, one version each (two versions of one package stop the whole install);
# --no-deps, so every needed package is named here.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    trl==1.16.0                    # benchmarks/rl_step.py's peer (needs transformers >= 4.56.2, accelerate, datasets)
    datasets==5.2.0                # trl
    dill==0.4.1                    # datasets
    multiprocess==0.70.19          # datasets
    math-verify==0.9.0             # nanoseek (rewards)
    latex2sympy2_extended==1.11.0  # math-verify
    antlr4-python3-runtime==4.13.2 # latex2sympy2_extended
    starlette==1.10.0              # nanoseek (serve; tests/test_serve*.py import it)
    uvicorn==0.55.0                # nanoseek (serve)
    httptools==0.9.0               # uvicorn's HTTP parser, as `nanoseek serve` runs it
    pydantic==2.14.4               # nanoseek (serve schemas)
    pydantic-core==2.50.5          # pydantic
    annotated-types==0.8.0         # pydantic
    typing-inspection==0.4.5       # pydantic
    typing-extensions==4.16.0      # pydantic-core needs >= 4.16 (the image's may be older)
)

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p .whl
rm -f .whl/*.whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

if ! git check-ignore -q .whl/; then
    echo "warning: .whl/ is not git-ignored: add /.whl/ to .gitignore (or .git/info/exclude)" >&2
fi
echo "requirements of the downloaded wheels (each must be in the image or in this list):"
for f in .whl/*.whl; do
    needs=$(unzip -p "$f" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
        | sed 's/ *;.*python_version *< *"3\.[0-9]".*/ (old Pythons only)/' | tr '\n' '|' | sed 's/|$//; s/|/; /g' || true)
    echo "  $(basename "$f"): ${needs:-nothing}"
done
du -ch .whl/*.whl | tail -n 1
