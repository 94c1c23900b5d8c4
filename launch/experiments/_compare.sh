# Shared body of the comparison recipes (sourced by plain_vs_basic_r18.sh,
# basic_vs_bottleneck_r50.sh and activation_compression.sh, which set RECIPE, SHORT, DEPTH, BATCH,
# LR, DEFAULT_EPOCHS, BASELINE and TITLE first, and either BLOCKS (the arms are blocks) or
# ARM_FLAG, ARMS and GROUP_BY (the arms are the values of another `resnet-scale train` flag, e.g.
# ARM_FLAG=--activation-compression ARMS="none int8", GROUP_BY=activation_compression), plus
# optionally FIXED (flags every run gets, e.g. "--block basic") and RECIPE_DIGITS_EPOCHS).
# Trains every (seed, arm) with the same data, batch size, learning rate and epochs, then builds
# the report. Runs are named <SHORT>-<arm>-s<seed> (their W&B names too) and go into one W&B
# group, <RECIPE>. Settings come from the environment or from flags:
#
#   --seeds "0 1 2"   SEEDS        seeds, one run per arm each (default "0 1 2")
#   --epochs N        EPOCHS       epochs per run (default: the recipe's)
#   --data NAME       DATA         dataset (default auto: cifar10 when DATA_DIR holds it, or the
#                                  Hugging Face cache does; else digits, offline, 5 epochs by default
#                                  or the recipe's RECIPE_DIGITS_EPOCHS)
#   --data-dir DIR    DATA_DIR     where CIFAR-10 is looked for (default data/): cifar-10-batches-py/
#                                  or cifar10/ (a saved DatasetDict); passed on as --data-dir
#   --extra "FLAGS"   EXTRA        more `resnet-scale train` flags, the same for every run and
#                                  given last, so they win (e.g. "--low-memory", "--layers 1,1,1")
#   --runs-dir DIR    RUNS_DIR     where the runs go (default runs/<recipe>)
#   --reports-dir DIR REPORTS_DIR  where the report goes (default reports/<recipe>)
#   --tracker KIND    TRACKER      wandb | tensorboard | none (default wandb; offline by itself)
#   --dry-run         DRY_RUN=1    print the commands instead of running them
#   TRAIN_CMD   the training command (default "resnet-scale train"; e.g. "bash launch/torchrun.sh"
#               or "accelerate launch launch/train.py" for several GPUs)
#   REPORT_CMD  the report command (default "resnet-scale report")
#   WANDB_PROJECT, WANDB_ENTITY  W&B project (default resnet-scale) and entity
#
# A run whose folder already holds summary.json is skipped, so an interrupted recipe resumes.

SEEDS="${SEEDS:-0 1 2}"
EPOCHS="${EPOCHS:-}"
DATA="${DATA:-auto}"
DATA_DIR="${DATA_DIR:-data}"
DIGITS_EPOCHS="${RECIPE_DIGITS_EPOCHS:-5}"
ARM_FLAG="${ARM_FLAG:---block}"
ARMS="${ARMS:-${BLOCKS:-}}"
GROUP_BY="${GROUP_BY:-block}"
FIXED="${FIXED:-}"
EXTRA="${EXTRA:-}"
RUNS_DIR="${RUNS_DIR:-runs/$RECIPE}"
REPORTS_DIR="${REPORTS_DIR:-reports/$RECIPE}"
TRACKER="${TRACKER:-wandb}"
DRY_RUN="${DRY_RUN:-0}"
TRAIN_CMD="${TRAIN_CMD:-resnet-scale train}"
REPORT_CMD="${REPORT_CMD:-resnet-scale report}"
WANDB_PROJECT="${WANDB_PROJECT:-resnet-scale}"
WANDB_ENTITY="${WANDB_ENTITY:-}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) SEEDS="$2"; shift 2 ;;
        --epochs) EPOCHS="$2"; shift 2 ;;
        --data) DATA="$2"; shift 2 ;;
        --data-dir) DATA_DIR="$2"; shift 2 ;;
        --extra) EXTRA="$2"; shift 2 ;;
        --runs-dir) RUNS_DIR="$2"; shift 2 ;;
        --reports-dir) REPORTS_DIR="$2"; shift 2 ;;
        --tracker) TRACKER="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "$(basename "$0"): unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

data_flags=()
if [[ -d "$DATA_DIR/cifar-10-batches-py" || -d "$DATA_DIR/cifar10" ]]; then
    cifar_here="$DATA_DIR"
elif compgen -G "${HF_DATASETS_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/datasets}/*cifar10*" > /dev/null; then
    cifar_here="cache"
else
    cifar_here=""
fi
if [[ "$DATA" == "auto" ]]; then
    if [[ -n "$cifar_here" ]]; then
        DATA=cifar10
    else
        DATA=digits
        echo "$RECIPE: no CIFAR-10 in $DATA_DIR/ (cifar-10-batches-py/ or cifar10/) or the Hugging Face cache:" \
             "digits instead (offline; DATA=cifar10 downloads CIFAR-10)"
    fi
fi
if [[ "$DATA" == "cifar10" && -n "$cifar_here" && "$cifar_here" != "cache" ]]; then
    data_flags=(--data-dir "$DATA_DIR")
fi
if [[ -z "$EPOCHS" ]]; then
    if [[ "$DATA" == "digits" ]]; then EPOCHS="$DIGITS_EPOCHS"; else EPOCHS="$DEFAULT_EPOCHS"; fi
fi

if [[ ! "$EPOCHS" =~ ^[1-9][0-9]*$ ]]; then
    echo "$(basename "$0"): EPOCHS must be a positive integer, got '$EPOCHS'" >&2; exit 2
fi
if [[ -z "${SEEDS// /}" ]]; then
    echo "$(basename "$0"): SEEDS is empty; give e.g. --seeds \"0 1 2\"" >&2; exit 2
fi

run() {
    echo "+ $(printf '%q ' "$@")"
    if [[ "$DRY_RUN" != "1" ]]; then "$@"; fi
}

read -r -a train_cmd <<< "$TRAIN_CMD"
read -r -a report_cmd <<< "$REPORT_CMD"
read -r -a extra <<< "$EXTRA"
read -r -a fixed <<< "$FIXED"
wandb_flags=(--wandb-project "$WANDB_PROJECT")
if [[ -n "$WANDB_ENTITY" ]]; then wandb_flags+=(--wandb-entity "$WANDB_ENTITY"); fi

echo "$RECIPE: ${ARM_FLAG#--} [$ARMS] at depth $DEPTH on $DATA, batch $BATCH, lr $LR, $EPOCHS epochs, seeds [$SEEDS]"
for seed in $SEEDS; do
    for arm in $ARMS; do
        name="$SHORT-$arm-s$seed"
        if [[ -f "$RUNS_DIR/$name/summary.json" ]]; then
            echo "= $name is done ($RUNS_DIR/$name/summary.json); skipping"
            continue
        fi
        run "${train_cmd[@]}" --data "$DATA" ${data_flags[@]+"${data_flags[@]}"} "$ARM_FLAG" "$arm" \
            ${fixed[@]+"${fixed[@]}"} --depth "$DEPTH" \
            --batch-size "$BATCH" --lr "$LR" --epochs "$EPOCHS" --seed "$seed" \
            --output-dir "$RUNS_DIR" --run-name "$name" \
            --tracker "$TRACKER" "${wandb_flags[@]}" --run-group "$RECIPE" --tags "$RECIPE,$arm,seed$seed" \
            ${extra[@]+"${extra[@]}"}
    done
done

run "${report_cmd[@]}" "$RUNS_DIR" --out "$REPORTS_DIR" --group-by "$GROUP_BY" --baseline "$BASELINE" \
    --title "$TITLE" --wandb-project "$WANDB_PROJECT" ${WANDB_ENTITY:+--wandb-entity "$WANDB_ENTITY"}
