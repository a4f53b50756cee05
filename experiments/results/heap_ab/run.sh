set -x
cd /work/wt_bench
PY=/work/main/.venv/bin/python
UC="-m experiments.bench.update_cost --params mlp --bits 1,2 --repeats 10 --no-bandwidth --methods adam,laq,blaq_active,bc,ste --rounds 0"
for i in 1 2; do
  $PY -m experiments.bench.update_cost --params mlp --bits 1,2 --repeats 10 --no-bandwidth --methods 'adam,laq,blaq active,bc,ste' --rounds 0 --out /work/benchout/heap_ab/update_cost_kept_$i.json > /work/benchout/heap_ab/update_cost_kept_$i.txt 2>&1
  BLAQ_JAX_MALLOC=default $PY -m experiments.bench.update_cost --params mlp --bits 1,2 --repeats 10 --no-bandwidth --methods 'adam,laq,blaq active,bc,ste' --rounds 0 --out /work/benchout/heap_ab/update_cost_default_$i.json > /work/benchout/heap_ab/update_cost_default_$i.txt 2>&1
done
$PY -m experiments.bench.train_step --models mlp --repeats 10 > /work/benchout/heap_ab/train_step_kept.txt 2>&1
BLAQ_JAX_MALLOC=default $PY -m experiments.bench.train_step --models mlp --repeats 10 > /work/benchout/heap_ab/train_step_default.txt 2>&1
echo done > /work/benchout/heap_ab/DONE
