#!/usr/bin/env bash
# GPU check, five phases (run in this order) on the embedded default scaled to a ~122M-parameter Llama (hidden 768,
# 12 layers, MLP 3328, vocab 2048), bf16-mixed:
#   throughput  a short L3M fit with Lightning's FSDPStrategy (FSDP1, LlamaDecoderLayer auto-wrap);
#               prints tokens/s and model FLOPs utilisation (bench/gpu_throughput.py), the sampling calls'
#               share of a step and the sampler's tokens/s inside fit, and checks that the exported hf_model
#               (full state dict gathered from the shards) loads.
#   sampler     bench/step_time.py on one GPU, the same model (config 122m), BATCH prompts x K, MAX_NEW_TOKENS
#               pinned, bf16 weights: the lean sampler's sampled tokens/s against transformers' generate and a
#               bare decode loop, and against issue 16's target (5x the 815 tokens/s the throughput phase sampled
#               on 2026-11-27 on one device, STRATEGY=auto, decoding with generate).
#   shapes      bench/fresh_shapes.py on one GPU, the same model and batch: each step's parts on a batch of unseen shapes
#               and on the same batch again, with cuDNN attention kept out (model.policy.cudnn_attention false, the
#               default) and let in (PyTorch's choice on Hopper: a plan built per new shape).
#   resume      FSDP1 with sharded checkpoints, the value baseline and WARMUP (default 2) steps of constraint
#               warm-up: fit 12 steps, resume from `last` to 18, and check from TensorBoard that the resumed
#               steps continue the step count and the μ schedule (μ = 0.8^floor((step − WARMUP)/4), which a
#               reset would restart at 1), and that μ is logged from step WARMUP on only.
#   fsdp2       ModelParallelStrategy + fully_shard (FSDP2) with sharded generation (micro-batched).
# Each phase's verdict is printed as `PHASE <name>: PASS|FAIL` at the end.
#
#   bash bench/gpu_check.sh                       # all visible GPUs, all phases
#   DEVICES=1 PHASES=throughput bash bench/gpu_check.sh
#   overrides: DEVICES STEPS BATCH NUM_SAMPLES MAX_NEW_TOKENS PEAK_TFLOPS OUT ACCELERATOR PRECISION MODEL_CONFIG PHASES
#              STRATEGY RESUME_STRATEGY FIT_TIMEOUT WARMUP SAMPLER_CONFIG WHEELS PREFLIGHT_TIMEOUT PYTHON FIT_ARGS
# Before any phase, a preflight imports the stack (torch first on its own, then with WHEELS on the path)
# and touches the GPU, each step under PREFLIGHT_TIMEOUT s: a hang there costs that, not a phase's timeout.
# Stream the output (`... | tee log`, not `| tail`): a killed pipeline shows nothing.
# Measured on one H200 (2026-11-29, commit 6ea04c7): throughput, sampler, resume and fsdp2 PASS; numbers in
# docs/results.md ("GPU check"). The shapes phase, cuDNN attention kept out (the module's default since then), the
# half-precision check bound and model.sampling.cuda_graphs (timed by the sampler phase, which prints whether its graph
# was refused; FIT_ARGS for a fit) have run on CPU only. A CPU dry run of every phase with a tiny model (ACCELERATOR=cpu
# STRATEGY=auto RESUME_STRATEGY=auto MODEL_CONFIG="{hidden_size: 64, ...}") is in tests/test_bench_smoke.py.
# On the device's image, which lacks jsonargparse, datasets and torchdata: `bash bench/device_wheels.sh` here,
# then on the device
#   WHEELS=.whl STRATEGY=auto DEVICES=1 PHASES="throughput sampler shapes" bash bench/gpu_check.sh   (carry: [".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# A fit still running after FIT_TIMEOUT s gets SIGUSR2 (cli.py then prints every thread's stack: where
# it waits) and is killed 20 s later.

OUT=${OUT:-runs/gpu_check}
ACCELERATOR=${ACCELERATOR:-gpu}
DEVICES=${DEVICES:-auto}
STEPS=${STEPS:-30}
BATCH=${BATCH:-16}
NUM_SAMPLES=${NUM_SAMPLES:-4}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
PRECISION=${PRECISION:-bf16-mixed}
PHASES=${PHASES:-"throughput sampler shapes resume fsdp2"}   # run in this order, whatever the order named
SAMPLER_CONFIG=${SAMPLER_CONFIG:-122m}   # a CPU dry run: SAMPLER_CONFIG=embedded ACCELERATOR=cpu
FIT_TIMEOUT=${FIT_TIMEOUT:-300}
WARMUP=${WARMUP:-2}
WHEELS=${WHEELS:-}                       # a folder of wheels to install first (bench/device_wheels.sh)
FIT_ARGS=${FIT_ARGS:-}                   # more cli.py flags for every fit, e.g. "--model.sampling.cuda_graphs true" (split on spaces)
PREFLIGHT_TIMEOUT=${PREFLIGHT_TIMEOUT:-120}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}   # python3: the one that holds torch on the device's image
MODEL_CONFIG=${MODEL_CONFIG:-"{hidden_size: 768, intermediate_size: 3328, num_hidden_layers: 12, num_attention_heads: 12, num_key_value_heads: 12}"}
FSDP1="{class_path: lightning.pytorch.strategies.FSDPStrategy, init_args: {auto_wrap_policy: [transformers.models.llama.modeling_llama.LlamaDecoderLayer], state_dict_type: sharded}}"
FSDP2="{class_path: lightning.pytorch.strategies.ModelParallelStrategy, init_args: {tensor_parallel_size: 1}}"
STRATEGY=${STRATEGY:-$FSDP1}
RESUME_STRATEGY=${RESUME_STRATEGY:-$FSDP1}   # CPU dry run: RESUME_STRATEGY=auto (FSDP1 refuses CPU)
PEAK=${PEAK_TFLOPS:+"peak_tflops: $PEAK_TFLOPS,"}
rm -rf "$OUT"
mkdir -p "$OUT"
declare -A VERDICT

TORCH_DEVICE=$([[ $ACCELERATOR == cpu ]] && echo cpu || echo cuda)

preflight_step() {  # one Python snippet within PREFLIGHT_TIMEOUT s; its stacks are dumped before it is cut
  # stderr, with every import's time (-X importtime), goes to $OUT/preflight.log; a cut step shows its tail:
  # the last modules that finished importing, and the stacks where it hung
  local t0=$SECONDS log="$OUT/preflight.log"
  echo "--- $1" >> "$log"
  if ! timeout -k 5 "$PREFLIGHT_TIMEOUT" "$PYTHON" -X faulthandler -X importtime -c "import faulthandler; faulthandler.dump_traceback_later(0.9 * $PREFLIGHT_TIMEOUT, exit=True)
$1" 2>> "$log"; then
    echo "preflight step failed or hung (> $PREFLIGHT_TIMEOUT s): $1" | cut -c1-160
    echo "  after $((SECONDS - t0)) s; the last lines of $log:"
    tail -n 25 "$log" | sed 's/^/    /'
    return 1
  fi
  echo "  ($((SECONDS - t0)) s)"
}

install_wheels() {  # WHEELS into $OUT/site, put first on PYTHONPATH
  [[ -z $WHEELS ]] && return 0
  local site; site="$(cd "$OUT" && pwd)/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl || return 1
  echo "installed into $site: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
}

preflight() {  # the interpreter, torch alone, the accelerator, then (wheels installed) the whole stack
  echo "=== preflight ($PYTHON) ==="
  preflight_step "import sys; print('python', sys.version.split()[0], sys.prefix)" \
  && preflight_step "import torch; print('torch', torch.__version__)" \
  && preflight_step "import torch; t = torch.ones(1, device='$TORCH_DEVICE'); print('accelerator', torch.cuda.get_device_name(0) if t.is_cuda else 'cpu', t.item())" \
  && install_wheels \
  && preflight_step "import transformers, lightning, datasets, jsonargparse, torchdata, l3m_lightning.module; print('transformers', transformers.__version__, 'lightning', lightning.__version__, 'datasets', datasets.__version__)"
}
if ! preflight; then
  echo "PHASE preflight: FAIL (no phase run)"
  exit 1
fi

fit() {  # common flags for every phase; extra flags follow. A run that hangs is killed after FIT_TIMEOUT s.
  echo "[$(date +%T)] fit $*" | cut -c1-200
  timeout -s USR2 -k 20 "$FIT_TIMEOUT" "$PYTHON" cli.py fit --config configs/quickstart.yaml \
    --trainer.accelerator "$ACCELERATOR" --trainer.devices "$DEVICES" --trainer.precision "$PRECISION" \
    --trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false \
    --trainer.log_every_n_steps 1 \
    --model.policy.config "$MODEL_CONFIG" --model.sampling.num_samples "$NUM_SAMPLES" --model.sampling.max_new_tokens "$MAX_NEW_TOKENS" \
    --model.optimizer.learning_rate 3.0e-4 --model.evaluation.log_samples_every_n_steps 0 --data.batch_size "$BATCH" $FIT_ARGS "$@"
}

export_loads() {  # the exported hf_model (full state dict gathered from the shards) loads with transformers
  "$PYTHON" -c "import sys; from transformers import AutoModelForCausalLM as M; m = M.from_pretrained(sys.argv[1]); \
print(f'exported hf_model loads: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters, {m.config.num_hidden_layers} layers')" "$1"
}

if [[ " $PHASES " == *" throughput "* ]]; then
  echo "=== phase throughput ==="
  fit --trainer.strategy "$STRATEGY" --trainer.max_steps "$STEPS" --trainer.enable_checkpointing false \
    --trainer.logger.init_args.save_dir "$OUT" \
    --trainer.callbacks "[{class_path: bench.gpu_throughput.ThroughputReport, init_args: {warmup_steps: 5, $PEAK out: $OUT/throughput.json}}]" \
    --model.export_dir "$OUT/hf_model" \
  && export_loads "$OUT/hf_model" \
  && "$PYTHON" - "$OUT" <<'PY'
import json, sys
report = json.load(open(f"{sys.argv[1]}/throughput.json"))
print(f"tokens/s (trained): {report['tokens_per_s_trained']:.0f}   tokens/s (sampled): {report['tokens_per_s_sampled']:.0f}   MFU: {report['mfu']}")
print(f"s/step: {report['seconds_per_step']:.3f}, of which sampling {report['sampling_seconds_per_step']:.3f}; "
      f"sampled tokens/s while sampling: {report['tokens_per_s_sampling']:.0f} (issue 16's target: >= 4075)")
PY
  [[ $? == 0 ]] && VERDICT[throughput]=PASS || VERDICT[throughput]=FAIL
fi

if [[ " $PHASES " == *" sampler "* ]]; then
  echo "=== phase sampler ==="
  timeout -k 20 "$FIT_TIMEOUT" "$PYTHON" bench/step_time.py --configs "$SAMPLER_CONFIG" --device "$TORCH_DEVICE" --dtype bfloat16 \
    --batch-size "$BATCH" --num-samples "$NUM_SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" --steps 5 --warmup 2 --fit-steps 0 \
    --out "$OUT/step_time.json" \
  && "$PYTHON" - "$OUT" <<'PY'
import json, sys
(r,) = json.load(open(f"{sys.argv[1]}/step_time.json"))["results"]
tokens, ms = r["sampled_tokens"], r["ms"]
lean, generate = tokens / ms["sampling_lean"] * 1000, tokens / ms["sampling_generate"] * 1000
graphs = tokens / ms["sampling_lean_cuda_graphs"] * 1000
refused = r.get("cuda_graphs_refused")
print(f"sampled tokens/s with model.sampling.cuda_graphs (fixed window; one CUDA graph per token on a GPU): {graphs:.0f} ({graphs / lean:.2f}x lean)"
      + (f"; GRAPHS REFUSED, decoded eagerly: {refused}" if refused else ""))
print(f"sampled tokens/s: lean {lean:.0f}, generate {generate:.0f} (lean/generate {lean / generate:.2f}x), "
      f"bare decode loop {r['bare_decode_tokens_per_s']:.0f}; issue 16's target: >= 5 x 815 = 4075 (lean: {lean / 815:.1f}x)")
PY
  [[ $? == 0 ]] && VERDICT[sampler]=PASS || VERDICT[sampler]=FAIL
fi

if [[ " $PHASES " == *" shapes "* ]]; then
  echo "=== phase shapes ==="
  ok=PASS
  for variant in "" "--cudnn-attention"; do
    timeout -k 20 "$FIT_TIMEOUT" "$PYTHON" bench/fresh_shapes.py --config "$SAMPLER_CONFIG" --device "$TORCH_DEVICE" --dtype bfloat16 \
      --batch-size "$BATCH" --num-samples "$NUM_SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" --steps 3 --warmup 2 $variant \
      --out "$OUT/fresh_shapes${variant:+_cudnn}.json" 2>&1 | grep -v "tokenizing" || ok=FAIL
  done
  VERDICT[shapes]=$ok
fi

if [[ " $PHASES " == *" resume "* ]]; then
  echo "=== phase resume ==="
  RES="$OUT/resume"
  CKPT="[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: $RES/checkpoints, save_last: true, every_n_train_steps: 6}}]"
  resume_fit() {
    fit --trainer.strategy "$RESUME_STRATEGY" --trainer.callbacks "$CKPT" --trainer.logger.init_args.save_dir "$RES" \
      --model.value_baseline.enabled true --model.barrier.mu_decay 0.8 --model.barrier.mu_decay_every 4 --model.barrier.mu_floor 0.01 \
      --model.barrier.warmup_steps "$WARMUP" "$@"
  }
  resume_fit --trainer.max_steps 12 \
  && resume_fit --trainer.max_steps 18 --ckpt_path last \
  && "$PYTHON" - "$RES" "$WARMUP" <<'PY'
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
runs = sorted(glob.glob(f"{sys.argv[1]}/quickstart/version_*"))
assert len(runs) == 2, runs
mu = {}
for run in runs:
    acc = EventAccumulator(run); acc.Reload()
    mu[run] = {e.step: e.value for e in acc.Scalars("barrier/mu")}
first, resumed = mu[runs[0]], mu[runs[1]]
warmup = int(sys.argv[2])
print("first run steps", min(first), "..", max(first), " resumed run steps", min(resumed), "..", max(resumed))
assert min(first) == warmup, f"μ logged from step {min(first)}, expected from the end of the warm-up ({warmup})"
# the checkpoint's own batch (step 11) may be logged again by the resumed run (ExactResume: a kill between the
# checkpoint and Lightning's logging would lose it), with the same value; every later step is new
again = set(first) & set(resumed)
assert again <= {11} and all(first[s] == resumed[s] for s in again), (sorted(first), sorted(resumed))
assert max(first) <= 12 and min(set(resumed) - again) >= 12 and max(resumed) >= 17, (sorted(first), sorted(resumed))
for step, value in sorted(resumed.items()):
    expected = 0.8 ** ((step - warmup) // 4)
    assert abs(value - expected) < 1e-4 * expected + 1e-6, (step, value, expected)
print("resumed mu", {s: round(v, 4) for s, v in sorted(resumed.items())}, f"matches 0.8^floor((step - {warmup})/4)")
PY
  [[ $? == 0 ]] && VERDICT[resume]=PASS || VERDICT[resume]=FAIL
fi

if [[ " $PHASES " == *" fsdp2 "* ]]; then
  echo "=== phase fsdp2 ==="
  fit --trainer.strategy "$FSDP2" --trainer.max_steps 10 --trainer.enable_checkpointing false \
    --trainer.logger.init_args.save_dir "$OUT/fsdp2" --model.value_baseline.enabled true --model.sampling.generation_batch_size 8 \
    --trainer.callbacks "[{class_path: bench.gpu_throughput.ThroughputReport, init_args: {warmup_steps: 3, $PEAK out: $OUT/fsdp2/throughput.json}}]" \
    --model.export_dir "$OUT/fsdp2/hf_model" \
  && export_loads "$OUT/fsdp2/hf_model"
  [[ $? == 0 ]] && VERDICT[fsdp2]=PASS || VERDICT[fsdp2]=FAIL
fi

status=0
for phase in $PHASES; do
  echo "PHASE $phase: ${VERDICT[$phase]:-NOT RUN}"
  [[ ${VERDICT[$phase]:-} == PASS ]] || status=1
done
exit $status
