#!/usr/bin/env bash
#################################################################################
# scnym demo: learn PBMC cell types from two donors, annotate a third donor.
#
# Data: real 10x PBMCs of Kang et al. 2018 (GSE96583), shipped in demo/ (2,400 reference
# cells of donors 1015 and 1256, 858 query cells of donor 101; raw counts).
# Sets up its own environment on first run (.venv), then trains with 3-fold
# cross-validation and predicts the held-out donor. Takes a few minutes on 2 CPU cores.
#################################################################################
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh

OUT=demo_out
echo "== training (config: configs/demo.yaml) =="
scnym train_tissue_independent -c configs/demo.yaml --out_path "$OUT/model" --overwrite true

echo "== predicting the held-out donor =="
scnym predict_cell_types --model_path "$OUT/model" --input_counts demo/kang_query.h5ad \
    --lower_group cluster_id --out_path "$OUT/predictions" --overwrite true --coverage 0.95

python - "$OUT" <<'PY'
import json, sys
import pandas as pd
out = sys.argv[1]
cv = pd.read_csv(f"{out}/model/fold_eval_acc.csv")
summary = json.load(open(f"{out}/predictions/prediction_summary.json"))
held_out = summary["metrics_vs_cluster_id"]
print()
print(f"cross-validation on the reference donors: accuracy {cv['accuracy'].mean():.3f}, "
      f"balanced accuracy {cv['balanced_accuracy'].mean():.3f} ({len(cv)} folds)")
print(f"held-out donor 101 ({summary['n_cells']} cells): accuracy {held_out['accuracy']:.3f}, "
      f"balanced accuracy {held_out['balanced_accuracy']:.3f}, macro-F1 {held_out['macro_f1']:.3f}")
print(f"prediction sets at coverage 0.95: {held_out['coverage']:.1%} hold the true type, "
      f"{held_out['mean_set_size']:.2f} types on average (column prediction_set)")
print(f"model:        {out}/model  (all_data/ is the final model; fold00..02 the cross-validation; "
      "all four predict together)")
print(f"predictions:  {out}/predictions/predictions.csv and annotated.h5ad")
print(f"reports:      {out}/model/report.html and {out}/predictions/report.html (open in a browser; "
      "scnym print_model for the model card)")
print(f"plots:        {out}/model/confusion_matrix.png, {out}/model/all_data/training_curve.png")
print(f"per class:    {out}/predictions/per_class_metrics.csv, confusion_matrix.png, reliability_diagram.png")
PY
