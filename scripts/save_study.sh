#!/usr/bin/env bash
# Copy the records of a `kunlun ablate` study's finished runs (no checkpoints) into a folder that git keeps,
# so a study survives the machine it ran on.
#   bash scripts/save_study.sh runs/ablation results/ablation-500k      # save (run again to add newer runs)
#   mkdir -p runs/ablation && cp -r results/ablation-500k/runs runs/ablation/   # restore: those runs count as done
# Per finished run: spec.json (its settings), done.json (final loss, evaluation, tokens/s), metrics.jsonl
# (the loss curves). `kunlun ablate --report-only --out DEST` (with the study's flags) rebuilds the report there.
set -euo pipefail
src=${1:?usage: save_study.sh STUDY_FOLDER DEST}
dest=${2:?usage: save_study.sh STUDY_FOLDER DEST}
[ -d "$src/runs" ] || { echo "save_study: $src/runs not found: give a kunlun ablate --out folder" >&2; exit 2; }
n=0
for done in "$src"/runs/*/done.json; do
  [ -f "$done" ] || continue
  run=$(basename "$(dirname "$done")")
  mkdir -p "$dest/runs/$run"
  cp "$src/runs/$run/spec.json" "$src/runs/$run/metrics.jsonl" "$dest/runs/$run/"
  cp "$done" "$dest/runs/$run/done.json"  # last: a run is done when done.json exists
  n=$((n + 1))
done
[ -f "$src/study.json" ] && cp "$src/study.json" "$dest/"
echo "save_study: $n finished runs of $src saved in $dest"
