#!/usr/bin/env bash
# The whole suite in two pytest processes at once: the fault suite (tests/faults) brings up a
# stack and services of its own and mostly waits on outages and restarts, so it runs beside
# everything else on the shared stack instead of after it. Its output follows the main run's.
# Exit status: non-zero if either run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
log=$(mktemp -t loopstream-faults.XXXXXX.log)

"$bin/pytest" -p no:cacheprovider tests/faults "$@" >"$log" 2>&1 &
faults=$!
"$bin/pytest" tests --ignore=tests/faults "$@"
main_rc=$?
wait "$faults"
faults_rc=$?

echo
echo "=================== fault suite (tests/faults, ran alongside) ==================="
cat "$log"
rm -f "$log"
echo "main suite exit $main_rc, fault suite exit $faults_rc"
[ "$main_rc" = 0 ] && [ "$faults_rc" = 0 ]
