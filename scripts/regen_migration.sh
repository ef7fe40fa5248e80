#!/usr/bin/env bash
# Regenerate the single initial migration from the models (pre-release: no deployed database to
# carry forward yet). After the first release, add new revisions instead.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
rm -f store/migrations/versions/0001_initial.py
.venv/bin/python - "$tmp" <<'PY'
import sys
from alembic import command
from store.migrate import alembic_config
cfg = alembic_config(f"sqlite+aiosqlite:///{sys.argv[1]}/gen.db")
command.revision(cfg, message="initial schema", autogenerate=True, rev_id="0001")
PY
mv store/migrations/versions/0001_*.py store/migrations/versions/0001_initial.py
.venv/bin/ruff format -q store/migrations/versions/0001_initial.py
.venv/bin/ruff check -q --fix store/migrations/versions/0001_initial.py || true
rm -rf "$tmp"
