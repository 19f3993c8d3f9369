"""Server-sent events: an incremental decoder for upstream streams, and the encoder.

TCP reads do not align with events, a UTF-8 character can straddle two reads, and lines may
end in LF, CRLF or CR; the decoder buffers bytes and yields only whole events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A blank line: two line endings in a row, each CRLF, LF or CR (mixed ones too). A CR
# directly before LF is one CRLF ending, never two.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_LINE = re.compile(r"\r\n|\n|\r")
# The usual frame: ``data: ...`` on one line and a blank line, LF endings; and a run of them.
_DATA_FRAME = re.compile(rb"data: ([^\n]*)\n\n")
_DATA_FRAMES = re.compile(rb"(?:data: [^\n]*\n\n)+")
# The most one event may hold: an answer's whole output (a Responses stream's last event), images
# included, is a few MB. An upstream sending more without an event's end is broken (or hostile).
MOST_EVENT_BYTES = 64 * 1024 * 1024
# An unfinished event this long has the reads that follow kept apart (``SSEDecoder._joined``) until
# one may end it: joined to it and searched whole on every read, a 64 MB event took half a minute
# of CPU. Shorter ones, the usual case, are joined at once.
GATHER_FROM_BYTES = 64 * 1024


class EventTooLarge(ValueError):
    """An upstream sent more than MOST_EVENT_BYTES without ending an event."""


def _kept(size: int) -> None:
    """Refuse an event still to come that is already too large."""
    if size > MOST_EVENT_BYTES:
        raise EventTooLarge(f"an event of more than {MOST_EVENT_BYTES // (1024 * 1024)} MB")


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = ""


class SSEDecoder:
    """Feed bytes as they arrive; get back complete events (``feed``) or only their data (``feed_data``)."""

    gather_from = GATHER_FROM_BYTES

    def __init__(self) -> None:
        self._buffer = b""  # the start of an unfinished event
        self._more: list[bytes] = []  # reads after a long ``_buffer``, none of which may end its event
        self._more_size = 0

    def _joined(self, chunk: bytes) -> bytes | None:
        """The unfinished event's bytes and ``chunk``, to be decoded; None while a long one is still
        coming: ``chunk`` is kept apart unless an event may end in it (with the last bytes before
        it: an ending is at most four bytes), so each byte is copied and searched a bounded number
        of times, however long the event."""
        buffer = self._buffer
        if len(buffer) < self.gather_from:
            return buffer + chunk
        if not chunk:  # (nothing new can end the event)
            return None
        before = self._more[-1] if self._more else buffer
        self._more.append(chunk)
        self._more_size += len(chunk)
        if _EVENT_END.search(before[-3:] + chunk) is None:
            _kept(len(buffer) + self._more_size)
            return None
        joined = b"".join([buffer, *self._more])
        self._buffer, self._more, self._more_size = b"", [], 0
        return joined

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._joined(chunk)
        if buffer is None:
            return []
        events: list[Event] = []
        start = 0
        for match in _EVENT_END.finditer(buffer):
            event = _parse(buffer[start:match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
        self._buffer = buffer[start:]
        _kept(len(self._buffer))
        return events

    def feed_data(self, chunk: bytes) -> list[bytes]:
        """The data of each whole event, as bytes on one line (so ``encode`` frames it again as it came).

        The usual frame, ``data: ...`` and a blank line with LF endings, is sliced out as the bytes
        that came, neither decoded nor parsed; anything else (CR endings, other fields, comments,
        data over several lines) goes through ``feed``, its lines joined with spaces: to a JSON
        text, whitespace like the line breaks were.
        """
        # bytes.find rather than ``in``: on Python 3.11 ``x in some_bytes`` first tries x as an int,
        # raising and discarding a TypeError (about 1k instructions)
        if not self._buffer and chunk.find(b"\n") == len(chunk) - 2 and chunk.startswith(b"data: ") \
                and chunk.endswith(b"\n\n") and chunk.find(b"\r") < 0:
            return [chunk[6:-2]]  # a read of one usual frame, as an upstream writing while it generates sends
        buffer = self._joined(chunk) if self._buffer else chunk
        if buffer is None:
            return []
        if buffer.find(b"\r") >= 0:
            self._buffer = b""
            return [_one_line(event) for event in self.feed(buffer)]
        end = buffer.rfind(b"\n\n")
        if end < 0:
            _kept(len(buffer))
            self._buffer = buffer
            return []
        if buffer.startswith(b"data: "):  # a read of usual frames only, as a fast upstream sends: split in C
            payloads = buffer[6:end].split(b"\n\ndata: ")
            if b"".join(payloads).find(b"\n") < 0:  # no line break but the frames' ends: each frame one line
                self._buffer = buffer[end + 2:]
                return payloads
        payloads = []
        position = 0
        while True:
            run = _DATA_FRAMES.match(buffer, position)  # usual frames, sliced out in C: two scans of the run
            if run is not None:
                payloads += _DATA_FRAME.findall(buffer, position, run.end())
                position = run.end()
            end = buffer.find(b"\n\n", position)
            if end < 0:
                break
            event = _parse(buffer[position:end])  # any other block (a comment, fields, several lines)
            if event is not None:
                payloads.append(_one_line(event))
            position = end + 2
        self._buffer = buffer[position:]
        return payloads

    def feed_named(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """Each whole event's name and data (as ``feed_data`` gives it): the usual named frame,
        ``event: NAME``, ``data: ...`` and a blank line with LF endings, is sliced out as the bytes
        that came; any other block goes through ``feed``."""
        buffer = self._joined(chunk) if self._buffer else chunk
        if buffer is None:
            return []
        if buffer.find(b"\r") >= 0:
            self._buffer = b""
            return [(event.event, _one_line(event)) for event in self.feed(buffer)]
        end = buffer.rfind(b"\n\n")
        if end < 0:
            _kept(len(buffer))
            self._buffer = buffer
            return []
        self._buffer = buffer[end + 2:]
        named = []
        for block in buffer[:end].split(b"\n\n"):
            line = block.find(b"\n")
            if block.startswith(b"event: ") and block.startswith(b"data: ", line + 1) \
                    and block.find(b"\n", line + 1) < 0:
                named.append((block[7:line].decode("utf-8", "replace"), block[line + 7:]))  # as ``_parse`` reads it
                continue
            event = _parse(block)
            if event is not None:
                named.append((event.event, _one_line(event)))
        return named

    def flush_data(self) -> list[bytes]:
        return [_one_line(event) for event in self.flush()]

    def flush_named(self) -> list[tuple[str, bytes]]:
        return [(event.event, _one_line(event)) for event in self.flush()]

    def flush(self) -> list[Event]:
        """The last event, when the stream ended without a blank line after it. A stream may also
        end in a JSON body with no ``data:`` (Gemini's error mid-stream, several lines of it):
        that is read as the last event's data, so its reader can say what went wrong."""
        rest = b"".join([self._buffer, *self._more])
        self._buffer, self._more, self._more_size = b"", [], 0
        if not rest.strip():
            return []
        event = _parse(rest)
        if event is None and rest.lstrip().startswith(b"{"):
            event = Event(data=rest.decode("utf-8", "replace").strip())
        return [event] if event is not None else []


def _one_line(event: Event) -> bytes:
    return event.data.replace("\n", " ").encode()


def _parse(block: bytes) -> Event | None:
    data: list[str] = []
    name = ""
    for line in _LINE.split(block.decode("utf-8", "replace")):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    if not data:
        return None
    return Event(data="\n".join(data), event=name)


def encode(data: str | bytes, event: str | None = None) -> bytes:
    """One SSE frame: ``[event: NAME\\n]data: DATA\\n\\n``."""
    payload = data if isinstance(data, bytes) else data.encode("utf-8")
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"
