#!/bin/bash
# The round-3 study (issue [9]), one cell (|R|/|T|, world) per invocation, in priority order, so that the
# cells finished before a deadline survive a cut-off. Usage: benchmarks/study_round3.sh OUTDIR
# then: python benchmarks/study_merge.py OUTDIR/r*.json --json benchmarks/study_round3.json
set -u
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
run() { # ratio reps world
  f=$out/r$1_$3.json
  [ -s "$f" ] && return
  echo "$(date -u +%T) start r$1 $3 reps=$2 load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/log"
  nice -n 10 .venv/bin/python benchmarks/study_tests.py --reps "$2" --worlds "$3" \
     --tests selection_perm,selection_contrast,two_sample --procs 2 --ref-ratio "$1" --json "$f" > "$out/r$1_$3.md"
  echo "$(date -u +%T) done  r$1 $3 rc=$? load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/log"
}
run 1 40 aniso_zipf_planted_x5
run 1 200 aniso_zipf; run 1 200 cone; run 4 200 aniso_zipf; run 1 40 aniso_zipf_planted_x2
run 1 200 identities_unequal; run 4 25 aniso_zipf_planted_x5; run 1 200 identities_equal; run 4 200 cone
run 1 40 planted_x2; run 1 40 planted_x5; run 1 200 anisotropic
for w in identities_unequal identities_equal anisotropic; do run 4 200 $w; done
for w in aniso_zipf_planted_x2 planted_x2 planted_x5; do run 4 25 $w; done
run 1 200 isotropic; run 4 200 isotropic
