#!/usr/bin/env bash
# Runs the participant and group levels on the embedded real ISLES'22 case with the built-in model.
set -euo pipefail
cd "$(dirname "$0")"
OUT="${1:-demo_out}"
deepisles bids_app/data/demo/isles22-sample "$OUT" participant -w "${OUT}_work" --nprocs 2 "${@:2}"
deepisles bids_app/data/demo/isles22-sample "$OUT" group
echo "report: $OUT/sub-strokecase0009.html  group: $OUT/group_lesions.html"
