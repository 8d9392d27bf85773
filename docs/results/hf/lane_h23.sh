#!/bin/bash
# Issue 23's lane jobs (run each as `/tmp/quiet/lane bash docs/results/hf/lane_h23.sh PART`: one thread pinned
# to core 0 at real-time priority). Expected times on the quiet lane, estimated from the busy runs in docs/hf.md:
#   decode   ~4 min   profile of one decode step (cProfile) + paired decode at 8k, ring vs general vs full cache
#   32k      ~9 min   Mistral and packed Llama at 32k: effattn x2, HF sdpa once (its dense 32k mask)
#   gemma32k ~2 min   Gemma 2 at 32k, effattn only (HF has no sdpa path; eager would build [B,H,T,T] scores)
#   flex     ~6 min   HF flex_attention at 4k for Llama and Mistral: compile (first call) and 2 timed calls
#                     (took 42 s: compiling was 8-19 s per shape in the lane, not the 213 s of the busy machine)
#   flex16k  ~3 min   the same at 16k
set -e
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
case "$1" in
decode)
  $PY docs/results/hf/decode_ring/profile_step.py --context 8192 --steps 20 --out docs/results/hf/decode_ring
  $PY -m effattn bench hf --parts decode --models llama,mistral,gemma2,gpt_oss --decode-context 8192 \
    --decode-tokens 16 --threads 1 --out docs/results/hf/decode_ring ;;
32k)
  $PY -m effattn bench hf --parts prefill --models mistral,packed --lengths 32768 --repeats 1 \
    --baseline-repeats 0 --threads 1 --out docs/results/hf/32k_more ;;
gemma32k)
  $PY -m effattn bench hf --parts prefill --models gemma2 --lengths 32768 --repeats 1 --threads 1 \
    --out docs/results/hf/32k_gemma2 ;;
flex)
  $PY -m effattn bench hf --parts prefill --models llama,mistral --lengths 4096 --repeats 2 --eager-max 0 \
    --flex --threads 1 --out docs/results/hf/flex_4k ;;
flex16k)
  $PY -m effattn bench hf --parts prefill --models llama,mistral --lengths 16384 --repeats 2 --eager-max 0 \
    --flex --threads 1 --out docs/results/hf/flex_16k ;;
*) echo "usage: $0 decode|32k|gemma32k|flex|flex16k" >&2; exit 2 ;;
esac
