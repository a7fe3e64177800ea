#!/usr/bin/env bash
# The test suite: installs everything it needs, then runs pytest.
# Extra arguments go to pytest (e.g. packaging/test.sh -k posix -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/packaging/setup-env.sh" --test
export PATH="$ROOT/.cache/node/node_modules/.bin:$PATH"
# the suite's services (Azurite, PostgreSQL, etcd, runc) must all be there: a missing
# one fails its tests instead of skipping them (tests/support/services.py)
export AZFS_REQUIRE_SERVICES=1
cd "$ROOT"
set +e
"$ROOT/.venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit $rc
