#!/bin/bash
# issue 15: clustering.cross_spatial end to end against the shipped spectral clustering, rho 0.9 cmnist_multi
# and C-MNIST, each seed's upstream (ERM, heatmaps) shared by its ways. SEEDS: default "10 11 12 13 14";
# WAYS: default "shipped all hard" (cross_spatial none, all, hard); run folders: runs/cross/TAG-WAY-sSEED. Summary: python benchmarks/studies/spectral_split_summary.py --root runs/cross [SEEDS]
cd "$(dirname "$0")/../.." && EXMAP=${EXMAP:-.venv/bin/exmap-ray}
for seed in ${SEEDS:-10 11 12 13 14}; do
  for v in "cmnist_multi rho09 --set dataset.rho=0.9" "cmnist c"; do
    set -- $v; spec=$1; tag=$2; shift 2
    for way in ${WAYS:-shipped all hard}; do
      case $way in shipped) flags="";; *) flags="--set clustering.cross_spatial=$way";; esac; name=$way
      echo "=== $spec $tag seed $seed $name $(date -u +%H:%M:%S)"
      /usr/bin/time -f "%e s" $EXMAP run tune_specs/$spec.yaml "$@" $flags --set seed=$seed \
        --cache runs/bench-cache --out runs/cross/$tag-$name-s$seed --quiet
    done
  done
done
echo ALLDONE
