#!/usr/bin/env bash
# The first round's recipe against the shift-robust recipe on the same budget: one epoch of
# fine-tuning the first round's bundled backbone each (configs/default-model-robust.toml with every
# recipe switch off: round1; with only colour constancy on: sog-only; as it is: robust), then each
# measured by scripts/measure_model.py (test splits and all of PH2). No out-of-distribution gate is
# fitted: it does not change the heads.
#
#     bash scripts/compare_recipes.sh [OUT]        # OUT defaults to runs/compare
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare}
MVIT=${MVIT:-.venv/bin/mvit}
PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=configs/default-model-robust.toml
SAME=(--epochs 1 --set calibration.ood_gate.enabled=false --set augmentation.mixing.off_epochs=0)
AUGMENTATION_OFF=(
  --set 'augmentation.policy="none"' --set augmentation.random_erasing=0
  --set augmentation.shift.resample=0 --set augmentation.shift.jpeg=0 --set augmentation.shift.blur=0
  --set augmentation.shift.exposure=0 --set augmentation.shift.vignette=0
  --set augmentation.mixing.mixup_alpha=0 --set augmentation.mixing.cutmix_alpha=0
  --set training.ema_decay=0 --set 'training.best_metric="balanced_accuracy"'
)
for recipe in round1 sog-only robust; do
  [ -f "$OUT/$recipe/best.safetensors" ] && continue
  case $recipe in
    round1) extra=("${AUGMENTATION_OFF[@]}" --set 'preprocessing.color_constancy="none"') ;;
    sog-only) extra=("${AUGMENTATION_OFF[@]}") ;;
    robust) extra=() ;;
  esac
  "$MVIT" train "$CONFIG" "${SAME[@]}" "${extra[@]}" --output "$OUT/$recipe"
done
for recipe in round1 sog-only robust; do
  "$PYTHON" scripts/measure_model.py "$OUT/$recipe/best.safetensors" --out "$OUT/$recipe/measure"
done
