#!/bin/bash
cd /tmp/pf
for v in base noout; do
  echo "$(date -u +%H:%M:%S) start $v segment=16" >> /tmp/pf.log
  PF_VARIANT=$v OMP_NUM_THREADS=1 PYTHONPATH=/tmp/pf/src nice -n 5 /work/main/.venv/bin/python -m effattn compare --preset quick --only recall --jobs 1 --threads 1 --mixers titans_mac --mixer-options "titans_mac:paper_form=True;segment=16" --out /tmp/pf_out/${v}_seg16 >> /tmp/pf_${v}_seg16.log 2>&1
  echo "$(date -u +%H:%M:%S) end $v segment=16 rc=$? $(grep -E '^\| titans_mac' /tmp/pf_out/${v}_seg16/report.md | head -1)" >> /tmp/pf.log
done
