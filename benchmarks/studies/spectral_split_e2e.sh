#!/bin/bash
# issue 15: spectral_split end to end vs the shipped spectral, same upstream per seed, seeds 0-2.
# EXTRA: more --set flags for every run (e.g. EXTRA="--set retrain.dfr.balance=reweight");
# SUFFIX: appended to each run folder's name (runs/split/TAG-METHOD-sSEED$SUFFIX); SEEDS: default "0 1 2".
cd "$(dirname "$0")/../.." && EXMAP=${EXMAP:-.venv/bin/exmap-ray}
for seed in ${SEEDS:-0 1 2}; do
  for v in "cmnist_multi rho09 --set dataset.rho=0.9" "cmnist c"; do
    set -- $v; spec=$1; tag=$2; shift 2
    for m in spectral spectral_split; do
      echo "=== $spec $tag seed $seed $m $EXTRA $(date -u +%H:%M:%S)"
      /usr/bin/time -f "%e s" $EXMAP run tune_specs/$spec.yaml "$@" $EXTRA --set clustering.method=$m --set seed=$seed \
        --cache runs/bench-cache --out runs/split/$tag-$m-s$seed$SUFFIX --quiet
    done
  done
done
echo ALLDONE
