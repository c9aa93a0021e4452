#!/usr/bin/env bash
# Fingerprints of the edits every method makes on every defect kind, through the CLI (a user's path), so that a
# refactoring that should not change behaviour can be checked bit for bit: run it before and after, diff the output.
#
#   bash tools/edit_fingerprints.sh OUT_DIR > fingerprints.txt     # NETMEND_DATA: the data folder (for fairness,
#                                                                   # leakage and ACAS Xu cases; skipped without it)
# Each line: case, method, exit code, sha256 of edit.safetensors (deltas and metadata; timings are not in it),
# and the metrics after the repair. Edits are deterministic for a seed on CPU, so any difference is a change.
set -u
OUT=${1:?usage: edit_fingerprints.sh OUT_DIR}
NM=${NETMEND:-netmend}
DATA=${NETMEND_DATA:-}
ACAS=${ACAS:-$DATA/acasxu}
export OMP_NUM_THREADS=1 NETMEND_QUIET=1
mkdir -p "$OUT"

train() {   # name, train options...
  local name=$1; shift
  [ -d "$OUT/$name" ] || $NM --threads 1 train --out "$OUT/$name" "$@" > "$OUT/$name.train.log" 2>&1 \
    || { echo "$name: training failed: $(tail -1 "$OUT/$name.train.log")"; return 1; }
}

repair() {  # case, model, method, repair options...
  local case=$1 model=$2 method=$3; shift 3
  local run="$OUT/runs/$case-$method"
  rm -rf "$run"
  $NM --threads 1 repair "$model" --method "$method" --out "$run" --keep-rejected "$@" > "$run.log" 2>&1
  local rc=$?
  local h="-"
  [ -f "$run/edit.safetensors" ] && h=$(sha256sum "$run/edit.safetensors" | cut -c1-16)
  local after="-"
  [ -f "$run/metrics.json" ] && after=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); \
a=m.get('candidate_after') or m.get('after') or {}; \
print(' '.join(f'{k}={v:.4f}' if isinstance(v,float) else f'{k}={v}' for k,v in sorted(a.items()) \
if isinstance(v,(int,float)) and not k.endswith('seconds')))" "$run/metrics.json" 2>/dev/null)
  echo "$case $method rc=$rc edit=$h $after"
}

mkdir -p "$OUT/runs"
# backdoor on the embedded digits
train digits-badnets --dataset digits --arch small-cnn --trigger-size 2 --epochs 10
for m in rectify rectify-static care inner finetune fine-pruning p-clarc a-clarc; do
  repair backdoor "$OUT/digits-badnets" $m --pairs 2
done
# spurious correlation
train digits-spurious --dataset digits --arch small-cnn --trigger-size 2 --spurious-class 3 --epochs 10
for m in rectify rectify-static care inner finetune p-clarc a-clarc; do
  repair spurious "$OUT/digits-spurious" $m --pairs 2
done
# wrong predictions
train digits-mislabel --dataset digits --arch small-cnn --trigger none --mislabel-class 1 --mislabel-as 7 --epochs 10
for m in rectify care inner finetune; do
  repair wrong "$OUT/digits-mislabel" $m --pairs 4
done
# adversarial examples on the backdoor model's clean task
for m in rectify care finetune; do
  repair adversarial "$OUT/digits-badnets" $m --defect adversarial --pairs 4
done
if [ -n "$DATA" ]; then
  # fairness on the census table
  train census --dataset census --arch mlp --trigger none --protected sex --epochs 2 --data-dir "$DATA"
  for m in care finetune inner; do
    repair fairness "$OUT/census" $m --data-dir "$DATA" --protected sex
  done
  # safety: ACAS Xu N3,3 with the strengthened property 2 of the benchmarks
  net="$ACAS/nnet/ACASXU_run2a_3_3_batch_2000.nnet"
  for m in care property-tune finetune; do
    repair safety "$net" $m --property phi2-strengthened
  done
  repair safety-phi8 "$ACAS/nnet/ACASXU_run2a_2_9_batch_2000.nnet" care --property "$ACAS/vnnlib/prop_8.vnnlib"
  # feature leakage on BlockMNIST
  train blockmnist --dataset blockmnist --arch small-cnn --trigger none --epochs 2 --data-dir "$DATA"
  for m in rectify finetune; do
    repair leakage "$OUT/blockmnist" $m --data-dir "$DATA" --pairs 4
  done
fi
