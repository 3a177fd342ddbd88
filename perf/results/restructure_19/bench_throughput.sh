#!/bin/bash
# side by side: the commit before #19 (fee0092, /tmp/base via PYTHONPATH) and the new tree, alternating
cd /work/main
OUT=perf/results/restructure_19
ARGS="--dtype bfloat16 --input-len 128 --output-len 64 --num-prompts 32 --num-iters 3 --num-threads 2 --disable-tqdm"
for i in 1 2 3; do
  PYTHONPATH=/tmp/basepkg OMP_NUM_THREADS=2 .venv/bin/python -m fornax.api.cli bench throughput $ARGS --output-json $OUT/throughput_before_$i.json > /tmp/tp_before_$i.log 2>&1
  OMP_NUM_THREADS=2 .venv/bin/python -m fornax.api.cli bench throughput $ARGS --output-json $OUT/throughput_after_$i.json > /tmp/tp_after_$i.log 2>&1
done
echo finished
