#!/usr/bin/env bash
# One device-machine session: GPU tests, the GPU benchmark (bench/bench_gpu.py; Alard-Lupton at 2048^2 and
# 4096^2, then the delta-function basis at 2048^2 for issue 13's DF/AL time ratio), then a cProfile
# of one warm 4096^2 CuPy run (bench/profile_gpu.py: where the host time goes).
#
# Run from the repository root on a machine with a CUDA device and CuPy.  The
# wheels of packages that machine lacks (astropy, pyerfa, astropy-iers-data)
# are expected in .whl/ (see bench/README.md); results go to $OUT (default ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 GPUDIFFIM_CACHE_DIR=/tmp/gdi-cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import gpudiffim, json; print(json.dumps(gpudiffim.backend_info()))"
python3 -m pytest tests -m gpu -q -p no:cacheprovider "${@}" 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
python3 bench/bench_gpu.py --sizes ${SIZES:-2048 4096} --repeat ${REPEAT:-5} --json "$OUT/bench-gpu.json" 2>&1 \
    | tee "$OUT/bench-gpu.log" | tail -20
# issue 13: the delta-function basis at its defaults, 2048^2, against the Alard-Lupton 2048^2 row above
python3 bench/bench_gpu.py --sizes 2048 --repeat ${DF_REPEAT:-3} --no-numpy --basis delta-function \
    --json "$OUT/bench-gpu-df.json" 2>&1 | tee "$OUT/bench-gpu-df.log" | tail -4
python3 bench/profile_gpu.py --size 4096 --top 40 > "$OUT/profile-4096.txt" 2>&1
head -1 "$OUT/profile-4096.txt"
