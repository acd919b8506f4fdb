# The two races of this folder (issue 27 item 1: a variant's curve does not depend on its neighbours).
# Run from the repository root; 2-core machine, 1 thread, load average about 6.5 (other work).
# --save kept the trained models under OUT/models/ (not committed: weights).
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
COMMON="--model minilm --task wordnet-supersense --train-limit 1600 --eval-limit 600 --batch-size 32 --lr 1e-4 --evaluations 5 --threads 1 --no-progress"
lrdaccel race $COMMON --variants "original,original(lr=2),lrd" --save --out three
lrdaccel race $COMMON --variants "original" --out alone
