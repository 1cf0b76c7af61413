#!/usr/bin/env bash
# The whole suite in two pytest processes at once. The second runs the tests that bring up
# services (or a whole stack) of their own and mostly wait on outages, kills and restarts: the
# fault suite, supervision, sampler restarts and the second stack. They share nothing with the
# rest, so they run beside it instead of after it; their output follows the main run's.
# Exit status: non-zero if either run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
log=$(mktemp -t loopstream-faults.XXXXXX.log)

own_services=(
    tests/faults
    tests/integration/test_supervision.py
    tests/integration/test_sampler_restart.py
    tests/integration/test_stack_lifecycle.py
)
"$bin/pytest" -p no:cacheprovider "${own_services[@]}" "$@" >"$log" 2>&1 &
faults=$!
"$bin/pytest" tests "${own_services[@]/#/--ignore=}" "$@"
main_rc=$?
wait "$faults"
faults_rc=$?

echo
echo "========== tests with services of their own (ran alongside) =========="
cat "$log"
rm -f "$log"
echo "shared-stack tests exit $main_rc, own-services tests exit $faults_rc"
[ "$main_rc" = 0 ] && [ "$faults_rc" = 0 ]
