"""S3: the reliability kinds plus every optional runtime service, for the least-privilege
worker: a periodic job firing every 2 seconds (writes ``<schema>.periodic``, inserts with
a unique key) and the retention pruner (deletes finished rows)."""

from __future__ import annotations

import datetime as dt

from sa_jobs import Pruner
from sa_jobs.periodic import Periodic

from .rel_jobs import *  # noqa: F401,F403 - registers every rel_* kind
from .rel_jobs import RelNoop

# Every 2 seconds: with 6 fields croniter takes the seconds LAST. ("*/2 * * * * *" was
# every second of every even minute and nothing in odd ones: docs/reliability.md, Finding 7.)
SA_JOBS_PERIODIC = [Periodic("* * * * * */2", RelNoop, name="rel_s3_tick")]
SA_JOBS_MAINTENANCE = [Pruner(completed=dt.timedelta(seconds=3), dead=None, cancelled=None, interval=1.0)]
