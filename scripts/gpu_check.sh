#!/usr/bin/env bash
# One GPU, end to end, sized to take under 8 minutes (its benchmarks took 231 s on an H200; each step's seconds are printed):
# the loss-mode, imported-model step, refinement-step, freeze and AMP benchmarks (fp32 vs fp16 with GradScaler vs bf16),
# with hrnet_w32 at 512² and 768² (the refinement stage's step and memory against the masked step: issue 13's GPU rows);
# a 4-trial sweep sharing the GPU (--gpus-per-trial 0.5, --mixed_precision) on a synthetic set at 512²; export and
# predict. Prints a BENCHMARKS.md-ready record (device, peak GPU memory per loss mode, step times, ratios, the
# sweep's epoch times and memory) and keeps it in OUT/gpu_check.md; paste it into BENCHMARKS.md by hand. Never
# part of the test suite.
#
#   scripts/gpu_check.sh                              # on a CUDA machine (default --device cuda)
#   scripts/gpu_check.sh --device cpu --smoke-test    # anywhere: tiny sizes, checks that every step runs
#
# Options: --device cuda|cpu, --smoke-test, --out DIR (default: a new temporary folder, kept).
set -euo pipefail

DEVICE=cuda
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --smoke-test) SMOKE=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RECORD="$OUT/gpu_check.md"
: > "$RECORD"
export NO_ALBUMENTATIONS_UPDATE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export TUNE_LANDMARKS_CACHE="$OUT/cache"
cd "$ROOT/scripts"

if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: --device cuda, but torch sees no CUDA device')"
fi

T0=$(date +%s)
STAGES=()
stage() {  # stage NAME COMMAND...: run, time, and remember the seconds
    local name="$1"; shift
    local t=$(date +%s)
    echo "== $name: $*" >&2
    "$@"
    STAGES+=("$name: $(( $(date +%s) - t )) s")
}

# ---------------------------------------------------------------- the benchmarks (each appends its record)
if [ "$SMOKE" = 1 ]; then
    BENCH=(--smoke-test --device "$DEVICE" --record "$RECORD")
    SIZES=(64)
    MODEL=(--models hrnet_w18_small_v2)
    FT=()
else
    BENCH=(--device "$DEVICE" --record "$RECORD" --repeats 5 --threads 4)
    SIZES=(512 768)
    MODEL=(--models hrnet_w32)
    # fine-tunes small enough for the budget: 40 synthetic images, a 5-epoch start model, 3 fine-tuning epochs
    FT=(--model hrnet_w32 --batch-size 4 --num-images 40 --synth-size 800 --start-epochs 5 --epochs 3)
fi
stage "loss modes" "$PY" bench_loss_modes.py "${BENCH[@]}" "${MODEL[@]}" --sizes "${SIZES[@]}" \
    $([ "$SMOKE" = 1 ] || echo --batch-size 4)
stage "imported model step" "$PY" bench_imported.py "${BENCH[@]}" $([ "$SMOKE" = 1 ] || echo --image-size 768 --batch-size 4)
stage "refine step" "$PY" bench_refine.py "${BENCH[@]}" "${MODEL[@]}" --sizes "${SIZES[@]}" \
    $([ "$SMOKE" = 1 ] || echo --batch-size 4 --refine-models hrnet_w18_small resnet18)
for size in "${SIZES[@]}"; do
    stage "freeze ${size}px" "$PY" bench_freeze.py "${BENCH[@]}" "${FT[@]}" --image-size "$size" \
        --workdir "$OUT/freeze-$size"
    stage "amp ${size}px" "$PY" bench_amp.py "${BENCH[@]}" "${FT[@]}" --image-size "$size" --workdir "$OUT/amp-$size"
done

# ---------------------------------------------------------------- a sweep sharing the GPU, export, predict
if ! "$PY" -c "import ray, optuna" 2>/dev/null; then  # e.g. a lent GPU machine that cannot fetch or carry Ray's wheel
    echo "gpu_check.sh: Ray or Optuna is not importable here: the sweep, export and predict stage is skipped" >&2
    echo "- the sweep, export and predict stage did not run: Ray or Optuna is not importable here" >> "$RECORD"
    cat "$RECORD"
    exit 0
fi
TL=("$PY" -m tune_landmarks)
if [ "$SMOKE" = 1 ]; then
    NET=(--model hrnet_w18_small_v2 --image_size 64 64); N=16; PX=192; START_EPOCHS=2; EPOCHS=2; SAMPLES=4
else
    NET=(--model hrnet_w32 --image_size 512 512); N=40; PX=800; START_EPOCHS=6; EPOCHS=3; SAMPLES=4
fi
if [ "$DEVICE" = cuda ]; then GPT=0.5; CPT=4; else GPT=0; CPT=1; fi
SWEEP_T0=$(date +%s)
stage "synthetic set" "${TL[@]}" synth --out "$OUT/data" --num-images "$N" --seed 0 --size "$PX"
stage "start model" "${TL[@]}" -q train --dataset_path "$OUT/data" "${NET[@]}" --epochs "$START_EPOCHS" --batch_size 4 \
    --lr 2e-3 --device "$DEVICE" --mixed_precision --out "$OUT/start"
stage "sweep" "${TL[@]}" search --space "$ROOT/search_spaces/demo.yaml" --dataset_path "$OUT/data" \
    --resume "$OUT/start/best.pt" --name gpu-check --storage "$OUT/sweeps" --arms masked --num-samples "$SAMPLES" \
    --max-concurrent 2 --gpus-per-trial "$GPT" --cpus-per-trial "$CPT" --epochs "$EPOCHS" --batch_size 4 \
    --mixed_precision --device "$DEVICE" "${NET[@]}"
stage "export" "${TL[@]}" export "$OUT/sweeps/gpu-check" --out "$OUT/export" --force --device "$DEVICE"
IMAGES="$(find "$OUT/data" -path '*est*' -type d -name Cephalograms | head -n 1)"
stage "predict" "${TL[@]}" predict --model "$OUT/export" --out "$OUT/predictions" --device "$DEVICE" "$IMAGES"
SWEEP_S=$(( $(date +%s) - SWEEP_T0 ))
TOTAL_S=$(( $(date +%s) - T0 ))

# ---------------------------------------------------------------- the record
"$PY" - "$OUT" "$RECORD" "$DEVICE" "$SMOKE" "$SWEEP_S" "$TOTAL_S" "${STAGES[@]}" <<'EOF'
import datetime, json, sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

out, record, device, smoke, sweep_s, total_s, *stages = sys.argv[1:]
out = Path(out)
if device == "cuda":
    p = torch.cuda.get_device_properties(0)
    dev = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}"
else:
    dev = "CPU"
exp = out / "sweeps" / "gpu-check"
trials = pq.read_table(exp / "trials.parquet").to_pandas()
epochs = pq.read_table(exp / "epochs.parquet").to_pandas()
ver = json.loads((out / "export" / "verification.json").read_text())
preds = sorted((out / "predictions").glob("*.json"))
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
lines = [f"## gpu_check: one {'GPU' if device == 'cuda' else 'CPU'} end to end ({now})", "",
         f"- device: {dev}; torch {torch.__version__}",
         f"- command: `scripts/gpu_check.sh --device {device}{' --smoke-test' if smoke == '1' else ''}`"
         + ("  (SMOKE TEST: tiny sizes, measures nothing)" if smoke == "1" else ""),
         f"- wall time: {total_s} s in all (budget 480 s): " + "; ".join(stages),
         f"- sweep: {len(trials)} trials, --gpus-per-trial {'0.5' if device == 'cuda' else '0'}, --mixed_precision, "
         f"{int(epochs.epoch.max()) if len(epochs) else 0} epochs max; synth + start model + sweep + export + predict "
         f"{sweep_s} s",
         "", "| trial | status | epochs | median s/epoch | peak MB (the trial's peak_memory_mb: CUDA allocated, or RSS on CPU) | best val MRE mm |",
         "|---|---|---|---|---|---|"]
for t in trials.itertuples():
    e = epochs[epochs.trial_id == t.trial_id]
    lines.append(f"| {t.trial_id} | {t.status} | {t.epochs_done} | {e.epoch_seconds.median():.2f} | "
                 f"{e.peak_memory_mb.max():.0f} | {t.best_val_mre:.3f} |")
lines += ["", f"- export: verified {ver['passed']} (|difference| {ver['max_abs_difference_mm']:.1e} mm); "
          f"predict: {len(preds)} images", ""]
sweep_record = "\n".join(lines)
benches = Path(record).read_text()
Path(record).write_text(sweep_record + "\n" + benches)
print("\n" + "=" * 30 + " BENCHMARKS.md-ready record (also in " + record + ") " + "=" * 30)
print(sweep_record + "\n" + benches)
EOF
