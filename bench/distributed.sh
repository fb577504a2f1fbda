#!/usr/bin/env bash
# Meta-iterations per second with 1 and with 2 processes on this machine (CPU, gloo).
#   bash bench/distributed.sh [extra train.py flags]
# Prints the training time of a fixed number of iterations for each; nothing is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
flags=(--n_way 5 --k_spt 1 --glob_update_step 1 --glob_base_lr 0.4 --task_num 32 --epochs 30
       --val_every 100000 --val_tasks 1 --log_every 100000 --ckpt_every 100000 --work_dir "$work" "$@")
python train.py "${flags[@]}" --run_name one > "$work/one.log" 2>&1 || { tail -5 "$work/one.log"; exit 1; }
python -m paddle.distributed.launch --nproc_per_node 2 --log_dir "$work/logs" train.py "${flags[@]}" \
  --run_name two > "$work/two.log" 2>&1 || { tail -5 "$work/logs/workerlog.0"; exit 1; }
for run in one two; do
  python - "$work/$run/last.npz" "$run" <<'PY'
import json, sys
import numpy as np
with np.load(sys.argv[1], allow_pickle=False) as data:
    meta = json.loads(str(data["meta"]))
    size = sum(data[k].size for k in data.files if k.startswith("param:"))
state = meta["state"]
its = state["iteration"] / state["elapsed_seconds"]
processes = {"one": 1, "two": 2}[sys.argv[2]]
print(f"{processes} process(es): {its:.3f} meta-iterations/s over {state['iteration']} iterations; "
      f"all-reduce per iteration: {size} floats ({size * 4 / 1024:.0f} KiB) + the loss sum")
PY
done
