# Shared by the recipes (sourced, not run): timing banner, JSON summary fields, and a store
# that is stopped on any exit, failure included (no orphan master / control plane).
# Expects PY and OUT to be set; sets T0, SPECCTL, STORE, STATE, PIDS.

SPECCTL=("$PY" -m specctl.cli)
T0=$(date +%s)
PIDS=()

stage() { echo -e "\n[$RECIPE] $(($(date +%s) - T0))s  $*" >&2; }

# field FILE EXPR: evaluate EXPR over the last JSON line of FILE (a command's summary)
field() { "$PY" -c "import json,sys; d=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print(eval(sys.argv[2], {}, d))" "$@"; }

store_up() {  # store_up CAPACITY
	STATE="$OUT/store-state"
	"${SPECCTL[@]}" store up --detach --capacity "$1" --state-dir "$STATE" >"$OUT/store.json"
	STORE=$(field "$OUT/store.json" address)
	trap _cleanup EXIT
	echo "[$RECIPE] store at $STORE" >&2
}

store_down() {
	"${SPECCTL[@]}" store down --store "$STORE" --state-dir "$STATE" >/dev/null
	trap - EXIT
}

_cleanup() {
	rc=$?
	for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
	"${SPECCTL[@]}" store down --store "$STORE" --state-dir "$STATE" >/dev/null 2>&1 || true
	[ $rc -ne 0 ] && echo "[$RECIPE] FAILED (exit $rc) after $(($(date +%s) - T0))s; logs in $OUT" >&2
	exit $rc
}
