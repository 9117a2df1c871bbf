#!/usr/bin/env bash
# GPU check: a short L3M fit with Lightning's FSDPStrategy (FSDP1, LlamaDecoderLayer auto-wrap),
# bf16-mixed and a ~122M-parameter embedded Llama (hidden 768, 12 layers, MLP 3328, vocab 2048),
# then prints tokens/s and model FLOPs utilisation (bench/gpu_throughput.py), and checks that the
# exported hf_model (full state dict gathered from the shards) loads with AutoModelForCausalLM.
#
# STATUS: this script has NOT been run on a GPU. It was only exercised on CPU with
#   ACCELERATOR=cpu STRATEGY=ddp DEVICES=2 PRECISION=32-true MODEL_CONFIG=<tiny> bench/gpu_check.sh
# (FSDPStrategy refuses CPU), which checks the command line and the throughput callback, not FSDP1.
#
#   bash bench/gpu_check.sh                       # all visible GPUs
#   DEVICES=1 STEPS=20 bash bench/gpu_check.sh    # overrides: DEVICES STEPS BATCH NUM_SAMPLES
#                                                 #   MAX_NEW_TOKENS PEAK_TFLOPS OUT ACCELERATOR STRATEGY PRECISION MODEL_CONFIG
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

OUT=${OUT:-runs/gpu_check}
ACCELERATOR=${ACCELERATOR:-gpu}
DEVICES=${DEVICES:-auto}
STEPS=${STEPS:-30}
BATCH=${BATCH:-16}
NUM_SAMPLES=${NUM_SAMPLES:-4}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
PRECISION=${PRECISION:-bf16-mixed}
MODEL_CONFIG=${MODEL_CONFIG:-"{hidden_size: 768, intermediate_size: 3328, num_hidden_layers: 12, num_attention_heads: 12, num_key_value_heads: 12}"}
STRATEGY=${STRATEGY:-"{class_path: lightning.pytorch.strategies.FSDPStrategy, init_args: {auto_wrap_policy: [transformers.models.llama.modeling_llama.LlamaDecoderLayer], state_dict_type: sharded}}"}
PEAK=${PEAK_TFLOPS:+"peak_tflops: $PEAK_TFLOPS,"}
rm -rf "$OUT"

python cli.py fit --config configs/quickstart.yaml \
  --trainer.accelerator "$ACCELERATOR" --trainer.devices "$DEVICES" --trainer.strategy "$STRATEGY" \
  --trainer.precision "$PRECISION" --trainer.max_steps "$STEPS" \
  --trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false \
  --trainer.enable_checkpointing false --trainer.log_every_n_steps 1 \
  --trainer.logger.init_args.save_dir "$OUT" \
  --trainer.callbacks "[{class_path: bench.gpu_throughput.ThroughputReport, init_args: {warmup_steps: 5, $PEAK out: $OUT/throughput.json}}]" \
  --model.model_config "$MODEL_CONFIG" --model.num_samples "$NUM_SAMPLES" --model.max_new_tokens "$MAX_NEW_TOKENS" \
  --model.learning_rate 3.0e-4 --model.log_samples_every_n_steps 0 --model.export_dir "$OUT/hf_model" \
  --data.batch_size "$BATCH"

python - "$OUT" <<'PY'
import json, sys
from transformers import AutoModelForCausalLM
out = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(f"{out}/hf_model")
n = sum(p.numel() for p in model.parameters())
print(f"exported hf_model loads: {n / 1e6:.1f}M parameters, hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers")
report = json.load(open(f"{out}/throughput.json"))
print(f"tokens/s (trained): {report['tokens_per_s_trained']:.0f}   tokens/s (sampled): {report['tokens_per_s_sampled']:.0f}   MFU: {report['mfu']}")
PY
