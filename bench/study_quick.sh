#!/usr/bin/env bash
# jobs/study.yaml at a fraction of its length, for a machine that cannot give it hours: the same
# stages, claims and settings, two seeds, and every training length cut (see the sed lines). Run
# from the repository root after `make study`'s two ingest lines; the page lands in
# runs/runs/study/study/. Prints the wall time and the load average before and after.
#   bash bench/study_quick.sh
set -euo pipefail
quick=$(mktemp --suffix=.yaml)
trap 'rm -f "$quick"' EXIT
sed -e 's/seed: \[0, 1, 2\]/seed: [0, 1]/' \
    -e 's/batch_size: 128/batch_size: 64/' \
    -e 's/&pretrain_steps 300/\&pretrain_steps 100/' \
    -e 's/image_size: 28, queue_size: 1024, steps: 150}/image_size: 28, queue_size: 1024, steps: 40}/' \
    -e 's/&label_epochs 30/\&label_epochs 10/' \
    -e 's/&fraction_epochs 20/\&fraction_epochs 3/' \
    -e 's/shots: 4, epochs: 100/shots: 4, epochs: 30/' \
    -e 's/steps: \[40, 120\]/steps: [15, 45]/; s/ 40 steps/ 15 steps/; s/ 120 steps/ 45 steps/' \
    -e 's/hpt-40/hpt-15/g; s/hpt-120/hpt-45/g; s/scratch-40/scratch-15/g; s/scratch-120/scratch-45/g; s/hpt-bn-40/hpt-bn-15/g' \
    -e 's/shots: \[1, 2, 4, 8\]/shots: [1, 4]/' \
    -e '/fewshot_2_top1\|fewshot_8_top1/d' \
    -e 's/^    trials: 1 .*/    trials: 1\n    epochs: 30/' \
    jobs/study.yaml > "$quick"
.venv/bin/unsupft-ctl validate "$quick"
echo "load before: $(cat /proc/loadavg)"
start=$(date +%s)
.venv/bin/unsupft-ctl run "$quick"
echo "wall: $(( $(date +%s) - start )) s; load after: $(cat /proc/loadavg)"
