#!/bin/bash
# The speed figures of docs/memory.md as one measurement-lane job (about 6-12 minutes):
#   /tmp/quiet/lane bash docs/results/memory/lane_speed.sh
# 1. bench memory's speed part (every memory mixer at 512 and 2048; fast vs materialized paired rows and the
#    token rule for Titans MAL/MAG/MAC; titans-pytorch as the external row where installed);
# 2. before/after: Titans MAL/MAG/MAC forward+backward with the tree before the fast form (c9f9ee7) and
#    this tree, back to back.
set -u
cd "$(dirname "$0")/../../.."
OUT=docs/results/memory
PY=.venv/bin/python
timeout 660 $PY -m effattn bench memory --parts speed --lengths 512,2048 --repeats 3 --threads 1 --out $OUT
rm -rf /tmp/h18a_old && mkdir -p /tmp/h18a_old && git archive c9f9ee7 src | tar -x -C /tmp/h18a_old
PYTHONPATH=/tmp/h18a_old/src timeout 240 $PY $OUT/before_after.py --label before --repeats 2 --out $OUT/before_after_before.json
timeout 120 $PY $OUT/before_after.py --label after --repeats 2 --out $OUT/before_after_after.json
$PY $OUT/before_after.py --table $OUT/before_after_before.json $OUT/before_after_after.json | tee $OUT/before_after.md
