#!/bin/bash
# issue 15: clustering.input heatmaps / features / both end to end, rho 0.9 cmnist_multi and C-MNIST,
# each seed's upstream (ERM, heatmaps) shared by its three inputs. SEEDS: default "5 6 7 8 9";
# EXTRA: more --set flags for every run; run folders: runs/inputs/TAG-INPUT-sSEED.
# Summary: python benchmarks/studies/spectral_split_summary.py --root runs/inputs [SEEDS]
cd "$(dirname "$0")/../.." && EXMAP=${EXMAP:-.venv/bin/exmap-ray}
for seed in ${SEEDS:-5 6 7 8 9}; do
  for v in "cmnist_multi rho09 --set dataset.rho=0.9" "cmnist c"; do
    set -- $v; spec=$1; tag=$2; shift 2
    for input in heatmaps features both; do
      echo "=== $spec $tag seed $seed $input $EXTRA $(date -u +%H:%M:%S)"
      /usr/bin/time -f "%e s" $EXMAP run tune_specs/$spec.yaml "$@" $EXTRA --set clustering.input=$input --set seed=$seed \
        --cache runs/bench-cache --out runs/inputs/$tag-$input-s$seed --quiet
    done
  done
done
echo ALLDONE
