# A second round of mining on BEIR SciFact, one seed: the recipe (configs/scifact.toml, whose base model mines),
# then the same recipe again from the base model, with the negatives mined by the first run's best/ instead.
#
#   bash bench/second_round.sh SEED OUT [FIRST [GUIDE]]   # FIRST: a first run's best/ to reuse (skips the first
#                                                         # training); GUIDE: the second training's --guide
#
# Writes OUT/first (unless FIRST is given), OUT/second, and each model's test scores in OUT/*-test.md. About
# 70 minutes a seed on 2 CPU cores (35 with FIRST). The results and what they show: BENCHMARKS.md, "Retrieval".
set -euo pipefail
: "${MNR_DATA_DIR:?set MNR_DATA_DIR to the folder that holds retrieval/scifact}"
seed=$1 out=$2 first=${3:-} guide=${4:-}
mkdir -p "$out"
if [ -z "$first" ]; then
    mnr train --config configs/scifact.toml --seed "$seed" --output "$out/first"
    mnr eval "$out/first/best" --retrieval retrieval/scifact --split test | tee "$out/first-test.md"
    first=$out/first/best
fi
mnr train --config configs/scifact.toml --seed "$seed" --mine-model "$first" ${guide:+--guide "$guide"} \
    --output "$out/second"
mnr eval "$out/second/best" --retrieval retrieval/scifact --split test | tee "$out/second-test.md"
