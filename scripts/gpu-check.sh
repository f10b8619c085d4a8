#!/usr/bin/env bash
# What we run when a GPU machine is at hand (none in CI): the CUDA tests, the whole suite with its tiny runs
# on the GPU, `make bench` on the GPU for VGG11 and ResNet18, stacked runs against one at a time on the GPU,
# and a short run of the paper recipe on Fashion-MNIST (the machine may have no internet, so no CIFAR).
# Logs and results go to OUT_DIR.
#
#   scripts/gpu-check.sh OUT_DIR [tests] [paper] [bench] [stacked]      # default: all four
#   PYTHON=python3 EPOCHS=20 scripts/gpu-check.sh /tmp/gpu paper
#   VARIANTS=off,cache,fast,all,graphs,tuned STACK_K=1,4,16,64 scripts/gpu-check.sh /tmp/gpu bench stacked
#
# Every part keeps its whole log in OUT_DIR; the script exits 1 if any part failed or ran out of time.
#
# Runs from a source checkout without installing (PYTHONPATH=src); needs torch with CUDA, numpy, pyyaml,
# tqdm, matplotlib, scikit-learn, pillow, pytest (and pytest-xdist for a parallel suite).
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUT_DIR [tests] [paper] [bench] [stacked]}
shift
parts=${*:-tests paper bench stacked}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Installed (editable) where pip can, since tests start `python -m randteach.cli` with their own PYTHONPATH.
"$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 ||
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
failed=()
check() { local rc=$1; shift; [ "$rc" -eq 0 ] || { failed+=("$* (exit $rc)"); echo "!! $* failed (exit $rc)"; }; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null || true; } | tee "$out/machine.txt"

for part in $parts; do
  case $part in
    tests)
      stamp "CUDA tests"
      "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests-gpu.log" | tail -5
      check "${PIPESTATUS[0]}" "CUDA tests"
      stamp "whole suite, tiny runs on the GPU"
      xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}")
      RANDTEACH_TEST_DEVICE=cuda timeout "${SUITE_TIMEOUT:-400}" "$py" -m pytest -v -p no:cacheprovider $xdist ${SUITE_TESTS:-tests} > "$out/tests-suite-cuda.log" 2>&1
      check $? "suite on the GPU"
      grep -E "FAILED|ERROR|passed|failed" "$out/tests-suite-cuda.log" | tail -30 ;;
    paper)
      for enc in ${ENCODERS:-vgg11 resnet18}; do
        stamp "paper recipe, $enc, Fashion-MNIST, ${EPOCHS:-20} epochs"
        # SIGTERM at the time limit: the run checkpoints and ends "interrupted" (resume with --resume).
        /usr/bin/time -v timeout -s TERM "${PAPER_TIMEOUT:-600}" "$py" -m randteach.cli --quiet distill --preset paper --data.name fashion-mnist \
          --model.encoder "$enc" --train.epochs "${EPOCHS:-20}" --train.precision "${PRECISION:-auto}" --train.teacher_cache true \
          --train.probe_every "${PROBE_EVERY:-5}" --train.checkpoint_every 0 --out "/tmp/paper-$enc-${PRECISION:-auto}" \
          > "$out/paper-$enc-${PRECISION:-auto}.log" 2> "$out/paper-$enc-${PRECISION:-auto}.time"
        check $? "paper recipe $enc"
        tail -3 "$out/paper-$enc-${PRECISION:-auto}.log"; grep -E "Elapsed|Maximum resident" "$out/paper-$enc-${PRECISION:-auto}.time"
        for f in summary.json metrics.jsonl report.md probes.png; do
          [ -f "/tmp/paper-$enc-${PRECISION:-auto}/$f" ] && cp "/tmp/paper-$enc-${PRECISION:-auto}/$f" "$out/paper-$enc-${PRECISION:-auto}-$f"
        done
      done ;;
    bench)
      for enc in ${ENCODERS:-vgg11 resnet18}; do
        stamp "benchmark on the GPU, $enc"
        timeout "${BENCH_TIMEOUT:-600}" "$py" benchmarks/run.py --device cuda --encoder "$enc" --steps "${STEPS:-20}" \
          --rounds "${ROUNDS:-2}" --probe-reps "${PROBE_REPS:-1}" --variants "${VARIANTS:-off,fast,all,graphs,tuned}" \
          --out "$out/bench-gpu-$enc.md" 2>&1 | tee "$out/bench-gpu-$enc.log" | tail -12
        check "${PIPESTATUS[0]}" "benchmark $enc"
      done ;;
    stacked)
      stamp "stacked runs on the GPU (K = ${STACK_K:-1,4,16})"
      timeout "${BENCH_TIMEOUT:-600}" "$py" benchmarks/bench_stacked.py --device cuda --k "${STACK_K:-1,4,16}" \
        --steps "${STACK_STEPS:-12}" --warmup 4 --log-every 4 --rounds "${STACK_ROUNDS:-2}" --mode vmap \
        --out "$out/bench-gpu-stacked.md" 2>&1 |
        tee "$out/bench-gpu-stacked.log" | tail -8
      check "${PIPESTATUS[0]}" "stacked runs" ;;
    *) echo "unknown part $part (tests, paper, bench, stacked)"; exit 2 ;;
  esac
done
stamp done
[ ${#failed[@]} -eq 0 ] || { printf 'FAILED: %s\n' "${failed[@]}"; exit 1; }
