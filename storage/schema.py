"""Schema migrations, applied in order at start-up (sqlite-utils `Migrations`)."""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("flowbot")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            channel TEXT NOT NULL,
            user_id TEXT NOT NULL,
            key TEXT NOT NULL UNIQUE,
            flow TEXT NOT NULL DEFAULT '',
            block TEXT,
            wait_id TEXT,
            variables TEXT NOT NULL DEFAULT '{}',
            version INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            UNIQUE (channel, user_id)
        );
        CREATE TABLE waits (
            id TEXT PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id),
            kind TEXT NOT NULL,
            flow TEXT NOT NULL,
            block TEXT NOT NULL,
            deadline REAL NOT NULL,
            blocking INTEGER NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            request TEXT,
            created REAL NOT NULL,
            resolved_at REAL
        ) WITHOUT ROWID;
        -- the timer's index: only pending rows, ordered by deadline
        CREATE INDEX waits_due ON waits (deadline) WHERE state = 'pending';
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL,
            channel TEXT NOT NULL,
            user_id TEXT NOT NULL,
            message TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL,
            error TEXT,
            created REAL NOT NULL,
            sent_at REAL
        );
        CREATE INDEX outbox_pending ON outbox (next_attempt) WHERE state = 'pending';
        CREATE INDEX outbox_by_user ON outbox (channel, user_id, id);
        CREATE TABLE events (
            id TEXT PRIMARY KEY,
            at REAL NOT NULL
        ) WITHOUT ROWID;
        """
    )


@migrations()
def m002_delivery_status(db: Database) -> None:
    """Platform message ids, so status callbacks (Twilio) can be matched to outbox rows."""
    db.executescript(
        """
        ALTER TABLE outbox ADD COLUMN platform_id TEXT;
        ALTER TABLE outbox ADD COLUMN platform_status TEXT;
        CREATE INDEX outbox_platform_id ON outbox (platform_id) WHERE platform_id IS NOT NULL;
        """
    )


@migrations()
def m003_outbox_pending_by_id(db: Database) -> None:
    """The outbox reads pending rows in id order; without this index that read scanned
    every row ever sent, so each delivery pass got slower as the outbox grew."""
    db.executescript("CREATE INDEX outbox_pending_id ON outbox (id) WHERE state = 'pending';")


@migrations()
def m004_outbox_pending_by_conversation(db: Database) -> None:
    """Lets the outbox skip conversations whose earlier row waits for a retry."""
    db.executescript(
        "CREATE INDEX outbox_pending_conv ON outbox (conversation_id, id) WHERE state = 'pending';")


@migrations()
def m005_history_for_web_chat_only(db: Database) -> None:
    """Only the web chat reads a user's history (a page that reconnects). An index over
    every channel's rows put one more random page into each transition's commit."""
    db.executescript(
        """
        DROP INDEX outbox_by_user;
        CREATE INDEX outbox_web_history ON outbox (user_id, id) WHERE channel = 'web';
        """
    )


@migrations()
def m006_early_statuses(db: Database) -> None:
    """Twilio can call the status callback before our "sent" commit has stored the
    message's SID; such a status waits here until that commit applies it."""
    db.executescript(
        """
        CREATE TABLE early_statuses (
            platform_id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            error TEXT,
            at REAL NOT NULL
        ) WITHOUT ROWID;
        """
    )


@migrations()
def m007_removed_waits(db: Database) -> None:
    """Waits whose block a new config no longer has end as 'removed'; a late webhook for
    such a conversation is answered 410 (not 409), found through this small index."""
    db.executescript(
        "CREATE INDEX waits_removed ON waits (conversation_id) WHERE state = 'removed';")


@migrations()
def m008_retention(db: Database) -> None:
    """Pruning finds old rows through these: each column is written once, in increasing
    order, so an insert only appends to its index and updates never touch it."""
    db.executescript(
        """
        CREATE INDEX events_at ON events (at);
        CREATE INDEX outbox_created ON outbox (created);
        CREATE INDEX waits_created ON waits (created);
        """
    )


@migrations()
def m009_early_webhooks(db: Database) -> None:
    """A provider may call a conversation's webhook before the conversation reaches its
    Webhook block (it answers the `http` block's request after calling back). Such a call
    waits here, up to `webhooks.early_window` seconds, for the block; `webhook_ended` says
    when the conversation last left a Webhook wait (a call soon after is late, not early)."""
    db.executescript(
        """
        CREATE TABLE early_webhooks (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id),
            payload TEXT NOT NULL,
            schemes TEXT NOT NULL,
            received REAL NOT NULL,
            expires REAL NOT NULL
        );
        CREATE INDEX early_webhooks_by_conversation ON early_webhooks (conversation_id, id);
        CREATE INDEX early_webhooks_expiry ON early_webhooks (expires);
        ALTER TABLE conversations ADD COLUMN webhook_ended REAL;
        """
    )


@migrations()
def m010_pending_waits_by_kind(db: Database) -> None:
    """`flowbot_pending_waits` is counted from the table on each scrape: with the kind in
    the timer's index the count reads the index alone (0.2 s at 500k pending waits, well
    under a millisecond at a thousand), and no other index is kept up on every transition."""
    db.executescript(
        """
        DROP INDEX waits_due;
        CREATE INDEX waits_due ON waits (deadline, kind) WHERE state = 'pending';
        """
    )


@migrations()
def m011_settings(db: Database) -> None:
    """What flowbot keeps about itself: the fingerprint of the blocks the stored
    conversations were last checked against, so start-up scans them only after a config
    edit changed the block set (bot/stranded.py)."""
    db.executescript(
        """
        CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        """
    )


@migrations()
def m012_chat_aliases(db: Database) -> None:
    """A chat's old address → its new one (a Telegram group upgraded to a supergroup),
    written by `move_conversation` in the transaction that moves the conversation: a late
    update from the old address, after a restart too, reaches the moved conversation.
    Pruned with the idle conversations (`[retention]`), through `created`."""
    db.executescript(
        """
        CREATE TABLE chat_aliases (
            channel TEXT NOT NULL,
            old_user_id TEXT NOT NULL,
            new_user_id TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (channel, old_user_id)
        );
        CREATE INDEX chat_aliases_created ON chat_aliases (created);
        """
    )


@migrations()
def m013_early_media_failures(db: Database) -> None:
    """An early status (m006) that says the platform could not send the message's file:
    the "sent" commit that applies it also queues the text again without the file
    (`resend_without_media`). Old code ignores the column."""
    db.executescript(
        """
        ALTER TABLE early_statuses ADD COLUMN resend INTEGER NOT NULL DEFAULT 0;
        """
    )
