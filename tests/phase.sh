#!/usr/bin/env bash
# phase.sh NAME COMMAND...: runs COMMAND and prints when it started and how long it took,
# so that one `make test` log gives each phase's wall time (a cold CI run's budget).
name=$1
shift
start=$SECONDS
echo "==> $(date -u +%T) $name: started"
"$@"
rc=$?
took=$((SECONDS - start))
echo "==> $(date -u +%T) $name: $((took / 60))m$(printf %02d $((took % 60)))s$( ((rc)) && echo ", exit $rc")"
exit $rc
