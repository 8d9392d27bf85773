#!/bin/bash
cd /tmp/mp
BASE="--parts passkey --workers 1 --window 32 --tokens-per-step 768 --theta-max 1.0 --forget-bias -6 --max-grad-norm 1 --threads 1 --seed 0 --heads 1"
run() { name=$1; shift
  echo "$(date -u +%H:%M:%S) start $name: $*" >> /tmp/mp.log
  OMP_NUM_THREADS=1 PYTHONPATH=/tmp/mp/src nice -n 5 /work/main/.venv/bin/python -m effattn bench memory $BASE "$@" --out /tmp/mp_out/$name > /tmp/mp_$name.log 2>&1
  echo "$(date -u +%H:%M:%S) end $name rc=$? $(grep -E '^\| (titans_mac|swa)' /tmp/mp_out/$name/passkey.md | head -1)" >> /tmp/mp.log
}
run mac_curriculum --models titans_mac --train-len 24,192 --curriculum 0.5 --steps 1600
