"""One seed per test run for hypothesis and schemathesis: printed at the start and the end
of the run, so a failure found by random generation replays with
`FLOWBOT_TEST_SEED=<seed> pytest …` (tests/conftest.py hands it to hypothesis; the
schemathesis test sets it on its schema)."""

from __future__ import annotations

import os
import secrets

RUN_SEED = int(os.environ.get("FLOWBOT_TEST_SEED") or secrets.randbelow(2**32))
