#!/usr/bin/env bash
# Every benchmark, one after the other (each also runs alone: see its --help). Needs
# ../shared/data/ham10000-lite; results land in benchmarks/results/*.json. Run on a quiet machine:
# on 2 cores, anything else running distorts the numbers several-fold.
set -euo pipefail
cd "$(dirname "$0")"
python bench_startup.py --repeat 5
python bench_prepare.py --images 500 --repeat 2
home="${BENCH_HOME:-/tmp/dermcam-bench}"  # one prepared copy of the lite set for all training benchmarks
for size in 128 192x144 224; do python bench_train.py --home "$home" --image-size "$size" --batches 4; done
for size in 192x144 256x192; do  # `dermcam train --freeze N`: fp32 only (auto picks it on this CPU)
  python bench_train.py --home "$home" --image-size "$size" --batches 4 --freeze 0 2 3 --precision fp32
done
python bench_explain.py --images 8 --repeats 3
python bench_bootstrap.py --repeat 3
python bench_onnx.py
python bench_allocator.py --repeats 2
# The long one (about 40 minutes on 2 cores): accuracy within the CPU budget.
[ "${WITH_ACCURACY:-0}" = 1 ] && python accuracy_ham10000_lite.py
exit 0
