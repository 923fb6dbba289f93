"""The frame reader alone (pure): bounded messages, resynchronisation, stalls."""

from __future__ import annotations

import json

from lsp_server.transport import FrameReader, Message, Problem, readable_id
from tests.raw_lsp import encode, frame

PING = {"jsonrpc": "2.0", "id": 1, "method": "diffusion/stats"}
PONG = {"jsonrpc": "2.0", "id": 2, "method": "diffusion/stats"}


def values(events) -> list:
    return [e.value for e in events if isinstance(e, Message)]


def problems(events) -> list[Problem]:
    return [e for e in events if isinstance(e, Problem)]


def test_messages_split_across_chunks_at_every_byte():
    data = encode(PING) + encode(PONG)
    for cut in range(len(data)):
        reader = FrameReader()
        events = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert values(events) == [PING, PONG] and not problems(events), cut


def test_an_absurd_content_length_is_refused_without_allocating_and_reading_resumes():
    for claimed in (10**12, 10**9, 10**30):
        reader = FrameReader(max_bytes=64 << 20)
        events = reader.feed(b"Content-Length: %d\r\n\r\n" % claimed + b"x" * 1000 + encode(PING))
        assert values(events) == [PING]
        [refused] = problems(events)
        assert refused.reply and refused.msg_id is None and "limit" in refused.reason
        assert len(reader.buffer) < 100  # the skipped bytes are not kept


def test_garbage_between_frames_is_skipped_to_the_next_header():
    reader = FrameReader()
    events = reader.feed(b"hello there\r\n{not a frame}" + encode(PING) + b"\r\n\r\n"
                         + encode(PONG))
    assert values(events) == [PING, PONG]
    assert all(not p.reply for p in problems(events))  # logged once, nothing to answer


def test_a_content_length_too_long_gives_back_the_next_message():
    body = json.dumps(PING).encode()
    reader = FrameReader()
    events = reader.feed(b"Content-Length: %d\r\n\r\n" % (len(body) + 5) + body + encode(PONG))
    assert values(events) == [PING, PONG]


def test_a_content_length_too_short_is_a_parse_error_then_resync():
    body = json.dumps(PING).encode()
    reader = FrameReader()
    events = reader.feed(b"Content-Length: %d\r\n\r\n" % (len(body) - 5) + body + encode(PONG))
    assert values(events) == [PONG]
    assert [p.code for p in problems(events) if p.reply] == [-32700]


def test_a_stalled_body_is_taken_as_it_is():
    body = json.dumps(PING).encode()
    reader = FrameReader()
    assert reader.feed(b"Content-Length: %d\r\n\r\n" % (len(body) + 50) + body) == []
    assert reader.mid_body
    assert values(reader.expire()) == [PING]
    reader.feed(b"Content-Length: 100\r\n\r\n{\"jsonrpc\"")
    [stalled] = reader.expire()
    assert isinstance(stalled, Problem) and "incomplete" in stalled.reason


def test_bad_headers_and_bodies():
    reader = FrameReader()
    events = reader.feed(b"Content-Type: x\r\n\r\n{}" + b"Content-Length: -5\r\n\r\n"
                         + frame(b"\xff\xfe") + frame(b'{"id": 7, "x": "\xff"}') + encode(PING))
    assert values(events) == [PING]
    answered = [p for p in problems(events) if p.reply]
    assert [p.code for p in answered] == [-32600, -32600, -32700, -32700]
    assert answered[-1].msg_id == 7  # read through the broken UTF-8


def test_readable_ids():
    assert readable_id({"id": 3}) == 3 and readable_id({"id": "a"}) == "a"
    assert readable_id({"id": {"a": 1}}) is None and readable_id({"id": True}) is None
    assert readable_id([1]) is None
