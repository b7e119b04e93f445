#!/usr/bin/env bash
# Refresh the locks: every CI environment resolved from today's releases (RH_TRL_CI_LATEST=1), written to
# .ci/lock/<env>.txt, and the whole of .ci/run run on them. Commit the new locks only if it passed.
#   bash .ci/lock.sh           (as long as .ci/run, about 25 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
RH_TRL_CI_LATEST=1 RH_TRL_CI_WRITE_LOCK=1 bash .ci/run
git status --short .ci/lock
