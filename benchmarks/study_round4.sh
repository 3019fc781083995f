#!/bin/bash
# The round-4 study (issue [9]): the cells round 3 left (benchmarks/study_round3.sh), 200 replicates each,
# in priority order: collapse-free worlds at |R| = 4|T|, isotropic, fresh-seed reruns of cells above
# alpha + 2 SE, then the planted worlds at 200 replicates. One cell per invocation (a cut-off keeps the
# finished ones); a cell whose file exists is skipped.
# Usage: benchmarks/study_round4.sh OUTDIR, then
#   python benchmarks/study_merge.py OUTDIR/r*.json --json benchmarks/study_round4.json
set -u
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
run() { # ratio reps world [seed]
  seed=${4:-2026}
  f=$out/r$1_$3_n$2$([ "$seed" = 2026 ] || echo _seed$seed).json
  [ -s "$f" ] && return
  echo "$(date -u +%T) start r$1 $3 reps=$2 seed=$seed load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/log"
  nice -n 19 .venv/bin/python benchmarks/study_tests.py --reps "$2" --worlds "$3" --seed "$seed" \
     --tests selection_perm,selection_contrast,two_sample --procs 2 --ref-ratio "$1" --json "$f" > "${f%.json}.md"
  echo "$(date -u +%T) done  r$1 $3 rc=$? load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/log"
}
for w in identities_unequal identities_equal anisotropic; do run 4 200 $w; done
run 1 200 isotropic; run 4 200 isotropic
run 4 200 anisotropic 2027; run 4 200 cone 2027
for w in planted_x5 planted_x2; do run 1 200 $w; run 4 200 $w; done
for w in aniso_zipf_planted_x5 aniso_zipf_planted_x2; do run 1 200 $w; run 4 200 $w; done
