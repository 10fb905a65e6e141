#!/bin/sh
# The background queue of the experiments that take hours: the GLUE table and its gap measurements
# (issue 14) and APET (16; complete, as is the unified subspace, which needs no step), then the other
# studies cheapest first (15), the design table (18) last, then its schedule check.  Every step is resumable
# (finished cells are skipped, a stopped cell resumes from its checkpoint), so after any stop
# the same command continues where the queue stopped.  One step at a time: each sweep already
# uses every core (one torch thread per cell), and two sweeps side by side would oversubscribe them.
#
#   nohup sh experiments/queue.sh > experiments/results/queue.log 2>&1 &
#   pkill -TERM -f experiments/queue.sh; pkill -TERM -f 'experiments/[a-z_]*\.py'; sleep 8; .venv/bin/ray stop --force  # pause
# (TERM for both: a process started in the background ignores SIGINT, so a driver never sees it; TERM
# ends the driver at once, its finished rows are on disk and its running cells resume from their
# checkpoints; `ray stop` ends the cell workers.)
#
# Each step's own output goes to experiments/results/<step>.log; this log has one line per step.
set -u
cd "$(dirname "$0")/.." || exit 1
# A pause (SIGTERM; SIGINT where the shell receives it) stops the queue once the running step has stopped, instead of starting the next.
trap 'echo "$(date "+%F %T") queue: paused"; exit 130' INT TERM
PY=.venv/bin/python

step() {
    name=$1
    shift
    echo "$(date '+%F %T') queue: $name $*"
    if $PY "experiments/$name.py" "$@" >> "experiments/results/$name.log" 2>&1; then
        echo "$(date '+%F %T') queue: $name finished"
    else
        echo "$(date '+%F %T') queue: $name exited with status $? (see experiments/results/$name.log)"
    fi
}

step glue_table --cpus-per-cell 1
step convergence
step glue_gaps --cpus-per-cell 2
step apet  # with the unified subspace (its rows are complete), the rest of issue 16 (~3 core-h estimated)
step design_table --tasks cola  # issue 18's first verdicts, where the methods separate most and cells are cheapest (~4 core-h)
# issue 15, most claims per core-hour first; RTE last, where it is dearest (its pairs are the longest rows) and,
# at MiniLM's scale, does not separate the methods (glue_table.json), so the other three tasks give the claims first
step sequential
# run folders stay on the machine that trained them: transfer trains each lost GLUE run again from its row and
# scores it at once (its rebuilt row, curve and training-row scores included, goes to glue_rebuilt.jsonl), so its
# progress outlives the machine; one step (~9.5 core-h) serves three claims: transfer, convergence's seeds 1
# and 2, and the generalisation gap's missing seeds; rebuild_runs then rebuilds any GLUE cell still without a
# rebuilt row
step transfer
step rebuild_runs
step convergence
step glue_table --summary-only  # its summary takes the rebuilt rows' training-row scores
step unipelt_low_resource --tasks sst2,cola,mrpc
step composability --tasks sst2,cola,mrpc
step scale
step unipelt_low_resource
step composability
step design_table --tasks cola,sst2  # then SST-2 (RTE does not separate methods at MiniLM's scale)
step design_table --tasks cola,sst2,mrpc  # MRPC's table cells before RTE's selection: a third complete task first
step design_ablation  # first, for MRPC's one win over LoRA (the recommender at b18k): the recommender's placement with LoRA's own start (SST-2, MRPC, CoLA, ~1.4 core-h estimated)
step design_seeds  # the table's close calls against LoRA on seeds 3-7, its one win among them (~3.5 core-h by the table's own times)
step design_table  # RTE, the fourth task issue 18's table needs (~20 core-h estimated)
step design_probe  # the designs through a head fitted first, against LP-FT LoRA (SST-2 and CoLA, ~4.4 core-h estimated)
step design_schedule  # do the verdicts survive twice the epochs? (SST-2 and CoLA, ~8.7 core-h estimated)
.venv/bin/controltune figures >> experiments/results/queue.log 2>&1  # every figure whose results now exist
echo "$(date '+%F %T') queue: done"
