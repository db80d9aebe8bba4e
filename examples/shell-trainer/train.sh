#!/bin/sh
# A trainer in plain POSIX shell that speaks ablate's event protocol by hand
# (README, "Command trials"): a loss that decays at the learning rate's pace,
# one metrics line per step on descriptor 3 ($ABLATE_EVENTS_FD), a checkpoint
# every 10 steps in $ABLATE_CHECKPOINT_DIR, a resume from $ABLATE_RESUME_STEP,
# a stop at its rung ($ABLATE_PAUSE_AT). Usage: train.sh LR STEPS
set -eu
lr=$1
steps=$2
step=0
loss=1
if [ -n "${ABLATE_RESUME_STEP:-}" ]; then
    read -r step loss < "$ABLATE_CHECKPOINT_DIR/state"
fi
while [ "$step" -lt "$steps" ]; do
    step=$((step + 1))
    loss=$(awk -v loss="$loss" -v lr="$lr" 'BEGIN { printf "%.12g", loss * (1 - lr) + lr * lr / 10 }')
    eval_loss=$(awk -v loss="$loss" 'BEGIN { printf "%.12g", loss + 0.01 }')
    echo "{\"step\": $step, \"metrics\": {\"train_loss\": $loss, \"eval_loss\": $eval_loss}}" >&3
    if [ $((step % 10)) -eq 0 ] || [ "$step" = "${ABLATE_PAUSE_AT:-}" ]; then
        echo "$step $loss" > "$ABLATE_CHECKPOINT_DIR/state"
        echo "{\"checkpoint\": $step}" >&3
        # The files may change again once the worker says it stored them.
        if [ -n "${ABLATE_CHECKPOINT_ACK:-}" ]; then
            while [ "$(cat "$ABLATE_CHECKPOINT_ACK" 2>/dev/null)" != "$step" ]; do sleep 0.01; done
        fi
    fi
    if [ "$step" = "${ABLATE_PAUSE_AT:-}" ]; then
        echo "{\"paused\": $step}" >&3
        exit 0
    fi
done
echo "{\"output\": {\"final_train_loss\": $loss}}" >&3
