#!/usr/bin/env bash
# Reproduce the alignment benchmark of benchmarks/RESULTS.md end to end:
#   1. train the seed recipe and the tuned registration preset for the same steps on the same photos,
#   2. evaluate both with every baseline on held-out photos, `standard` and `large` warps, with and
#      without `realistic` photometry,
#   3. print the tables (also written to $OUT/alignment.md).
#
#   bash benchmarks/run_alignment_benchmark.sh
#   STEPS=3000 PAIRS=48 bash benchmarks/run_alignment_benchmark.sh
#   SKIP_TRAINING=1 TUNED=data/default_stn_run bash benchmarks/run_alignment_benchmark.sh   # evaluate existing runs
#
# Measured on a 2-core CPU with no GPU; classical methods and the STN run single-threaded.
set -euo pipefail
cd "$(dirname "$0")/.."

VAE=${VAE:-data/default_vae}                  # the frozen VAE both STNs are trained in
TRAIN=${TRAIN:-data/photos/train}
HELDOUT=${HELDOUT:-data/photos/heldout}       # photos no model trained on
STEPS=${STEPS:-2000}
BATCH=${BATCH:-16}
PAIRS=${PAIRS:-24}
SEED=${SEED:-0}
OUT=${OUT:-benchmarks/results}
SEED_RUN=${SEED_RUN:-data/benchmark_runs/seed_recipe}  # data/ is git-ignored
TUNED=${TUNED:-data/benchmark_runs/registration}
SKIP_TRAINING=${SKIP_TRAINING:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The seed recipe: the seed design (moving latents only), Adam 1e-3 on one parameter group,
# θ regression plus latent alignment on latent-space warps, no curriculum or photometric change.
SEED_RECIPE_FLAGS=${SEED_RECIPE_FLAGS:---stn_config seed --warp_space latent --photometric none \
  --corner_loss_weight 0 --theta_loss_weight 1 --latent_loss_weight 1 \
  --learning_rate 1e-3 --head_lr_multiplier 1 --lr_scheduler constant --lr_warmup_steps 0 --curriculum_steps 0}
# The tuned preset: every default of stn_diffusers.finetune (registration design, pixel-space
# pairs with photometric jitter, corner loss, curriculum, cosine schedule).
TUNED_FLAGS=${TUNED_FLAGS:---stn_config registration}

train() {  # train OUTPUT_DIR FLAGS...
  local output=$1; shift
  python -m stn_diffusers.finetune \
    --pretrained_vae_name_or_path "$VAE" --train_data_dir "$TRAIN" --validation_data_dir "$HELDOUT" \
    --resolution 512 --train_batch_size "$BATCH" --max_train_steps "$STEPS" --seed "$SEED" \
    --validation_steps 250 --checkpointing_steps 500 --report_to none --output_dir "$output" "$@"
}

if [[ "$SKIP_TRAINING" != 1 ]]; then
  # shellcheck disable=SC2086  # the flag strings are word lists
  train "$SEED_RUN" $SEED_RECIPE_FLAGS
  # shellcheck disable=SC2086
  train "$TUNED" $TUNED_FLAGS
fi

pipelines=()
[[ -f "$SEED_RUN/model_index.json" ]] && pipelines+=(--pipeline "seed=$SEED_RUN")
[[ -f "$TUNED/model_index.json" ]] && pipelines+=(--pipeline "tuned=$TUNED")
if [[ ${#pipelines[@]} == 0 ]]; then
  echo "no trained pipeline under $SEED_RUN or $TUNED: evaluating the classical baselines only" >&2
  methods=identity,ecc,sift,orb,phase,kornia
else
  methods=identity,stn,stn+ecc,ecc,sift,orb,phase,kornia
fi

reports=()
for warp in standard large; do
  for photometric in none realistic; do
    name="$OUT/alignment_${warp}_${photometric}"
    python -m stn_diffusers.cli evaluate "${pipelines[@]}" --data "$HELDOUT" --num-pairs "$PAIRS" \
      --resolution 512 --seed "$SEED" --warp "$warp" --photometric "$photometric" --methods "$methods" \
      --json "$name.json" --markdown "$name.md"
    reports+=("$name.json")
  done
done

python benchmarks/evaluate_tables.py "${reports[@]}" | tee "$OUT/alignment.md"
echo "machine: $(nproc)-core CPU, $(python -c 'import torch; print("CUDA" if torch.cuda.is_available() else "no GPU")'); date: $(date -u +%F)"
