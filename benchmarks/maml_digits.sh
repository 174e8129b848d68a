#!/usr/bin/env bash
# Reproduces the README's digits row: second-order MAML, conv-4 (32 filters) on scikit-learn's
# 8x8 digits, 5-way 1-shot; meta-trained on digits 0-4 (with rotations as extra classes),
# meta-tested on the held-out digits 5-9 (1,000 episodes, 95% CI).
set -euo pipefail
fastmeta train maml --task digits --ways 5 --shots 1 --queries 5 --meta-batch 8 \
  --inner-steps 1 --inner-lr 0.4 --filters 32 --iterations "${ITERATIONS:-2000}" \
  --eval-every 500 --eval-tasks 1000 --eval-steps 1 5 --seed 0 --out runs/digits-maml
