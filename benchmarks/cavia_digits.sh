#!/usr/bin/env bash
# Reproduces the README's CAVIA digits row: CAVIA with FiLM (FiLMConv4, 32 filters, 100 context
# params, two inner steps with lr 1.0, as in Zintgraf et al.'s classification code) on
# scikit-learn's 8x8 digits, 5-way 1-shot, on the same episodes as benchmarks/maml_digits.sh:
# meta-trained on digits 0-4 (rotations as extra classes), meta-tested on the held-out digits
# 5-9 (1,000 episodes, 95% CI).
set -euo pipefail
fastmeta train cavia --task digits --ways 5 --shots 1 --queries 5 --meta-batch 8 \
  --inner-steps 2 --inner-lr 1.0 --filters 32 --iterations "${ITERATIONS:-2000}" \
  --eval-every 500 --eval-tasks 1000 --eval-steps 2 5 --seed 0 --out "${RUNS:-runs}/digits-cavia"
