#!/usr/bin/env bash
# One GPU node (e.g. 8x H100): SGLang producers on some GPUs, FSDP2 trainers on the rest.
#
# UNTESTED here (written on a CPU-only box): the commands and flags are the ones the CPU demo
# (recipes/quickstart.sh) runs, with the GPU engine and sizes swapped in. Adjust the split:
# producers must keep up with the trainers (watch train-draft's wait_pct: goal <= 5%).
#
#   pip install 'specctl[gpu,sglang]'   # CUDA Mooncake build (mooncake-transfer-engine) + SGLang
#   TARGET=meta-llama/Llama-3.1-8B-Instruct DATA=/data/sharegpt.jsonl bash recipes/gpu-node.sh
set -euo pipefail
TARGET=${TARGET:?local HF folder or alias of the target model}
DATA=${DATA:?jsonl / saved dataset of conversations}
OUT=${OUT:-runs/gpu-node}
PRODUCER_GPUS=${PRODUCER_GPUS:-0,1,2,3}   # one serve-target per GPU
TRAINER_GPUS=${TRAINER_GPUS:-4,5,6,7}     # one torchrun rank per GPU (FSDP2, NCCL, bf16)
SAMPLES=${SAMPLES:-200000}
STEPS=${STEPS:-20000}
mkdir -p "$OUT"

# 1. store: host memory for records in flight (back-pressure keeps it bounded)
specctl store up --detach --capacity 64GiB --state-dir "$OUT/store" >"$OUT/store.json"
STORE=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["address"])' "$OUT/store.json")
trap 'specctl store down --store "$STORE" --state-dir "$OUT/store" >/dev/null || true' EXIT

# 2. producers: one SGLang engine per GPU; they share the prompt cursor, so together they
#    produce every sample once (--max-samples counts all producers)
pids=()
for g in ${PRODUCER_GPUS//,/ }; do
	CUDA_VISIBLE_DEVICES=$g specctl serve-target --store "$STORE" --engine sglang \
		--model "$TARGET" --data "$DATA" --regenerate --temperature 0.7 --max-new-tokens 2048 \
		--max-samples "$SAMPLES" >"$OUT/serve-target-$g.json" 2>"$OUT/serve-target-$g.log" &
	pids+=($!)
done

# 3. trainers: torchrun, one rank per GPU, FSDP2 over NCCL, bf16 mixed precision
CUDA_VISIBLE_DEVICES=$TRAINER_GPUS specctl train-draft --store "$STORE" --target "$TARGET" \
	--out "$OUT/train" --nproc "$(echo "$TRAINER_GPUS" | tr ',' '\n' | wc -l)" \
	--precision bf16 --batch-size 4 --ttt-length 7 --max-steps "$STEPS" --lr 1e-4 \
	--draft-vocab-size 32000 --max-wait 600 >"$OUT/train-draft.json"
wait "${pids[@]}"

# 4. evaluate on MT-Bench (chain k=4 and a tree) and export for SGLang
specctl eval-accept --model "$TARGET" --draft "$OUT/train" --data mtbench --max-prompts 80 \
	--max-new-tokens 256 --k 4 --tree --out "$OUT/eval" >"$OUT/eval-accept.json"
specctl export "$OUT/train" --to sglang "$OUT/export-sglang" >"$OUT/export.json"
echo "done: $OUT (eval: $OUT/eval/report.json, SGLang draft: $OUT/export-sglang)" >&2
