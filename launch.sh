#!/usr/bin/env bash
# The paper's pipeline, stage by stage; each stage is skipped when its complete output exists with the
# same settings (the scripts' --resume check), so a rerun only does what is missing.
#
#   bash launch.sh [synthetic]        the offline default: a generated world, tiny models, CPU
#
# Environment: RUN (run directory, default runs/PRESET), NPROC (processes per stage; >1 uses torchrun),
# PYTHON (interpreter, default python3). Stages after the teacher (label.py, student SFT/DPO,
# evaluate.py) and the hh / tldr presets arrive with the pipeline issue; see README "Status".
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${1:-synthetic}
RUN=${RUN:-runs/$PRESET}
NPROC=${NPROC:-1}
PY=${PYTHON:-python3}

run() {
  if [ "$NPROC" -gt 1 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$@"
  else
    "$PY" "$@"
  fi
}

case "$PRESET" in
  synthetic) PREPARE=(--data synthetic) ;;
  *) echo "launch.sh: preset '$PRESET' is not available yet (only: synthetic)" >&2; exit 2 ;;
esac

echo "== 1/3 prepare -> $RUN"
if [ -f "$RUN/config.json" ]; then echo "   done already: $RUN/config.json"; else "$PY" wlt.py prepare "${PREPARE[@]}" --out "$RUN"; fi
echo "== 2/3 teacher SFT -> $RUN/teacher/sft"
run train_sft.py --teacher --run "$RUN" --resume
echo "== 3/3 teacher DPO -> $RUN/teacher/dpo"
run train_dpo.py --teacher --run "$RUN" --resume
echo "== done: teacher reference $RUN/teacher/sft, weak teacher $RUN/teacher/dpo (metrics.jsonl in each)"
