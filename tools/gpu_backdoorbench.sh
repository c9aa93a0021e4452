#!/bin/bash
# The BackdoorBench table at the field's protocol (PreAct-ResNet18 on CIFAR-10, the field's training recipe) on a
# lent GPU machine, through the `device` tool. The grid resumes nothing across machines: each call trains the models
# of the cells it reaches (about 2 minutes each on an H100) and returns the finished cells' rows; merge them into
# the table with backdoorbench.py --keep.
#
# Prepare once, here, in the repository root (both folders are ignored, and carried):
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     captum==0.9.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   mkdir -p .gpu/images && cp ../shared/data/images/cifar10-jpeg.tar.gz .gpu/images/
# Then: run(command="bash tools/gpu_backdoorbench.sh", carry=[".whl", ".gpu"], timeout_s=590)
#   ONLY="rectify n=1,finetune" bash tools/gpu_backdoorbench.sh      # only these methods' cells
#   BUDGET=400 bash tools/gpu_backdoorbench.sh                        # seconds the grid may run (default 520)
# Back here: python benchmarks/backdoorbench.py --grid benchmarks/grids/backdoorbench-cifar10-preact.toml \
#   --tabulate <files_at>/bb --keep benchmarks/results/backdoorbench-cifar10-preact.csv
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "could not install the carried wheels (.whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src NETMEND_DATA=$PWD/.gpu PYTHONUNBUFFERED=1 NETMEND_QUIET=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, netmend; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/device.txt"
args=(benchmarks/grids/backdoorbench-cifar10-preact.toml --out "$OUT/bb" --cache /tmp/models --workers 1)
[ -n "$ONLY" ] && args+=(--only "$ONLY")
timeout "${BUDGET:-520}" python3 -m netmend.cli bench "${args[@]}" 2>&1 | tee "$OUT/log"
rc=$?
rm -f "$OUT"/bb/cells/*/run/*.safetensors "$OUT"/bb/cells/*/run/report.html    # the rows come back, not the models
echo "bench exit $rc (124: stopped at the budget; the finished cells are in $OUT/bb)"
