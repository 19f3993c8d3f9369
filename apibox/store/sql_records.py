"""What the store keeps beside the money: the admin log, and whose each response an upstream
keeps is. SqlStore's engines supply ``_read`` and ``_write``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from apibox.models import AdminAction, StoredResponse
from apibox.store.script import Row
from apibox.store.sqltime import from_ms, now_ms, to_ms


def _json_or_none(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, default=str, sort_keys=True)


class SqlRecords:
    """The admin log and the stored responses' owners (mixed into SqlStore)."""

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    # -- responses the upstream stores -------------------------------------------------------

    async def remember_response(self, stored: StoredResponse) -> None:
        """Record whose a stored response is (the first record of an id stands)."""
        await self._write("INSERT INTO stored_responses (response_id, user_id, provider, model, context_tokens, "
                          "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (response_id) DO NOTHING",
                          (stored.response_id, stored.user_id, stored.provider, stored.model, stored.context_tokens,
                           to_ms(stored.created_at) or now_ms()))

    async def stored_response(self, response_id: str) -> StoredResponse | None:
        rows = await self._read("SELECT response_id, user_id, provider, model, context_tokens, created_at "
                                "FROM stored_responses WHERE response_id = ?", (response_id,))
        return StoredResponse(*rows[0][:5], from_ms(rows[0][5])) if rows else None

    async def forget_response(self, response_id: str) -> None:
        await self._write("DELETE FROM stored_responses WHERE response_id = ?", (response_id,))

    # -- admin log -------------------------------------------------------------------------

    async def log_admin_action(self, actor: str, action: str, target: str, before: dict[str, Any] | None,
                               after: dict[str, Any] | None) -> None:
        await self._write(
            "INSERT INTO admin_log (created_at, actor, action, target, before, after) VALUES (?, ?, ?, ?, ?, ?)",
            (now_ms(), actor, action, target, _json_or_none(before), _json_or_none(after)))

    async def admin_actions(self, limit: int = 100, before: int | None = None) -> list[AdminAction]:
        older = "" if before is None else " WHERE id < ?"
        rows = await self._read("SELECT id, created_at, actor, action, target, before, after FROM admin_log"
                                f"{older} ORDER BY id DESC LIMIT ?", (limit,) if before is None else (before, limit))
        return [AdminAction(r[0], from_ms(r[1]), r[2], r[3], r[4],  # type: ignore[arg-type]
                            json.loads(r[5]) if r[5] else None, json.loads(r[6]) if r[6] else None) for r in rows]
