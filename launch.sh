#!/usr/bin/env bash
# The paper's experiment end to end, stage by stage:
#   prepare -> teacher SFT -> teacher DPO -> label D_u -> student SFT -> student DPO on weak labels
#   -> student DPO on human labels -> evaluate
# Each stage is skipped when its complete output exists with the same settings and unchanged inputs, so a
# rerun only does what is missing; a stage whose settings or inputs changed runs again, and with it every
# stage that reads its output.
#
#   bash launch.sh                  the offline default: the synthetic world, tiny models, CPU (~2 min on 2 cores)
#   bash launch.sh hh               OPT-125M teacher, OPT-1.3B student, Anthropic/hh-rlhf, beta 0.1,
#                                   gold reward Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback
#   bash launch.sh tldr             the same on TL;DR (CarperAI/openai_summarize_comparisons), beta 0.5,
#                                   gold reward OpenAssistant/reward-model-deberta-v3-large-v2
#   bash launch.sh PRESET EXPERIMENT [flags]   then one of the paper's ablations (extras/experiments.py: fractions,
#                                   teachers, subsets, beta, seeds, sft-ref, all)
#
# Settings (environment variables; docs/scripts.md, "launch.sh"):
#   RUN      run directory (default runs/PRESET)          NPROC   processes per stage (>1: torchrun)
#   PYTHON   interpreter (default python3)                DATA    data source: hub name or local file/folder
#   TEACHER  teacher base model                           STUDENT student base model
#   BETA     DPO beta of every stage and of the labels    LABELED_FRACTION   share of training pairs in D_l
#   SEED     split seed (default 22, the paper's)         GOLD_RM gold reward model (hh / tldr)
#   PREPARE_ARGS, SFT_ARGS, DPO_ARGS, LABEL_ARGS, EVAL_ARGS: extra flags for that stage's script
#     (SFT_ARGS and DPO_ARGS go to the teacher's and the student's stages alike)
# Several nodes (docs/scaling.md): run launch.sh on every node with the same RUN (on a filesystem all nodes see)
#   NNODES   nodes (default 1)                            NODE_RANK   this node's number, 0..NNODES-1
#   MASTER_ADDR, MASTER_PORT   node 0's address and a free port (default 29500)
#   (-> torchrun --nnodes --node-rank --master-addr --master-port; node 0 alone runs prepare)
# The trainers always get --resume: a stopped or requeued job continues from its last checkpoint. SIGTERM and
# SIGUSR1 (SLURM's --signal=USR1@SECS) make a trainer save a checkpoint at the next step and stop.
set -euo pipefail
# Paths given relative to the caller's folder stay meaningful after the cd below (names that do not exist
# locally, e.g. hub model names, pass through unchanged).
here() { case "$1" in ""|/*) printf '%s' "$1" ;; *) if [ -e "$1" ]; then printf '%s/%s' "$PWD" "$1"; else printf '%s' "$1"; fi ;; esac; }
[ -n "${RUN:-}" ] && case "$RUN" in /*) ;; *) RUN="$PWD/$RUN" ;; esac
for v in DATA TEACHER STUDENT GOLD_RM; do [ -n "${!v:-}" ] && printf -v "$v" '%s' "$(here "${!v}")"; done
cd "$(dirname "$0")"
PRESET=${1:-synthetic}
RUN=${RUN:-runs/$PRESET}
NPROC=${NPROC:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PY=${PYTHON:-python3}
SEED=${SEED:-22}

case "$PRESET" in
  synthetic)
    DATA=${DATA:-synthetic}; TEACHER=${TEACHER:-}; STUDENT=${STUDENT:-}; BETA=${BETA:-}; GOLD_RM=${GOLD_RM:-}
    LABEL_ARGS=${LABEL_ARGS:---batch-size 64}; EVAL_ARGS=${EVAL_ARGS:---batch-size 64} ;;
  hh)
    DATA=${DATA:-hh-rlhf}; TEACHER=${TEACHER:-facebook/opt-125m}; STUDENT=${STUDENT:-facebook/opt-1.3b}
    BETA=${BETA:-0.1}; GOLD_RM=${GOLD_RM:-Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback} ;;
  tldr)
    DATA=${DATA:-tldr}; TEACHER=${TEACHER:-facebook/opt-125m}; STUDENT=${STUDENT:-facebook/opt-1.3b}
    BETA=${BETA:-0.5}; GOLD_RM=${GOLD_RM:-OpenAssistant/reward-model-deberta-v3-large-v2} ;;
  *) echo "launch.sh: unknown preset '$PRESET' (synthetic, hh, tldr)" >&2; exit 2 ;;
esac

# word-splitting of the *_ARGS variables is intended: they hold extra flags
read -r -a PREPARE_X <<< "${PREPARE_ARGS:-}"
read -r -a SFT_X <<< "${SFT_ARGS:-}"
read -r -a DPO_X <<< "${DPO_ARGS:-}"
read -r -a LABEL_X <<< "${LABEL_ARGS:-}"
read -r -a EVAL_X <<< "${EVAL_ARGS:-}"
PREP=(--data "$DATA" --out "$RUN" --seed "$SEED")
[ -n "$TEACHER" ] && PREP+=(--teacher-model "$TEACHER")
[ -n "$STUDENT" ] && PREP+=(--student-model "$STUDENT")
[ -n "$BETA" ] && PREP+=(--beta "$BETA")
[ -n "${LABELED_FRACTION:-}" ] && PREP+=(--labeled-fraction "$LABELED_FRACTION")
GOLD=()
[ -n "$GOLD_RM" ] && GOLD=(--gold-rm "$GOLD_RM")

if [ "$NNODES" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || { echo "launch.sh: NNODES=$NNODES needs MASTER_ADDR (node 0's address)" >&2; exit 2; }
  WHERE=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  WHERE=(--standalone)
fi
# torchrun passes these signals on to its processes (by default not SIGUSR1, which would kill it)
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
# SLURM's SIGUSR1 reaches every process of the job step, this shell too: it waits for the stage, which saves
# a checkpoint and exits non-zero, and then stops with that stage's exit code (set -e)
trap : USR1

run() {  # one stage, under torchrun when NPROC > 1 or NNODES > 1
  if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    # torchrun gives each process one OpenMP thread unless told otherwise, and prints a banner saying so at
    # every stage; the same setting, said once here, keeps the log quiet
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m torch.distributed.run "${WHERE[@]}" --nproc_per_node "$NPROC" "$@"
  else
    "$PY" "$@"
  fi
}
START=$SECONDS
stage() { echo; echo "== $1  [$(( SECONDS - START )) s]"; }

stage "1/8 prepare -> $RUN"
if [ "$NODE_RANK" -eq 0 ]; then  # the other nodes' first stage waits for node 0 at torchrun's rendezvous
  "$PY" wlt.py prepare "${PREP[@]}" "${PREPARE_X[@]}"
fi
stage "2/8 teacher SFT -> $RUN/teacher/sft"
run train_sft.py --teacher --run-dir "$RUN" --resume "${SFT_X[@]}"
stage "3/8 teacher DPO -> $RUN/teacher/dpo"
run train_dpo.py --teacher --run-dir "$RUN" --resume "${DPO_X[@]}"
stage "4/8 label D_u with the weak teacher -> $RUN/data/weak.jsonl"
run label.py --teacher --run-dir "$RUN" "${LABEL_X[@]}"
stage "5/8 student SFT -> $RUN/student/sft"
run train_sft.py --student --run-dir "$RUN" --resume "${SFT_X[@]}"
stage "6/8 student DPO on the weak labels -> $RUN/student/dpo-weak"
run train_dpo.py --student --labels weak --run-dir "$RUN" --resume "${DPO_X[@]}"
stage "7/8 student DPO on the human labels -> $RUN/student/dpo-human"
run train_dpo.py --student --labels human --run-dir "$RUN" --resume "${DPO_X[@]}"
stage "8/8 evaluate -> $RUN/eval/results.md"
run evaluate.py --run-dir "$RUN" "${GOLD[@]}" "${EVAL_X[@]}"
echo "== done in $(( SECONDS - START )) s: $RUN/eval/results.md"
if [ -n "${2:-}" ]; then  # an experiment on top of this pipeline: bash launch.sh PRESET EXPERIMENT [flags]
  exec "$PY" extras/experiments.py "$2" --preset "$PRESET" --base "$RUN" "${@:3}"
fi
