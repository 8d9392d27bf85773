#!/bin/bash
cd /tmp/pf
for v in base noout norm,noout; do
  for seed in 0; do
  echo "$(date -u +%H:%M:%S) start $v" >> /tmp/pf.log
  PF_VARIANT=$v OMP_NUM_THREADS=1 PYTHONPATH=/tmp/pf/src nice -n 5 /work/main/.venv/bin/python -m effattn compare --preset quick --only recall --jobs 1 --threads 1 --mixers titans_mac --mixer-options "titans_mac:paper_form=True" --seed $seed --out /tmp/pf_out/$v >> /tmp/pf_$v.log 2>&1
  echo "$(date -u +%H:%M:%S) end $v rc=$? $(grep -E '^\| titans_mac' /tmp/pf_out/$v/report.md | head -1)" >> /tmp/pf.log
  done
done
