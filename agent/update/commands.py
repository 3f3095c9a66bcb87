"""Pure verification of signed fleet commands (deployments and device commands): no I/O, no clocks.

The keys that may sign commands, and how many must, come from the trusted TUF root (``COMMAND_KEYS_FIELD``), so they
rotate with the root like every other key. A command is trusted only when, in this order:

1. at least ``threshold`` distinct command keys made a valid signature over ``canonical_bytes(signed)``
   (signatures by unknown keys do not count; several signatures by one key count once);
2. the signed part parses as the expected command;
3. it is addressed to this device (or to a group the device is in);
4. its ``seq`` is newer than the last command accepted (replay defence);
5. it has not expired and was not issued further in the future than the allowed clock skew.

Nothing inside ``signed`` is looked at before the signatures check out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Key, Signature, SSlibKey

from agent.protocol import ProtocolError
from agent.protocol.update import (
    COMMAND_KEYS_FIELD,
    DeployCommand,
    DeviceCommand,
    SignedEnvelope,
    canonical_bytes,
    parse_deploy_command,
    parse_device_command,
)

DEFAULT_MAX_CLOCK_SKEW_S = 300.0
#: Most command keys a root may list (a sanity bound, not a policy).
MAX_COMMAND_KEYS = 64


class CommandRejected(Exception):
    """A signed command the device must not act on; ``reason`` is one line suitable for an update state."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CommandKeys:
    """The command keys from the TUF root and how many of them must sign a command."""

    keys: Mapping[str, Key]
    threshold: int

    @classmethod
    def from_root_field(cls, value: Any) -> CommandKeys:
        """Parse the root's ``COMMAND_KEYS_FIELD`` value; CommandRejected naming the problem when it is unusable."""
        where = f"root field {COMMAND_KEYS_FIELD!r}"
        if value is None:
            raise CommandRejected(f"{where} is missing: this fleet has no command keys")
        if not isinstance(value, Mapping):
            raise CommandRejected(f"{where} must be an object, got {type(value).__name__}")
        raw_keys, threshold = value.get("keys"), value.get("threshold")
        if not isinstance(raw_keys, Mapping) or not raw_keys:
            raise CommandRejected(f"{where}: 'keys' must be a non-empty object of keyid -> key")
        if len(raw_keys) > MAX_COMMAND_KEYS:
            raise CommandRejected(f"{where}: {len(raw_keys)} keys is over the limit of {MAX_COMMAND_KEYS}")
        if not isinstance(threshold, int) or isinstance(threshold, bool):
            raise CommandRejected(f"{where}: 'threshold' must be an integer, got {threshold!r}")
        if threshold < 1:
            raise CommandRejected(f"{where}: threshold {threshold} must be at least 1")
        if threshold > len(raw_keys):
            raise CommandRejected(f"{where}: threshold {threshold} is more than the {len(raw_keys)} keys listed")
        keys = {keyid: _parse_key(where, keyid, raw) for keyid, raw in raw_keys.items()}
        return cls(keys=MappingProxyType(keys), threshold=threshold)

    def valid_signers(self, envelope: SignedEnvelope) -> set[str]:
        """Distinct keyids of command keys with a valid signature over the envelope's signed part."""
        try:
            data = canonical_bytes(envelope.signed)
        except (TypeError, ValueError):
            return set()  # not JSON (NaN, odd types): nothing can have signed it
        valid: set[str] = set()
        for sig in envelope.signatures:
            key = self.keys.get(sig.keyid)
            if key is None or sig.keyid in valid:
                continue
            try:
                key.verify_signature(Signature(sig.keyid, sig.sig), data)
            except UnverifiedSignatureError:  # includes VerificationError (malformed hex, wrong key type)
                continue
            valid.add(sig.keyid)
        return valid


def _parse_key(where: str, keyid: Any, raw: Any) -> Key:
    if not isinstance(keyid, str) or not keyid:
        raise CommandRejected(f"{where}: key id {keyid!r} must be a non-empty string")
    if not isinstance(raw, Mapping):
        raise CommandRejected(f"{where}: key {keyid} must be an object")
    try:
        key = Key.from_dict(keyid, dict(raw))  # from_dict pops from the dict it is given: hand it a copy
    except (KeyError, TypeError, ValueError) as exc:
        raise CommandRejected(f"{where}: key {keyid} is not a usable public key ({_describe(exc)})") from None
    if not isinstance(key, SSlibKey):
        raise CommandRejected(f"{where}: key {keyid} has unsupported type {key.keytype}/{key.scheme}")
    try:  # a probe: a well-formed key rejects a bogus signature, a malformed one cannot even try
        key.verify_signature(Signature(keyid, "00" * 64), b"probe")
    except VerificationError:
        raise CommandRejected(f"{where}: key {keyid} ({key.keytype}/{key.scheme}) cannot be loaded") from None
    except UnverifiedSignatureError:
        pass
    return key


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing {exc.args[0]!r}" if exc.args else "missing field"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _check_signatures(envelope: SignedEnvelope, keys: CommandKeys, what: str) -> None:
    valid = len(keys.valid_signers(envelope))
    if valid < keys.threshold:
        plural = "" if valid == 1 else "s"
        raise CommandRejected(
            f"{what} has {valid} valid signature{plural} from command keys, {keys.threshold} required"
        )


def _check_common(
    command: DeployCommand | DeviceCommand, what: str, last_seq: int, now: float, max_clock_skew_s: float
) -> None:
    if command.seq <= last_seq:
        raise CommandRejected(f"sequence {command.seq} is not newer than {last_seq} already accepted")
    if now > command.expires:
        raise CommandRejected(f"{what} {command.id} expired {now - command.expires:.0f} s ago")
    if command.issued > now + max_clock_skew_s:
        raise CommandRejected(
            f"{what} {command.id} was issued {command.issued - now:.0f} s in the future "
            f"(clock skew allowed: {max_clock_skew_s:.0f} s)"
        )


def verify_deploy(
    envelope: SignedEnvelope,
    keys: CommandKeys,
    *,
    device_id: str,
    groups: set[str] | frozenset[str],
    last_seq: int,
    now: float,
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
) -> DeployCommand:
    """The deployment command in ``envelope`` once it is trusted for this device; CommandRejected(reason) otherwise."""
    what = "deployment command"
    _check_signatures(envelope, keys, what)
    try:
        command = parse_deploy_command(envelope.signed)
    except ProtocolError as exc:
        raise CommandRejected(str(exc)) from None
    if command.device is not None and command.device != device_id:
        raise CommandRejected(f"{what} {command.id} is addressed to device {command.device!r}, not {device_id!r}")
    if command.group is not None and command.group not in groups:
        raise CommandRejected(
            f"{what} {command.id} is addressed to group {command.group!r}, which this device is not in"
        )
    _check_common(command, what, last_seq, now, max_clock_skew_s)
    return command


def verify_device_command(
    envelope: SignedEnvelope,
    keys: CommandKeys,
    *,
    device_id: str,
    last_seq: int,
    now: float,
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
) -> DeviceCommand:
    """The device command in ``envelope`` once it is trusted for this device; CommandRejected(reason) otherwise.
    Device commands always name one device (no groups)."""
    what = "device command"
    _check_signatures(envelope, keys, what)
    try:
        command = parse_device_command(envelope.signed)
    except ProtocolError as exc:
        raise CommandRejected(str(exc)) from None
    if command.device != device_id:
        raise CommandRejected(f"{what} {command.id} is addressed to device {command.device!r}, not {device_id!r}")
    _check_common(command, what, last_seq, now, max_clock_skew_s)
    return command
