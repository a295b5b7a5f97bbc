#!/usr/bin/env bash
# specctl quickstart (`make demo`): store -> serve-target || train-draft -> eval-accept -> export.
#
# Runs offline on a 2-core CPU in < 15 min: SmolLM2-135M regenerates chatterbot answers and
# streams its hidden states into the store while 2 torchrun ranks (gloo) train an EAGLE-3
# draft from them; then MT-Bench acceptance + speed-up (same run, same machine) and an
# SGLang-format export. Each command logs its own progress on stderr; this script parses
# their one-line JSON summaries (stdout) with python.
#
# Budget knobs (env): DEMO_SAMPLES, DEMO_NEW_TOKENS, DEMO_STEPS, DEMO_VOCAB, DEMO_TTT,
# DEMO_EVAL_PROMPTS, DEMO_EVAL_TOKENS, DEMO_OUT. Threads: 3+ processes share 2 cores, and
# oversubscribed torch/OpenMP threads spin (~10x slower), so every process gets one thread.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-runs/demo}
SAMPLES=${DEMO_SAMPLES:-192}
NEW_TOKENS=${DEMO_NEW_TOKENS:-32}
STEPS=${DEMO_STEPS:-$((SAMPLES * 45 / 100))}  # one pass: ~all trainable samples, 2 ranks x 1
VOCAB=${DEMO_VOCAB:-8192}
TTT=${DEMO_TTT:-3}
EVAL_PROMPTS=${DEMO_EVAL_PROMPTS:-6}
EVAL_TOKENS=${DEMO_EVAL_TOKENS:-32}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONUNBUFFERED=1

rm -rf "$OUT" && mkdir -p "$OUT"
RECIPE=demo
source recipes/lib.sh

# 1. the store (stopped on any exit, see lib.sh)
stage "store up"
store_up 1GiB

# 2. producer and trainer, concurrently (the trainer stops after --max-steps or when the
#    producer is done and nothing arrives for --max-wait seconds)
stage "serve-target (SmolLM2-135M, chatterbot, --regenerate, $SAMPLES samples) || train-draft (2 ranks)"
"${SPECCTL[@]}" serve-target --store "$STORE" --model smollm2-135m --data chatterbot \
	--regenerate --max-new-tokens "$NEW_TOKENS" --max-samples "$SAMPLES" \
	--set threads=1 --set lease_size=8 >"$OUT/serve-target.json" &
PIDS+=($!)
PRODUCER=$!
"${SPECCTL[@]}" train-draft --store "$STORE" --target smollm2-135m --out "$OUT/train" \
	--nproc 2 --draft-vocab-size "$VOCAB" --ttt-length "$TTT" --max-steps "$STEPS" \
	--batch-size 1 --lr 5e-4 --max-wait 120 --set draft.vocab_records=32 \
	--set heldout=0.1 --set optim.warmup_steps=10 --set eval_every=1000000 --set save_every=50 \
	--set log_every=10 >"$OUT/train-draft.json" &
PIDS+=($!)
TRAINER=$!
wait "$PRODUCER"
stage "serve-target done; waiting for train-draft"
wait "$TRAINER"
PIDS=()

# 3. acceptance and speed-up on MT-Bench: target alone, prompt lookup and the draft, one run
stage "eval-accept (MT-Bench, $EVAL_PROMPTS prompts x $EVAL_TOKENS tokens)"
"${SPECCTL[@]}" eval-accept --model smollm2-135m --draft "$OUT/train" --data mtbench \
	--max-prompts "$EVAL_PROMPTS" --max-new-tokens "$EVAL_TOKENS" --k 4 \
	--out "$OUT/eval" --set threads=2 >"$OUT/eval-accept.json"

# 4. serving directory
stage "export (sglang)"
"${SPECCTL[@]}" export "$OUT/train" --to sglang "$OUT/export-sglang" >"$OUT/export.json"

stage "store down"
store_down

# 5. where everything went, and the headline numbers (whatever they are)
WALL=$(($(date +%s) - T0))
"$PY" - "$OUT" "$WALL" <<'EOF'
import json, sys
from pathlib import Path

out, wall = Path(sys.argv[1]), int(sys.argv[2])
def summary(name):
    return json.loads((out / name).read_text().splitlines()[-1])
st, tr, ev, ex = (summary(f"{n}.json") for n in ("serve-target", "train-draft", "eval-accept", "export"))
headline = {"wall_s": wall, "serve_target": st, "train_draft": tr, "eval_accept": ev, "export": ex}
(out / "demo.json").write_text(json.dumps(headline, indent=2))
print(f"\nspecctl demo finished in {wall // 60}m{wall % 60:02d}s", file=sys.stderr)
print(f"  records produced : {st.get('records')}  ({st.get('tokens_per_s', 0):.0f} tok/s)", file=sys.stderr)
print(f"  draft trained    : {tr.get('steps')} steps, {tr.get('samples')} samples -> {out}/train", file=sys.stderr)
print(f"  eval report      : {out}/eval (report.json, acceptance.png)", file=sys.stderr)
print(f"  sglang export    : {out}/export-sglang", file=sys.stderr)
print(f"  acceptance length: {ev['acceptance_length']:.2f} (k=4, {ev['prompts']} MT-Bench prompts)", file=sys.stderr)
print(f"  speed-up vs target alone (same run): {ev['speedups']}", file=sys.stderr)
print(f"  tokens/s: {ev['tok_per_s']}", file=sys.stderr)
print(json.dumps({"wall_s": wall, "out": str(out), "eval": ev}))
EOF
