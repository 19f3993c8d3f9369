"""Rate and concurrency limits shared by every gateway process, kept in Redis.

The same semantics, 429 messages and ``x-ratelimit-*`` headers as ``LocalLimiter``: requests
and tokens in one-second buckets over a sliding minute, requests in flight, and every subject
admitting a request or none counting it. One Lua script admits (checks every subject, then
counts in all of them), one finishes (releases the slots, corrects the token estimate in the
second it was made), so instances never race each other.

Keys, under the configured prefix (``apibox`` here), for a subject such as ``key:12``:

- ``apibox:rate:key:12``, a hash: field ``r:<second>`` counts requests, ``t:<second>`` tokens.
  Only subjects with an rpm or tpm limit have one; buckets older than the minute are deleted as
  they are read, and the hash expires two minutes after its last write.
- ``apibox:busy:key:12``, a sorted set of the requests in flight (subjects with a concurrency
  limit): one member per request, scored with its lease's end. The process that admitted it
  renews the lease every heartbeat; a process that dies stops renewing, and its requests stop
  counting when their leases end (three heartbeats, 30 s). The set expires with its last lease.

Time is Redis's own (``TIME``), so hosts whose clocks differ still share one minute; tests may
pass a clock instead. When Redis does not answer in time, the request is admitted by a
``LocalLimiter`` instead (``RedisLink`` logs it once and flips ``apibox_redis_up``), and the
requests admitted that way are finished there.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from apibox.limits import Admission, LocalLimiter, Subject, _Window, rate_headers, refusal
from apibox.redis_link import REDIS_ERRORS, RedisLink

# Shared by the scripts: the window, the clock, and reading a subject's buckets.
_PRELUDE = """
local WINDOW = 60
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local second = math.floor(now)
"""

# KEYS: per subject, its rate hash and its busy set.
# ARGV: now ('' for Redis's clock), tokens, lease seconds, member, then per subject rpm, tpm, concurrency
# ('' for none). Returns {admitted, second, the first subject's request buckets, its token buckets} and,
# when refused, {..., the refusing subject's index (1-based), the limit it is over, seconds to wait}.
ADMIT = _PRELUDE + """
local tokens = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local member = ARGV[4]

local function load(key)
  local flat = redis.call('HGETALL', key)
  local requests, counted, stale = {}, {}, {}
  for i = 1, #flat, 2 do
    local field = flat[i]
    local sec = tonumber(string.sub(field, 3))
    if sec and sec > second - WINDOW then
      local bucket = {sec, tonumber(flat[i + 1])}
      if string.sub(field, 1, 1) == 'r' then requests[#requests + 1] = bucket else counted[#counted + 1] = bucket end
    else
      stale[#stale + 1] = field
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return requests, counted
end

local function wait(buckets, need, limit)
  local used = 0
  for _, b in ipairs(buckets) do used = used + b[2] end
  if used + need <= limit then return 0 end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  for _, b in ipairs(buckets) do
    used = used - b[2]
    if used + need <= limit then return b[1] + WINDOW - second end
  end
  return WINDOW
end

local function flat(buckets)
  local out = {}
  for _, b in ipairs(buckets) do
    out[#out + 1] = b[1]
    out[#out + 1] = b[2]
  end
  return out
end

local subjects = {}
for i = 1, #KEYS / 2 do
  local at = 5 + 3 * (i - 1)
  local s = {rate = KEYS[2 * i - 1], busy = KEYS[2 * i], rpm = tonumber(ARGV[at]), tpm = tonumber(ARGV[at + 1]),
             concurrency = tonumber(ARGV[at + 2]), requests = {}, counted = {}}
  if s.rpm or s.tpm then s.requests, s.counted = load(s.rate) end
  subjects[i] = s
end

local function refused(i, limit, seconds)
  return {0, second, flat(subjects[1].requests), flat(subjects[1].counted), i, limit, seconds}
end

for i, s in ipairs(subjects) do  -- check everything first, so a refusal counts nowhere
  if s.concurrency then
    redis.call('ZREMRANGEBYSCORE', s.busy, '-inf', now)
    if redis.call('ZCARD', s.busy) >= s.concurrency then return refused(i, 'concurrency', 1) end
  end
  if s.rpm then
    local w = wait(s.requests, 1, s.rpm)
    if w > 0 then return refused(i, 'requests', w) end
  end
  if s.tpm then
    if tokens > s.tpm then return refused(i, 'too_large', WINDOW) end
    local w = wait(s.counted, tokens, s.tpm)
    if w > 0 then return refused(i, 'tokens', w) end
  end
end

for _, s in ipairs(subjects) do
  if s.rpm then redis.call('HINCRBY', s.rate, 'r:' .. second, 1) end
  if s.tpm then redis.call('HINCRBY', s.rate, 't:' .. second, ARGV[2]) end
  if s.rpm or s.tpm then redis.call('EXPIRE', s.rate, 2 * WINDOW) end
  if s.concurrency then
    redis.call('ZADD', s.busy, now + lease, member)
    redis.call('EXPIRE', s.busy, math.ceil(lease) + WINDOW)
  end
end
return {1, second, flat(subjects[1].requests), flat(subjects[1].counted)}
"""

# KEYS: the busy sets to leave (ARGV[5] of them), then the rate hashes whose token count to correct.
# ARGV: now, the second the request was let in, the correction (real tokens - estimate), member, the count.
FINISH = _PRELUDE + """
local busy = tonumber(ARGV[5])
for i = 1, busy do redis.call('ZREM', KEYS[i], ARGV[4]) end
local delta = tonumber(ARGV[3])
if delta ~= 0 and tonumber(ARGV[2]) > second - WINDOW then  -- else the estimate has left the window
  local field = 't:' .. ARGV[2]
  for i = busy + 1, #KEYS do
    if redis.call('HINCRBY', KEYS[i], field, ARGV[3]) < 0 then redis.call('HSET', KEYS[i], field, 0) end
    redis.call('EXPIRE', KEYS[i], 2 * WINDOW)
  end
end
return 1
"""

# KEYS: busy sets; ARGV: now, lease, "XX" or "", then the member in each set. With "XX", the heartbeat's:
# renews leases that still exist (a request finished meanwhile is not brought back). With "", once Redis
# answers again: adds them back too, since a Redis that restarted lost them while their requests run on.
RENEW = _PRELUDE + """
local lease = tonumber(ARGV[2])
for i = 1, #KEYS do
  if ARGV[3] == 'XX' then
    redis.call('ZADD', KEYS[i], 'XX', now + lease, ARGV[i + 3])
  else
    redis.call('ZADD', KEYS[i], now + lease, ARGV[i + 3])
  end
  redis.call('EXPIRE', KEYS[i], math.ceil(lease) + WINDOW)
end
return 1
"""

RENEW_BATCH = 500  # leases renewed per script call
UNFINISHED_MOST = 10_000  # finishes kept while Redis is away (beyond them, the oldest leases just end)


@dataclass(slots=True)
class SharedAdmission(Admission):
    """An admission counted in Redis: ``member`` in each of the ``busy`` sets until it finishes."""

    member: str = ""
    busy: tuple[str, ...] = ()


def _number(value: int | None) -> str | int:
    return "" if value is None else value


def _buckets(flat: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


class RedisLimiter:
    """The ``RateLimiter`` for many instances; falls back to its ``LocalLimiter`` while Redis is away."""

    def __init__(self, link: RedisLink, *, clock: Callable[[], float] | None = None,
                 local: LocalLimiter | None = None) -> None:
        self._link = link
        self._clock = clock
        self._local = local or (LocalLimiter(clock) if clock is not None else LocalLimiter())
        self._lease = 3 * link.heartbeat_seconds
        self._instance = uuid.uuid4().hex[:12]
        self._serial = itertools.count(1)
        self._admit = link.client.register_script(ADMIT)
        self._finish = link.client.register_script(FINISH)
        self._renew = link.client.register_script(RENEW)
        self._in_flight: dict[str, tuple[str, ...]] = {}  # member -> busy sets, for the heartbeat
        # The finishes Redis was away for (when, keys, args): made once it is back, while their leases
        # last, so that a blip does not keep their slots taken until then.
        self._unfinished: deque[tuple[float, list[str], list[str | float | int]]] = deque(maxlen=UNFINISHED_MOST)
        link.on_heartbeat(self.renew_leases)
        link.on_recovery(self.finish_the_unfinished)
        link.on_recovery(self.count_the_running_again)

    def _now(self) -> str | float:
        return "" if self._clock is None else self._clock()

    async def admit(self, subjects: Sequence[Subject], tokens: int) -> Admission:
        if subjects and self._link.up:
            try:
                return await self._admit_shared(subjects, tokens)
            except REDIS_ERRORS as exc:
                self._link.failed(exc)
        if subjects:
            self._link.fell_back()
        return await self._local.admit(subjects, tokens)

    async def _admit_shared(self, subjects: Sequence[Subject], tokens: int) -> Admission:
        member = f"{self._instance}:{next(self._serial)}"
        keys: list[str] = []
        args: list[str | float | int] = [self._now(), tokens, self._lease, member]
        for subject in subjects:
            keys += [self._link.key("rate", subject.name), self._link.key("busy", subject.name)]
            limits = subject.limits
            args += [_number(limits.rpm), _number(limits.tpm), _number(limits.concurrency)]
        reply = await self._link.call(self._admit(keys=keys, args=args))
        second, first = int(reply[1]), subjects[0]
        requests, counted = _Window.of(_buckets(reply[2])), _Window.of(_buckets(reply[3]))
        if not reply[0]:
            index, limit, wait = int(reply[4]), str(reply[5]), int(reply[6])
            # raised as made: one kept in a local would be held by its own traceback, a reference cycle
            raise refusal(subjects[index - 1], limit, wait, tokens,
                          headers=rate_headers(first.limits, requests, counted, second))
        if first.limits.rpm is not None:
            requests.add(second, 1)
        if first.limits.tpm is not None:
            counted.add(second, tokens)
        busy = tuple(key for key, subject in zip(keys[1::2], subjects, strict=True)
                     if subject.limits.concurrency is not None)
        if busy:
            self._in_flight[member] = busy
        return SharedAdmission(subjects, tokens, headers=rate_headers(first.limits, requests, counted, second),
                               second=second, member=member, busy=busy)

    async def finish(self, admission: Admission, actual_tokens: int) -> None:
        """Release the concurrency slots and replace the token estimate with the real count."""
        if not isinstance(admission, SharedAdmission):
            await self._local.finish(admission, actual_tokens)
            return
        if admission.finished:
            return
        admission.finished = True
        self._in_flight.pop(admission.member, None)  # while Redis is away, its lease simply ends
        delta = actual_tokens - admission.tokens
        counted = [self._link.key("rate", s.name) for s in admission.subjects if s.limits.tpm is not None] \
            if delta else []
        if not (admission.busy or counted):
            return
        keys = [*admission.busy, *counted]
        args: list[str | float | int] = [self._now(), admission.second, delta, admission.member, len(admission.busy)]
        if not self._link.up:
            self._unfinished.append((time.monotonic(), keys, args))
            return
        try:
            await self._link.call(self._finish(keys=keys, args=args))
        except REDIS_ERRORS as exc:
            self._link.failed(exc)
            self._unfinished.append((time.monotonic(), keys, args))

    async def finish_the_unfinished(self) -> None:
        """Make the finishes that Redis was away for, those whose leases have not ended yet."""
        while self._unfinished:
            when, keys, args = self._unfinished[0]
            if time.monotonic() - when < self._lease:
                await self._link.call(self._finish(keys=keys, args=args))
            self._unfinished.popleft()

    async def renew_leases(self, mode: str = "XX") -> None:
        """Renew the leases of this process's requests in flight (the link's heartbeat)."""
        pairs = [(key, member) for member, busy in list(self._in_flight.items()) for key in busy]
        for start in range(0, len(pairs), RENEW_BATCH):
            batch = pairs[start:start + RENEW_BATCH]
            await self._link.call(self._renew(keys=[key for key, _ in batch],
                                              args=[self._now(), self._lease, mode, *(member for _, member in batch)]))

    async def count_the_running_again(self) -> None:
        """Put this process's requests in flight back in their busy sets once Redis answers again:
        a Redis that restarted has lost them, and would let in as many more as their limits allow
        while they still run. Only now, not at each heartbeat, whose renewal must not bring back a
        request that finished while it was on its way."""
        await self.renew_leases(mode="")
