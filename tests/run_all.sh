#!/usr/bin/env bash
# The whole suite in two pytest processes at once. The second runs the tests that bring up
# services (or a whole stack) of their own and mostly wait on outages, kills and restarts: the
# fault suite, supervision, sampler restarts and the second stack; it also takes a few long
# tests on the shared services (the tinker-cookbook runs, the futures test with its own API
# process, the serving test's replica kills) so both halves take about as long. Their output
# follows the main run's.
#
# loopstream's services are started here, before either process, and stopped at the end when
# they were not running before: a pytest process that found them down would otherwise start
# them itself and stop them when it ends, under the other process's feet.
# Exit status: non-zero if either run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
log=$(mktemp -t loopstream-faults.XXXXXX.log)

if "$bin/loopstream" services status >/dev/null 2>&1; then started_here=0; else started_here=1; fi
"$bin/loopstream" services up >/dev/null || exit 1

second=(
    tests/faults
    tests/integration/test_supervision.py
    tests/integration/test_sampler_restart.py
    tests/integration/test_stack_lifecycle.py
    tests/integration/test_tinker_cookbook.py
    tests/integration/test_tinker_futures.py
    tests/integration/test_serving.py
)
"$bin/pytest" -p no:cacheprovider "${second[@]}" "$@" >"$log" 2>&1 &
faults=$!
"$bin/pytest" tests "${second[@]/#/--ignore=}" "$@"
main_rc=$?
wait "$faults"
faults_rc=$?

echo
echo "========== tests run alongside (own services, cookbook, futures) =========="
cat "$log"
rm -f "$log"
echo "main run exit $main_rc, alongside run exit $faults_rc"
[ "$started_here" = 1 ] && "$bin/loopstream" services down >/dev/null
[ "$main_rc" = 0 ] && [ "$faults_rc" = 0 ]
