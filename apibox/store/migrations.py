"""Numbered schema migrations for both engines, applied in order, each in one transaction
with its record.

One list: each migration carries its SQLite and its PostgreSQL text, which build the same
tables, constraints and triggers (the PostgreSQL texts live in ``migrations_postgres``). Never
edit a migration that has shipped: add the next one. Money columns are integer micro-USD;
times are integer milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass

from apibox.store.migrations_postgres import POSTGRESQL


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sqlite: str
    postgresql: str


SQLITE: dict[str, str] = {
    "0001_initial": """
CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL DEFAULT '',
    grp           TEXT NOT NULL DEFAULT 'default',
    state         TEXT NOT NULL DEFAULT 'active'
                  CHECK (state IN ('active', 'suspended', 'banned', 'closed')),
    state_reason  TEXT NOT NULL DEFAULT '',
    created_at    INTEGER NOT NULL
);

-- The cached balance; the ledger is the record. The CHECKs are the last line of defence
-- behind the conditional statements in the store: they make a negative balance impossible.
CREATE TABLE balances (
    user_id  INTEGER PRIMARY KEY REFERENCES users(id),
    balance  INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
    held     INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0 AND held <= balance)
);

CREATE TABLE api_keys (
    id            INTEGER PRIMARY KEY,
    user_id       INTEGER NOT NULL REFERENCES users(id),
    name          TEXT NOT NULL DEFAULT '',
    key_hash      TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    models        TEXT NOT NULL DEFAULT '',
    budget        INTEGER CHECK (budget IS NULL OR budget > 0),
    spent         INTEGER NOT NULL DEFAULT 0,
    expires_at    INTEGER,
    rpm           INTEGER,
    tpm           INTEGER,
    concurrency   INTEGER,
    allow_ips     TEXT NOT NULL DEFAULT '',
    revoked_at    INTEGER,
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER
);
CREATE INDEX api_keys_user ON api_keys(user_id);

-- Money set aside for requests in flight. balances.held is kept equal to the sum of a
-- user's holds by these triggers, so a hold is one INSERT and a release one DELETE.
CREATE TABLE holds (
    id          INTEGER PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id),
    key_id      INTEGER NOT NULL REFERENCES api_keys(id),
    amount      INTEGER NOT NULL CHECK (amount > 0),
    request_id  TEXT NOT NULL,
    model       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TRIGGER holds_take AFTER INSERT ON holds BEGIN
    UPDATE balances SET held = held + NEW.amount WHERE user_id = NEW.user_id;
END;
CREATE TRIGGER holds_release AFTER DELETE ON holds BEGIN
    UPDATE balances SET held = held - OLD.amount WHERE user_id = OLD.user_id;
END;

CREATE TABLE usage (
    id                  INTEGER PRIMARY KEY,
    request_id          TEXT NOT NULL,
    created_at          INTEGER NOT NULL,
    user_id             INTEGER NOT NULL REFERENCES users(id),
    key_id              INTEGER NOT NULL REFERENCES api_keys(id),
    model               TEXT NOT NULL,
    provider            TEXT NOT NULL,
    endpoint            TEXT NOT NULL,
    status              TEXT NOT NULL,
    http_status         INTEGER NOT NULL,
    prompt_tokens       INTEGER NOT NULL DEFAULT 0,
    completion_tokens   INTEGER NOT NULL DEFAULT 0,
    cached_tokens       INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens  INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens    INTEGER NOT NULL DEFAULT 0,
    estimated           INTEGER NOT NULL DEFAULT 0,
    cost                INTEGER NOT NULL DEFAULT 0 CHECK (cost >= 0),
    charged             INTEGER NOT NULL DEFAULT 0 CHECK (charged >= 0 AND charged <= cost),
    latency_ms          INTEGER NOT NULL DEFAULT 0,
    ttft_ms             INTEGER
);
CREATE INDEX usage_created ON usage(created_at);
CREATE INDEX usage_user_created ON usage(user_id, created_at);
CREATE INDEX usage_key_created ON usage(key_id, created_at);

CREATE TABLE ledger (
    id             INTEGER PRIMARY KEY,
    user_id        INTEGER NOT NULL REFERENCES users(id),
    created_at     INTEGER NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('topup', 'charge', 'refund', 'adjustment')),
    amount         INTEGER NOT NULL CHECK (amount != 0),
    balance_after  INTEGER NOT NULL CHECK (balance_after >= 0),
    note           TEXT NOT NULL DEFAULT '',
    reference      TEXT UNIQUE,
    actor          TEXT NOT NULL,
    usage_id       INTEGER UNIQUE REFERENCES usage(id)
);
CREATE INDEX ledger_user ON ledger(user_id, id);
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;
""",
    "0002_admin_log": """
-- Who changed what, from the CLI or the admin API: append-only like the ledger.
CREATE TABLE admin_log (
    id          INTEGER PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    before      TEXT,
    after       TEXT
);
CREATE INDEX admin_log_created ON admin_log(created_at);
CREATE TRIGGER admin_log_no_update BEFORE UPDATE ON admin_log BEGIN
    SELECT RAISE(ABORT, 'the admin log is append-only');
END;
CREATE TRIGGER admin_log_no_delete BEFORE DELETE ON admin_log BEGIN
    SELECT RAISE(ABORT, 'the admin log is append-only');
END;
-- A key's budget is checked against its open holds in the hold statement itself.
CREATE INDEX holds_key ON holds(key_id);
""",
    "0003_usage_daily": """
-- Retention: `apibox usage prune` folds old usage rows into one row per UTC day, user, key,
-- model, provider and outcome (usage.status), then deletes them. Reports read both tables.
-- day is the UTC midnight that starts the day, in ms. Sums are exact; latencies keep their
-- sum and count (percentiles need the rows, so they cover live rows only).
CREATE TABLE usage_daily (
    day                 INTEGER NOT NULL,
    user_id             INTEGER NOT NULL REFERENCES users(id),
    key_id              INTEGER NOT NULL REFERENCES api_keys(id),
    model               TEXT NOT NULL,
    provider            TEXT NOT NULL,
    status              TEXT NOT NULL,
    requests            INTEGER NOT NULL CHECK (requests > 0),
    errors              INTEGER NOT NULL,
    estimated           INTEGER NOT NULL,
    prompt_tokens       INTEGER NOT NULL,
    completion_tokens   INTEGER NOT NULL,
    cached_tokens       INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    cost                INTEGER NOT NULL CHECK (cost >= 0),
    charged             INTEGER NOT NULL CHECK (charged >= 0 AND charged <= cost),
    charges             INTEGER NOT NULL,  -- rows with a ledger charge (charged > 0)
    latency_ms_sum      INTEGER NOT NULL,
    latency_count       INTEGER NOT NULL,
    ttft_ms_sum         INTEGER NOT NULL,
    ttft_count          INTEGER NOT NULL,
    PRIMARY KEY (day, user_id, key_id, model, provider, status)
) WITHOUT ROWID;
CREATE INDEX usage_daily_user ON usage_daily(user_id, day);

-- A folded usage row is deleted while its ledger charge stays (the ledger is append-only), so
-- ledger.usage_id can no longer be a foreign key: the ledger is rebuilt without it, row for row
-- and id for id. `apibox db check` matches a charge to its usage row while the row lives, and
-- each user's folded charges (their count and sum) to the user's aggregates once it is folded.
CREATE TABLE ledger_new (
    id             INTEGER PRIMARY KEY,
    user_id        INTEGER NOT NULL REFERENCES users(id),
    created_at     INTEGER NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('topup', 'charge', 'refund', 'adjustment')),
    amount         INTEGER NOT NULL CHECK (amount != 0),
    balance_after  INTEGER NOT NULL CHECK (balance_after >= 0),
    note           TEXT NOT NULL DEFAULT '',
    reference      TEXT UNIQUE,
    actor          TEXT NOT NULL,
    usage_id       INTEGER UNIQUE
);
INSERT INTO ledger_new (id, user_id, created_at, kind, amount, balance_after, note, reference, actor, usage_id)
    SELECT id, user_id, created_at, kind, amount, balance_after, note, reference, actor, usage_id FROM ledger;
DROP TRIGGER ledger_no_update;
DROP TRIGGER ledger_no_delete;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_user ON ledger(user_id, id);
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;
""",
    "0004_instances": """
-- Every running gateway (each `serve` worker, on every host) records itself and beats a
-- heartbeat; a hold belongs to the instance that took it. An instance that starts releases
-- only the holds of instances whose heartbeat stopped, never those of its live neighbours.
CREATE TABLE instances (
    id          TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL
);
ALTER TABLE holds ADD COLUMN instance TEXT NOT NULL DEFAULT '';
CREATE INDEX holds_instance ON holds(instance);
""",
    # The holds table only ever has the requests in flight, and every hold and settlement wrote
    # both indexes (about 2% of a request's CPU, more at one connection). Releasing a dead
    # instance's holds scans them anyway (NOT IN); a hold for a key with a budget sums that key's
    # holds by scanning the in-flight ones, a few thousand at most on one SQLite host.
    "0005_lean_holds": """
DROP INDEX holds_instance;
DROP INDEX holds_key;
""",
    # Every settlement inserts a ledger row, and two things in the ledger's definition cost it
    # more than the rest of that INSERT: SQLite checks `kind IN (four strings)` by building a
    # temporary b-tree of the four for each statement (the same test written with OR is
    # compared in place), and the UNIQUE on reference indexed the NULL of every charge. The
    # table is rebuilt, row for row and id for id, with the OR test and a unique index of the
    # references that exist. `reference = ?` lookups use that index (it implies NOT NULL).
    "0006_lean_ledger": """
CREATE TABLE ledger_new (
    id             INTEGER PRIMARY KEY,
    user_id        INTEGER NOT NULL REFERENCES users(id),
    created_at     INTEGER NOT NULL,
    kind           TEXT NOT NULL
                   CHECK (kind = 'topup' OR kind = 'charge' OR kind = 'refund' OR kind = 'adjustment'),
    amount         INTEGER NOT NULL CHECK (amount != 0),
    balance_after  INTEGER NOT NULL CHECK (balance_after >= 0),
    note           TEXT NOT NULL DEFAULT '',
    reference      TEXT,
    actor          TEXT NOT NULL,
    usage_id       INTEGER UNIQUE
);
INSERT INTO ledger_new (id, user_id, created_at, kind, amount, balance_after, note, reference, actor, usage_id)
    SELECT id, user_id, created_at, kind, amount, balance_after, note, reference, actor, usage_id FROM ledger;
DROP TRIGGER ledger_no_update;
DROP TRIGGER ledger_no_delete;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_user ON ledger(user_id, id);
CREATE UNIQUE INDEX ledger_reference ON ledger(reference) WHERE reference IS NOT NULL;
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;
""",
    # A user's usage rows are found through the user's keys (usage_key_created): a key belongs to
    # one user for good. The index by user was one more b-tree page written by every settlement (a
    # page of its own for each user a group commit settles for).
    "0007_usage_by_key": """
DROP INDEX usage_user_created;
""",
    # PostgreSQL only: the settlement, and the hold of a key with a budget, as server-side functions
    # (one round trip where BEGIN, the statements and COMMIT took four or five). SQLite's statements
    # cost no round trip.
    "0008_hold_and_settle_functions": """
-- nothing on SQLite
""",
    # Responses the upstream stores (Responses API, store on), by the upstream's id: whose each is,
    # which provider has it, and the tokens of its conversation so far (the input it was asked with
    # and its output), which the upstream reads again when a user continues it. A user may continue,
    # read or delete only their own; rows older than `usage prune`'s cut are forgotten with the usage rows.
    "0009_stored_responses": """
CREATE TABLE stored_responses (
    response_id  TEXT PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users(id),
    provider     TEXT NOT NULL,
    model        TEXT NOT NULL,
    context_tokens INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX stored_responses_created ON stored_responses(created_at);
""",
    # PostgreSQL only: its settlement function capped at the key's budget (SqlStore.settle's script
    # does so on SQLite).
    "0010_settle_within_budget": """
-- nothing on SQLite
""",
    # PostgreSQL only: its settlement function, capped at a balance row that is missing, says so
    # (no_balance) as SqlStore.settle's script does on SQLite.
    "0011_settle_without_balance": """
-- nothing on SQLite
""",
}

MIGRATIONS: tuple[Migration, ...] = tuple(Migration(name, sql, POSTGRESQL[name]) for name, sql in SQLITE.items())
