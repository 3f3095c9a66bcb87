"""The pure rate limiter (agent/ratelog.py) and the inbound deployment inbox (agent/update/inbox.py), with an
injected clock: exhaustive over the policy's cases."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.protocol.update import SignedEnvelope
from agent.ratelog import RateLimiter, RateLog
from agent.update.inbox import MAX_DEPLOY_BYTES, REASONS, Candidate, DeployInbox, Refusal, precheck

# ---- RateLimiter ----------------------------------------------------------------------------------------------


def test_first_burst_per_key_is_admitted_then_counted() -> None:
    limiter = RateLimiter(burst=3, period_s=60)
    assert [limiter.admit("a", 0.0 + i) for i in range(5)] == [True, True, True, False, False]
    assert limiter.admit("b", 5.0)  # keys are independent
    assert limiter.summaries(59.0) == {}  # the period has not ended
    assert limiter.summaries(60.0) == {"a": 2}  # "b" suppressed nothing: no summary for it
    assert limiter.summaries(61.0) == {}  # each period reported once


def test_a_new_period_admits_again_and_keeps_the_old_count_for_the_summary() -> None:
    limiter = RateLimiter(burst=1, period_s=10)
    assert limiter.admit("k", 0.0) and not limiter.admit("k", 1.0) and not limiter.admit("k", 9.99)
    assert limiter.admit("k", 10.0)  # period over: admitted, the 2 held back are pending
    assert not limiter.admit("k", 11.0)
    assert limiter.summaries(12.0) == {"k": 2}
    assert limiter.summaries(20.0) == {"k": 1}


def test_a_flood_costs_burst_lines_plus_one_summary_per_period() -> None:
    limiter = RateLimiter(burst=5, period_s=60)
    lines = 0
    for i in range(100_000):  # 100,000 refusals over 10 minutes
        now = i * 0.006
        lines += limiter.admit("bad", now)
        lines += len(limiter.summaries(now))
    lines += len(limiter.summaries(10_000.0))
    assert lines == 10 * 5 + 10 and lines / 100_000 < 0.01


def test_the_keys_tracked_are_bounded() -> None:
    limiter = RateLimiter(burst=1, period_s=60, max_keys=4)
    admitted = [limiter.admit(f"k{i}", 0.0) for i in range(100)]
    assert sum(admitted) == 4 + 1  # 4 keys, then everything else shares "other"
    assert len(limiter._windows) <= 5


class _Logger:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))


def test_ratelog_writes_the_summary_line_with_counts() -> None:
    logger = _Logger()
    rl = RateLog(logger, "held back", burst=2, period_s=60)
    for i in range(10):
        rl.warning("x", "refused", float(i), n=i)
    assert [e for e, _ in logger.lines] == ["refused", "refused"]
    rl.flush(30.0)
    assert len(logger.lines) == 2
    rl.warning("x", "refused", 61.0, n=99)  # the next call after the period writes the summary, then the line
    assert logger.lines[2] == ("held back", {"suppressed": {"x": 8}, "total": 8})
    assert logger.lines[3] == ("refused", {"n": 99})


# ---- precheck -------------------------------------------------------------------------------------------------

SIG = [{"keyid": "ab" * 32, "sig": "00"}]


def _deploy(**signed: Any) -> bytes:
    base = {"v": 1, "type": "deploy", "id": "c1", "seq": 5, "issued": 1.0, "expires": 2e9}
    base |= {"device": "dev1", "pipeline": "digits", "target": "t/x"}
    base |= signed
    return json.dumps({"signed": {k: v for k, v in base.items() if v is not None}, "signatures": SIG}).encode()


def _check(payload: bytes, last_seq: int = 0, last_id: str | None = None) -> Candidate | Refusal | None:
    return precheck(payload, "dev1", frozenset({"north"}), frozenset({"digits", "audio"}), last_seq, last_id)


@pytest.mark.parametrize(
    ("payload", "reason", "words"),
    [
        (b"x" * (MAX_DEPLOY_BYTES + 1), "oversize", "over the limit"),
        (b"\xff\xfe", "malformed", "deployment command"),
        (b"[]", "malformed", "deployment command"),
        (b'{"signed": {}, "signatures": []}', "malformed", "deployment command"),
        (_deploy(seq="7"), "malformed", "'seq'"),
        (_deploy(seq=True), "malformed", "'seq'"),
        (_deploy(seq=0), "malformed", "'seq'"),
        (_deploy(pipeline=3), "malformed", "'pipeline'"),
        (_deploy(device="dev2"), "not_addressed", "addressed to device 'dev2'"),
        (_deploy(device=None, group="south"), "not_addressed", "addressed to group 'south'"),
        (_deploy(pipeline="nope"), "unknown_pipeline", "no pipeline named 'nope'"),
    ],
)
def test_cheap_checks_refuse_with_a_reason(payload: bytes, reason: str, words: str) -> None:
    verdict = _check(payload)
    assert isinstance(verdict, Refusal) and verdict.reason == reason and words in verdict.detail, verdict


def test_sequence_must_be_newer_than_the_last_accepted() -> None:
    stale = _check(_deploy(seq=5), last_seq=5, last_id="other")
    assert isinstance(stale, Refusal) and stale.reason == "stale_seq" and "not newer than 5" in stale.detail
    assert isinstance(_check(_deploy(seq=4), last_seq=5), Refusal)
    assert _check(_deploy(seq=5, id="c1"), last_seq=5, last_id="c1") is None  # the retained one, again: ignored
    ok = _check(_deploy(seq=6, device=None, group="north"), last_seq=5)
    assert isinstance(ok, Candidate) and (ok.pipeline, ok.seq, ok.signed_ok) == ("digits", 6, False)
    assert isinstance(_check(_deploy(seq=2**70)), Candidate)  # any size: only the signature can vouch for it


# ---- DeployInbox ----------------------------------------------------------------------------------------------

ENV = SignedEnvelope.model_validate({"signed": {}, "signatures": SIG})


def _cand(pipeline: str, seq: int, ok: bool = False) -> Candidate:
    return Candidate(pipeline, seq, ENV, ok)


def test_one_pending_per_pipeline_newest_seq_wins() -> None:
    inbox = DeployInbox(max_pending=4)
    assert inbox.offer(_cand("digits", 5)) is None
    assert inbox.offer(_cand("digits", 9)) == "coalesced"  # replaces 5
    assert inbox.offer(_cand("digits", 7)) == "coalesced"  # older than the one waiting: dropped
    assert inbox.offer(_cand("digits", 9)) == "coalesced"  # a tie: the later one is kept
    assert len(inbox) == 1 and inbox.take() == _cand("digits", 9) and inbox.take() is None
    assert inbox.counters["coalesced"] == 3 and inbox.counters["taken"] == 1


def test_a_validly_signed_candidate_is_never_pushed_out_by_an_unsigned_one() -> None:
    inbox = DeployInbox()
    inbox.offer(_cand("digits", 3, ok=True))
    for seq in (4, 2**70, 10**30):
        assert inbox.offer(_cand("digits", seq, ok=False)) == "coalesced"
    assert inbox.take() == _cand("digits", 3, ok=True)
    inbox.offer(_cand("digits", 2**70, ok=False))
    inbox.offer(_cand("digits", 3, ok=True))  # a signed one displaces an unsigned one, whatever its seq
    assert inbox.take() == _cand("digits", 3, ok=True)
    inbox.offer(_cand("digits", 3, ok=True))
    inbox.offer(_cand("digits", 4, ok=True))  # of two signed ones, the newer
    assert inbox.take() == _cand("digits", 4, ok=True)


def test_overall_bound_and_fifo_between_pipelines() -> None:
    inbox = DeployInbox(max_pending=2)
    assert inbox.offer(_cand("a", 1)) is None and inbox.offer(_cand("b", 1)) is None
    assert inbox.offer(_cand("c", 1)) == "full" and inbox.counters["full"] == 1
    assert inbox.offer(_cand("a", 2)) == "coalesced"  # a pending pipeline is still updated when full
    assert [inbox.take().pipeline, inbox.take().pipeline] == ["a", "b"]  # type: ignore[union-attr]
    assert inbox.counters["queued"] == 3


def test_the_inbox_stays_bounded_under_any_sequence_of_offers() -> None:
    inbox = DeployInbox(max_pending=3)
    for i in range(10_000):
        inbox.offer(_cand(f"p{i % 7}", (i * 7919) % 1000, ok=i % 13 == 0))
        assert len(inbox) <= 3
        if i % 5 == 0:
            inbox.take()
    c = inbox.counters
    assert c["taken"] + len(inbox) <= c["queued"] and c["full"] > 0 and c["coalesced"] > 0


def test_counters_name_every_reason() -> None:
    inbox = DeployInbox()
    assert all(inbox.counters[reason] == 0 for reason in REASONS)  # every counter reported, zeros included
    for reason in REASONS:
        inbox.count(reason)
        assert inbox.counters[reason] == 1
