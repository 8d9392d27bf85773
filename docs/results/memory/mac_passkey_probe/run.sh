#!/bin/bash
# MAC passkey probe: the passkey command of mag_mac_probe, one option changed per run
cd /tmp/mp
BASE="--parts passkey --models titans_mac --workers 1 --window 32 --train-len 48,192 --tokens-per-step 768 --theta-max 1.0 --forget-bias -6 --max-grad-norm 1 --threads 1 --seed 0"
run() { name=$1; shift
  echo "$(date -u +%H:%M:%S) start $name: $*" >> /tmp/mp.log
  OMP_NUM_THREADS=1 PYTHONPATH=/tmp/mp/src nice -n 5 /work/main/.venv/bin/python -m effattn bench memory $BASE "$@" --out /tmp/mp_out/$name > /tmp/mp_$name.log 2>&1
  echo "$(date -u +%H:%M:%S) end $name rc=$? $(grep -E '^\| titans_mac' /tmp/mp_out/$name/passkey.md | head -1)" >> /tmp/mp.log
}
run control --steps 800 --heads 1
run heads2 --steps 800 --heads 2
run chunk8 --steps 800 --heads 1 --chunk-size 8
run steps2400 --steps 2400 --heads 1
