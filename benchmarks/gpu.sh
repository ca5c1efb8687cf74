#!/usr/bin/env bash
# P1 and P2 on one CUDA device in bf16 with a GPT-2 of about 109M parameters (width 1024,
# 8 blocks, vocabulary 8192), sized to finish in under 5 minutes on a current data-centre GPU.
# Featurize runs its forward pass under bf16 autocast on CUDA; projections stay float32.
# Needs benchmarks/.venv-peers (bash benchmarks/setup_peers.sh) with a CUDA build of torch.
#
#   bash benchmarks/gpu.sh              # on a machine with a GPU
#   SMALL=1 DEVICE=cpu bash benchmarks/gpu.sh   # dry run of the same commands on a tiny model
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/.venv-peers/bin/python}"
device="${DEVICE:-cuda}"
if [ "${SMALL:-0}" = "1" ]; then
  width=64; layers=2; batch=2; tokens=32; batches=1; repeats=1; suffix="_dry_run"; bf16=""
else
  width=1024; layers=8; batch=16; tokens=512; batches=4; repeats=5; suffix="_gpu"; bf16="--bf16"
fi
threads="${THREADS:-$(nproc)}"

"$python" "$here/p1_training_step.py" --device "$device" $bf16 --width "$width" --layers "$layers" \
  --batch-size "$batch" --tokens "$tokens" --batches "$batches" --repeats "$repeats" \
  --threads "$threads" --name "p1_training_step$suffix"
# TRAK's path on GPU: per-sample gradients with torch.func, then traker's projector on the same
# device (CudaProjector needs the fast_jl extension; BasicProjector is used, as on CPU).
"$python" "$here/p2_trak.py" --device "$device" --widths "$width" --layers "$layers" \
  --batch-size "$batch" --tokens "$((tokens / 4))" --repeats "$repeats" --threads "$threads" \
  --name "p2_trak$suffix"
