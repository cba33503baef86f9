#!/usr/bin/env bash
# Here (a machine with PyPI): the wheels the lent GPU machine lacks, for its Python 3.12 and torch 2.11
# (/work/.library/device/KINDS.md lists what it has). 44 MB, under the 64 MiB a call carries. Then, in one
# device `run` with carry [".whl"]: bash tools/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
# torchao 0.17 is the release built against torch 2.11, the GPU image's torch.
for pkg in diffusers==0.42.1 av==19.0.2 ftfy==6.3.1 wcwidth==0.9.4 torchao==0.17.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
du -sh .whl
