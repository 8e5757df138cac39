#!/usr/bin/env bash
# Every GPU check of the project in one unattended run: the test suite on CUDA, then the benchmarks, each under its
# own time limit, each log written to $OUT (default gpu_logs/) as it goes, so that what finished is kept when a
# later step runs out of time.
#
#   bash benchmarks/gpu_session.sh prepare            # where pip works: wheels of what a CUDA image lacks
#   bash benchmarks/gpu_session.sh run [STEP ...]     # on the GPU machine (its python3 with torch, or PYTHON=...)
#
# `prepare` downloads into .whl/ (git-ignored; carry it to the GPU machine) the wheels of the project's
# dependencies that a PyTorch CUDA image usually lacks (faiss-cpu, kornia, kornia_rs), for Python 3.12 on x86-64;
# `run` installs them into /tmp/site when .whl/ exists. STEPS below names the steps and their time limits (about
# 13 minutes in all); `run pytest bench_rerank` then `run bench_rerank_compiled bench_amp_agreement bench_train
# bench_backbone` keeps each call under 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}

case "${1:-}" in
prepare)
    platforms=()
    for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$platform")
    done
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        "${platforms[@]}" -d .whl faiss-cpu==1.15.1 kornia==0.9.0 kornia_rs==0.2.0
    ;;
run) shift ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh {prepare | run [STEP ...]}" >&2
    exit 2
    ;;
esac

mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# name | seconds | command
STEPS=(
    "pytest|200|$PYTHON -m pytest -q -x --device cuda -p no:cacheprovider"
    "bench_rerank|240|$PYTHON -m benchmarks.bench_rerank --device cuda"
    "bench_rerank_compiled|150|$PYTHON -m benchmarks.bench_rerank --device cuda --skip_kernel --compile_head reduce-overhead"
    "bench_amp_agreement|120|$PYTHON -m benchmarks.bench_amp_agreement --device cuda"
    "bench_train|90|$PYTHON -m benchmarks.bench_train --device cuda"
    "bench_backbone|60|$PYTHON -m benchmarks.bench_backbone --device cuda --batch_size 32 64 128"
)
status=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name seconds command <<<"$step"
    if [ "$#" -gt 0 ] && [[ " $* " != *" $name "* ]]; then
        continue
    fi
    echo "== $name (at most $seconds s): $command"
    start=$SECONDS
    timeout "$seconds" $command >"$OUT/$name.log" 2>&1
    code=$?
    echo "   exit $code after $((SECONDS - start)) s; last lines of $OUT/$name.log:"
    tail -n 25 "$OUT/$name.log" | sed 's/^/   /'
    [ "$code" -eq 0 ] || status=1
done
exit "$status"
