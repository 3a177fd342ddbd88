#!/bin/bash
# side by side over HTTP: fornax serve at fee0092 (before #19) and at HEAD, same flags, one bench run each order
cd /work/main
OUT=perf/results/restructure_19
FLAGS="--dtype bfloat16 --max-model-len 2048"
PYTHONPATH=/tmp/basepkg OMP_NUM_THREADS=2 .venv/bin/python -m fornax.api.cli serve $FLAGS --port 8101 > /tmp/srv_before.log 2>&1 &
B=$!
OMP_NUM_THREADS=2 .venv/bin/python -m fornax.api.cli serve $FLAGS --port 8102 > /tmp/srv_after.log 2>&1 &
A=$!
for p in 8101 8102; do for i in $(seq 120); do curl -sf http://127.0.0.1:$p/health >/dev/null && break; sleep 1; done; done
BENCH="--endpoint /v1/completions --input-len 128 --output-len 64 --num-prompts 48 --max-concurrency 8 --ignore-eos --num-warmups 2 --seed 0 --disable-tqdm"
OMP_NUM_THREADS=1 .venv/bin/fornax bench serve $BENCH --base-url http://127.0.0.1:8102 --peer-base-url http://127.0.0.1:8101 --output-json $OUT/serve_after_vs_before.json > /tmp/bs1.log 2>&1
OMP_NUM_THREADS=1 .venv/bin/fornax bench serve $BENCH --base-url http://127.0.0.1:8101 --peer-base-url http://127.0.0.1:8102 --output-json $OUT/serve_before_vs_after.json > /tmp/bs2.log 2>&1
kill -TERM $A $B; wait
echo finished
