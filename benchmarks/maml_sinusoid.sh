#!/usr/bin/env bash
# Reproduces the README's MAML / FOMAML / Meta-SGD sinusoid table (Finn et al. 2017's
# protocol: meta-batch 25, 10 shots, one inner step with alpha = 0.01, outer Adam at 1e-3,
# 30,000 meta-iterations; evaluated on 1,000 new tasks with 5 and 10 shots after 1 and 10
# steps, MSE on 100 evenly spaced points in [-5, 5], 95% CI).
set -euo pipefail
iterations=${ITERATIONS:-30000}
common=(--task sinusoid --shots 10 --meta-batch 25 --inner-steps 1 --inner-lr 0.01
        --outer-lr 0.001 --iterations "$iterations" --eval-every 2000 --eval-tasks 1000
        --eval-steps 1 10 --eval-shots 5 10 --seed 0)
fastmeta train maml "${common[@]}" --out runs/sinusoid-maml
fastmeta train maml "${common[@]}" --first-order --out runs/sinusoid-fomaml
fastmeta train maml "${common[@]}" --learn-inner-lr per_param --out runs/sinusoid-metasgd
