"""The inbound deployment queue, pure: cheap checks first, then at most one pending deployment per pipeline.

Deployment messages arrive on ``<prefix>update/deploy`` faster than they can be verified (a signature check, a TUF
refresh over MQTT). ``precheck`` refuses what is refusable without any cryptography — size, JSON shape, addressee,
pipeline, sequence — and ``DeployInbox`` keeps, per pipeline, only the newest candidate (by its claimed ``seq``; a
candidate is still fully verified when it is taken). So memory is bounded by ``pipelines x max_bytes`` whatever the
rate, and the counters say what was dropped and why.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from agent.protocol import ProtocolError
from agent.protocol.update import SignedEnvelope, parse_envelope

#: Largest deployment message looked at (a genuine one is well under 4 KiB).
MAX_DEPLOY_BYTES = 64 * 1024

#: Drop counters, by reason (the keys of ``DeployInbox.counters`` besides ``received`` / ``queued`` / ``taken``).
REASONS = (
    "oversize",
    "malformed",
    "not_addressed",
    "unknown_pipeline",
    "stale_seq",
    "bad_signature",
    "refused",
    "duplicate",
    "coalesced",
    "full",
)


def _zero_counters() -> dict[str, int]:
    return {"received": 0, "queued": 0, "taken": 0} | dict.fromkeys(REASONS, 0)


@dataclass(frozen=True)
class Candidate:
    """A deployment that passed the cheap checks (its signature is not checked yet)."""

    pipeline: str
    seq: int
    envelope: SignedEnvelope
    signed_ok: bool = False  # signatures valid under the command keys known when it arrived (still re-verified)


@dataclass(frozen=True)
class Refusal:
    """A deployment refused by the cheap checks: ``reason`` is a counter key, ``detail`` one line for the report."""

    reason: str
    detail: str
    signed: dict[str, Any]


def precheck(
    payload: bytes,
    device_id: str,
    groups: set[str] | frozenset[str],
    pipelines: set[str] | frozenset[str],
    last_seq: int,
    last_id: str | None,
    max_bytes: int = MAX_DEPLOY_BYTES,
) -> Candidate | Refusal | None:
    """The cheap checks, in order: size, JSON envelope, pipeline, addressee, sequence. ``None`` for the retained
    command already handled (delivered again on reconnect: ignored without a word)."""
    if len(payload) > max_bytes:
        return Refusal("oversize", f"deployment command: {len(payload)} bytes is over the limit of {max_bytes}", {})
    try:
        envelope = parse_envelope(payload, "deployment command", max_bytes)
    except ProtocolError as exc:
        return Refusal("malformed", str(exc), {})
    signed = envelope.signed
    seq, cid = signed.get("seq"), signed.get("id")
    if seq == last_seq and last_seq and cid == last_id:
        return None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return Refusal("malformed", "deployment command: 'seq' must be a positive integer", signed)
    pipeline = signed.get("pipeline")
    if not isinstance(pipeline, str):
        return Refusal("malformed", "deployment command: 'pipeline' must be a string", signed)
    what = f"deployment command {str(cid)[:128]}"
    device, group = signed.get("device"), signed.get("group")
    if device is not None and device != device_id:
        return Refusal(
            "not_addressed", f"{what} is addressed to device {str(device)[:64]!r}, not {device_id!r}", signed
        )
    if group is not None and group not in groups:
        detail = f"{what} is addressed to group {str(group)[:128]!r}, which this device is not in"
        return Refusal("not_addressed", detail, signed)
    if pipeline not in pipelines:
        return Refusal("unknown_pipeline", f"no pipeline named {pipeline[:64]!r} on this device", signed)
    if seq <= last_seq:
        return Refusal("stale_seq", f"sequence {seq} is not newer than {last_seq} already accepted", signed)
    return Candidate(pipeline, seq, envelope)


@dataclass
class DeployInbox:
    """At most one pending candidate per pipeline, at most ``max_pending`` pipelines pending, taken oldest pipeline
    first. Of two candidates for one pipeline the one kept is the one validly signed (under the keys known on
    arrival), then the one with the higher ``seq``, then the later: forged messages with a huge ``seq`` cannot push
    out a genuine deployment. Not thread-safe: the caller holds a lock."""

    max_pending: int = 8
    _pending: OrderedDict[str, Candidate] = field(default_factory=OrderedDict)
    counters: dict[str, int] = field(default_factory=lambda: _zero_counters())

    def count(self, reason: str) -> None:
        """Count a message refused before it reached the inbox (a ``Refusal.reason``, or ``duplicate``)."""
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def offer(self, candidate: Candidate) -> str | None:
        """Queue ``candidate``; the counter key of what was dropped (it, or the one it replaced), or None."""
        held = self._pending.get(candidate.pipeline)
        if held is not None:
            self.count("coalesced")
            if (candidate.signed_ok, candidate.seq) < (held.signed_ok, held.seq):
                return "coalesced"  # an older candidate than the one waiting: it can only be refused later
            self._pending[candidate.pipeline] = candidate  # keeps the pipeline's place in line
            self.counters["queued"] += 1
            return "coalesced"
        if len(self._pending) >= self.max_pending:
            self.count("full")
            return "full"
        self._pending[candidate.pipeline] = candidate
        self.counters["queued"] += 1
        return None

    def take(self) -> Candidate | None:
        """The next candidate to verify, or None when nothing waits."""
        if not self._pending:
            return None
        _, candidate = self._pending.popitem(last=False)
        self.counters["taken"] += 1
        return candidate

    def __len__(self) -> int:
        return len(self._pending)
