"""Holds before a request, one settlement after it, and the ledger audit.

The hold is the worst case the request can cost. When the user can pay for the prompt but
not for the full answer, the answer is shortened to what they can pay for (the caller then
lowers the upstream's ``max_tokens``). Settlement charges the cost of the reported usage
(or of an estimate when none was reported), capped at what the user has.
"""

from __future__ import annotations

from dataclasses import dataclass

from apibox.errors import InsufficientQuota
from apibox.models import ApiKey, Hold, UsageRecord
from apibox.money import MAX_STORED_MICRO, format_usd
from apibox.pricing import Price, Usage, affordable_output_tokens, cost_micro, worst_case_micro
from apibox.store.base import ProgressFn, Store

MIN_ANSWER_TOKENS = 16  # a request that cannot pay for this much answer is refused
# Far past any real request. An upstream reporting more is clamped to it, so that its report
# can neither overflow a usage row's columns (and fail the settlement) nor their sums in reports.
MOST_TOKENS_A_REQUEST = 10**12
HOLD_ATTEMPTS = 3  # concurrent requests may take the money between our read and our hold


@dataclass(frozen=True, slots=True)
class Reservation:
    hold: Hold
    price: Price
    output_tokens: int  # the most output this hold pays for
    lowered: bool  # True when output_tokens is below what the request asked for


async def reserve(store: Store, key: ApiKey, *, model: str, price: Price, request_id: str, prompt_tokens: int,
                  output_tokens: int, min_output: int = MIN_ANSWER_TOKENS) -> Reservation:
    """Hold the worst-case cost of a request, shortening the answer if that is all the user can pay.

    Raises InsufficientQuota when even the prompt and ``min_output`` tokens cannot be paid.
    """
    min_output = min(min_output, output_tokens)
    wanted = output_tokens
    budget_left = None if key.budget is None else key.budget - key.spent  # refreshed below when short
    for _ in range(HOLD_ATTEMPTS):
        amount = worst_case_micro(price, prompt_tokens, wanted)
        if budget_left is None or amount <= budget_left:
            hold = await _hold(store, key, amount, request_id, model)
            if hold is not None:
                return Reservation(hold, price, wanted, lowered=wanted < output_tokens)
        available = (await store.get_balance(key.user_id)).available
        if key.budget is not None:
            budget_left = await store.key_headroom(key.id)
            available = min(available, budget_left if budget_left is not None else available)
        wanted = min(output_tokens, affordable_output_tokens(price, available, prompt_tokens))
        if wanted < min_output:
            need = worst_case_micro(price, prompt_tokens, min_output)
            budget_short = budget_left is not None and budget_left < need
            what, remedy = (("this key's budget", "Ask the operator to raise the key's budget, or use another key.")
                            if budget_short else ("your balance", "Top up your balance and try again."))
            raise InsufficientQuota(
                f"Insufficient balance: {what} (${format_usd(max(available, 0))} available) cannot pay for this "
                f"request (at least ${format_usd(need)} for the prompt and a minimal answer). {remedy}")
    raise InsufficientQuota("Insufficient balance: other requests in flight are using your balance; "
                            "try again when they finish or top up.")


async def _hold(store: Store, key: ApiKey, amount: int, request_id: str, model: str) -> Hold | None:
    if amount <= 0:
        # A free request still takes a token hold, so every request is settled the same way.
        amount = 1
    if amount > MAX_STORED_MICRO:  # (a max_tokens of 10**18): more than any balance, and than a column takes
        return None  # does not fit: the answer is lowered to what the balance pays for
    return await store.hold(key.user_id, key.id, amount, request_id, model, budgeted=key.budget is not None)


async def settle(store: Store, reservation: Reservation, record: UsageRecord, usage: Usage) -> UsageRecord:
    """Charge ``usage`` at the reservation's price and write the usage row, once."""
    usage = usage.clamped(MOST_TOKENS_A_REQUEST)
    record.prompt_tokens = usage.prompt_tokens
    record.completion_tokens = usage.completion_tokens
    record.cached_tokens = usage.cached_tokens
    record.cache_write_tokens = usage.cache_write_tokens
    record.reasoning_tokens = usage.reasoning_tokens
    record.estimated = usage.estimated
    record.cost = min(cost_micro(reservation.price, usage), MAX_STORED_MICRO)
    return await store.settle(reservation.hold, record)


async def check(store: Store, progress: ProgressFn | None = None) -> list[str]:
    """The ledger audit behind `apibox db check`: every broken money invariant, or nothing."""
    return await store.audit(progress)
