#!/bin/bash
# Titans MAC passkey probe (what ran, 08:33-08:48 UTC, from a clean clone at f09c169 in /tmp/mp): the passkey
# command of mag_mac_probe/ with one option changed per run; each run's own command is in <run>/passkey.md.
cd /tmp/mp
COMMON="--parts passkey --workers 1 --window 32 --tokens-per-step 768 --theta-max 1.0 --forget-bias -6 --max-grad-norm 1 --threads 1 --seed 0"
run() { name=$1; shift
  echo "$(date -u +%H:%M:%S) start $name: $*" >> /tmp/mp.log
  OMP_NUM_THREADS=1 PYTHONPATH=/tmp/mp/src nice -n 5 /work/main/.venv/bin/python -m effattn bench memory $COMMON "$@" --out /tmp/mp_out/$name > /tmp/mp_$name.log 2>&1
  echo "$(date -u +%H:%M:%S) end $name rc=$? $(grep -E '^\| (titans_mac|swa)' /tmp/mp_out/$name/passkey.md | head -1)" >> /tmp/mp.log
}
MAC="--models titans_mac --train-len 48,192"
run control $MAC --steps 800 --heads 1
run heads2 $MAC --steps 800 --heads 2
run chunk8 $MAC --steps 800 --heads 1 --chunk-size 8
run steps2400 $MAC --steps 2400 --heads 1
# does MAC learn passkey when the whole prompt fits its segment (training loss)?
IN="--steps 800 --heads 1 --contexts 128,256 --train-len 24,32"
run mac_in_segment --models titans_mac $IN
run swa_in_window --models swa $IN
# a length curriculum from prompts inside the segment
run mac_curriculum --models titans_mac --heads 1 --train-len 24,192 --curriculum 0.5 --steps 1600
