"""Verification of signed commands: command keys from the root, thresholds, and every rejection path."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

from agent.protocol.update import (
    COMMAND_KEYS_FIELD,
    DeployCommand,
    DeviceCommand,
    SignedEnvelope,
    canonical_bytes,
)
from agent.update.commands import (
    DEFAULT_MAX_CLOCK_SKEW_S,
    MAX_COMMAND_KEYS,
    CommandKeys,
    CommandRejected,
    verify_deploy,
    verify_device_command,
)

NOW = 1_700_000_000.0
DEVICE = "cam-01"
GROUPS = {"lobby", "beta"}


@pytest.fixture(scope="module")
def ed() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@pytest.fixture(scope="module")
def ec() -> CryptoSigner:
    return CryptoSigner.generate_ecdsa()


@pytest.fixture(scope="module")
def trio() -> list[CryptoSigner]:
    return [CryptoSigner.generate_ed25519() for _ in range(3)]


def field(signers: list[CryptoSigner], threshold: int = 1) -> dict[str, Any]:
    return {"keys": {s.public_key.keyid: s.public_key.to_dict() for s in signers}, "threshold": threshold}


def keys_of(signers: list[CryptoSigner], threshold: int = 1) -> CommandKeys:
    return CommandKeys.from_root_field(field(signers, threshold))


def sign(signed: dict[str, Any], *signers: CryptoSigner) -> SignedEnvelope:
    data = canonical_bytes(signed)
    sigs = []
    for s in signers:
        sig = s.sign(data)
        sigs.append({"keyid": sig.keyid, "sig": sig.signature})
    return SignedEnvelope.model_validate({"signed": signed, "signatures": sigs})


def deploy(**changes: Any) -> dict[str, Any]:
    signed: dict[str, Any] = {
        "type": "deploy",
        "id": "rollout-1",
        "seq": 10,
        "issued": NOW - 60,
        "expires": NOW + 3600,
        "device": DEVICE,
        "pipeline": "main",
        "target": "models/detector-2.0.0.bundle",
    }
    signed.update(changes)
    return {k: v for k, v in signed.items() if v is not None}


def command(**changes: Any) -> dict[str, Any]:
    signed: dict[str, Any] = {
        "type": "command",
        "id": "cmd-1",
        "seq": 5,
        "issued": NOW - 1,
        "expires": NOW + 60,
        "device": DEVICE,
        "name": "set",
        "args": {"threshold": "0.5"},
    }
    signed.update(changes)
    return signed


def vd(envelope: SignedEnvelope, keys: CommandKeys, **kw: Any) -> DeployCommand:
    args: dict[str, Any] = {"device_id": DEVICE, "groups": GROUPS, "last_seq": 9, "now": NOW}
    args.update(kw)
    return verify_deploy(envelope, keys, **args)


def vc(envelope: SignedEnvelope, keys: CommandKeys, **kw: Any) -> DeviceCommand:
    args: dict[str, Any] = {"device_id": DEVICE, "last_seq": 4, "now": NOW}
    args.update(kw)
    return verify_device_command(envelope, keys, **args)


def rejected(call, *args: Any, **kw: Any) -> str:
    with pytest.raises(CommandRejected) as info:
        call(*args, **kw)
    reason = info.value.reason
    assert reason == str(info.value) and "\n" not in reason and reason
    return reason


# ---- command keys from the root -------------------------------------------------------------------


def test_keys_from_root_field(ed: CryptoSigner, ec: CryptoSigner) -> None:
    value = field([ed, ec], threshold=2)
    before = copy.deepcopy(value)
    keys = CommandKeys.from_root_field(value)
    assert value == before  # from_dict pops from what it is given: the root's dict is left alone
    assert keys.threshold == 2
    assert set(keys.keys) == {ed.public_key.keyid, ec.public_key.keyid}
    assert keys.keys[ed.public_key.keyid] == ed.public_key
    with pytest.raises(TypeError):
        keys.keys["x"] = ed.public_key  # type: ignore[index]


def test_unknown_fields_next_to_keys_are_ignored(ed: CryptoSigner) -> None:
    value = field([ed]) | {"x-comment": "rotated 2025-01"}
    assert CommandKeys.from_root_field(value).threshold == 1


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda v: None, "is missing"),
        (lambda v: [v], "must be an object, got list"),
        (lambda v: "keys", "must be an object, got str"),
        (lambda v: {"threshold": 1}, "'keys' must be a non-empty object"),
        (lambda v: {**v, "keys": {}}, "'keys' must be a non-empty object"),
        (lambda v: {**v, "keys": ["a"]}, "'keys' must be a non-empty object"),
        (lambda v: {"keys": v["keys"]}, "'threshold' must be an integer, got None"),
        (lambda v: {**v, "threshold": "1"}, "'threshold' must be an integer, got '1'"),
        (lambda v: {**v, "threshold": 1.0}, "'threshold' must be an integer, got 1.0"),
        (lambda v: {**v, "threshold": True}, "'threshold' must be an integer, got True"),
        (lambda v: {**v, "threshold": 0}, "threshold 0 must be at least 1"),
        (lambda v: {**v, "threshold": -1}, "threshold -1 must be at least 1"),
        (lambda v: {**v, "threshold": 2}, "threshold 2 is more than the 1 keys listed"),
    ],
)
def test_malformed_root_field(ed: CryptoSigner, mutate, expected: str) -> None:
    reason = rejected(CommandKeys.from_root_field, mutate(field([ed])))
    assert COMMAND_KEYS_FIELD in reason and expected in reason


def test_too_many_keys(ed: CryptoSigner) -> None:
    key = ed.public_key.to_dict()
    value = {"keys": {f"k{i}": dict(key) for i in range(MAX_COMMAND_KEYS + 1)}, "threshold": 1}
    assert "over the limit" in rejected(CommandKeys.from_root_field, value)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ({"keytype": "ed25519", "scheme": "ed448", "keyval": {"public": "00"}}, "Unsupported public key ed25519/ed448"),
        ({"keytype": "dsa", "scheme": "dsa-sha1", "keyval": {"public": "00"}}, "Unsupported public key dsa/dsa-sha1"),
        ({"scheme": "ed25519", "keyval": {"public": "00"}}, "Unsupported public key None/ed25519"),
        ({"keytype": "ed25519", "scheme": "ed25519"}, "missing 'keyval'"),
        ({"keytype": "ed25519", "scheme": "ed25519", "keyval": "abc"}, "not a usable public key"),
        ({"keytype": "ed25519", "scheme": "ed25519", "keyval": {}}, "public key string required"),
        ({"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": 5}}, "public key string required"),
        ({"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": "zz"}}, "cannot be loaded"),
        ({"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": "00" * 31}}, "cannot be loaded"),
        ({"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256", "keyval": {"public": "not pem"}}, "cannot be loaded"),
        ({"keytype": "rsa", "scheme": "pgp+rsa-pkcsv1.5", "keyval": {"public": "x"}}, "unsupported type"),
        ("not a dict", "must be an object"),
    ],
)
def test_unusable_keys(key: Any, expected: str) -> None:
    reason = rejected(CommandKeys.from_root_field, {"keys": {"kid": key}, "threshold": 1})
    assert expected in reason and "kid" in reason


def test_ecdsa_key_on_wrong_curve_is_rejected(ec: CryptoSigner) -> None:
    p384 = CryptoSigner.generate_ecdsa(scheme="ecdsa-sha2-nistp384").public_key.to_dict()
    p384["scheme"] = "ecdsa-sha2-nistp256"
    assert "cannot be loaded" in rejected(CommandKeys.from_root_field, {"keys": {"k": p384}, "threshold": 1})


def test_empty_key_id(ed: CryptoSigner) -> None:
    value = {"keys": {"": ed.public_key.to_dict()}, "threshold": 1}
    assert "non-empty string" in rejected(CommandKeys.from_root_field, value)


# ---- valid commands -------------------------------------------------------------------------------


def test_valid_deploy_ed25519(ed: CryptoSigner) -> None:
    cmd = vd(sign(deploy(), ed), keys_of([ed]))
    assert isinstance(cmd, DeployCommand)
    assert (cmd.id, cmd.seq, cmd.device, cmd.target) == ("rollout-1", 10, DEVICE, "models/detector-2.0.0.bundle")


def test_valid_deploy_ecdsa(ec: CryptoSigner) -> None:
    assert vd(sign(deploy(), ec), keys_of([ec])).seq == 10


def test_valid_deploy_to_a_group(ed: CryptoSigner) -> None:
    cmd = vd(sign(deploy(device=None, group="beta"), ed), keys_of([ed]))
    assert cmd.group == "beta" and cmd.device is None
    assert vd(sign(deploy(device=None, group="beta"), ed), keys_of([ed]), groups=frozenset({"beta"})).seq == 10


def test_valid_device_command(ed: CryptoSigner, ec: CryptoSigner) -> None:
    cmd = vc(sign(command(), ec), keys_of([ed, ec]))
    assert isinstance(cmd, DeviceCommand) and cmd.name == "set" and cmd.args == {"threshold": "0.5"}


def test_two_of_three(trio: list[CryptoSigner]) -> None:
    keys = keys_of(trio, threshold=2)
    signed = deploy()
    for pair in ((0, 1), (0, 2), (1, 2)):
        assert vd(sign(signed, *(trio[i] for i in pair)), keys).seq == 10
    assert vd(sign(signed, *trio), keys).seq == 10
    for one in range(3):
        reason = rejected(vd, sign(signed, trio[one]), keys)
        assert reason == "deployment command has 1 valid signature from command keys, 2 required"


def test_mixed_key_types_threshold(ed: CryptoSigner, ec: CryptoSigner) -> None:
    keys = keys_of([ed, ec], threshold=2)
    assert vd(sign(deploy(), ec, ed), keys).seq == 10
    assert vc(sign(command(), ed, ec), keys).seq == 5


def test_boundaries_are_accepted(ed: CryptoSigner) -> None:
    keys = keys_of([ed])
    # exactly at expiry, exactly at the skew limit, seq exactly one newer
    env = sign(deploy(seq=10, issued=NOW + DEFAULT_MAX_CLOCK_SKEW_S, expires=NOW + DEFAULT_MAX_CLOCK_SKEW_S + 1), ed)
    assert vd(env, keys, last_seq=9).seq == 10
    assert vd(sign(deploy(expires=NOW), ed), keys).seq == 10
    assert vd(sign(deploy(seq=1), ed), keys, last_seq=0).seq == 1


# ---- signature rejections -------------------------------------------------------------------------


def test_no_valid_signature(ed: CryptoSigner, ec: CryptoSigner) -> None:
    reason = rejected(vd, sign(deploy(), ec), keys_of([ed]))  # signed by a key that is not a command key
    assert reason == "deployment command has 0 valid signatures from command keys, 1 required"


def test_tampered_signed_part(ed: CryptoSigner) -> None:
    env = sign(deploy(), ed)
    env.signed["target"] = "models/evil.bundle"
    assert "0 valid signatures" in rejected(vd, env, keys_of([ed]))


def test_signature_by_other_key_under_a_trusted_keyid(ed: CryptoSigner, ec: CryptoSigner) -> None:
    data = canonical_bytes(deploy())
    env = SignedEnvelope.model_validate(
        {"signed": deploy(), "signatures": [{"keyid": ed.public_key.keyid, "sig": ec.sign(data).signature}]}
    )
    assert "0 valid signatures" in rejected(vd, env, keys_of([ed]))


@pytest.mark.parametrize("sig", ["zz", "00", "ab" * 64, "0"])
def test_garbage_signatures(ed: CryptoSigner, sig: str) -> None:
    env = SignedEnvelope.model_validate(
        {"signed": deploy(), "signatures": [{"keyid": ed.public_key.keyid, "sig": sig}]}
    )
    assert "0 valid signatures" in rejected(vd, env, keys_of([ed]))


def test_duplicate_signatures_count_once(trio: list[CryptoSigner]) -> None:
    keys = keys_of(trio, threshold=2)
    env = sign(deploy(), trio[0], trio[0], trio[0])
    assert "1 valid signature from command keys, 2 required" in rejected(vd, env, keys)


def test_unknown_key_signatures_do_not_count(trio: list[CryptoSigner], ed: CryptoSigner) -> None:
    keys = keys_of(trio, threshold=2)
    env = sign(deploy(), trio[0], ed)  # ed is not a command key here
    assert "1 valid signature" in rejected(vd, env, keys)


def test_bad_then_good_signature_by_the_same_key(ed: CryptoSigner) -> None:
    good = sign(deploy(), ed).signatures[0]
    env = SignedEnvelope.model_validate(
        {"signed": deploy(), "signatures": [{"keyid": good.keyid, "sig": "00" * 64}, good.model_dump()]}
    )
    assert vd(env, keys_of([ed])).seq == 10


def test_signed_part_that_is_not_json(ed: CryptoSigner) -> None:
    env = SignedEnvelope.model_validate({"signed": {"x": float("nan")}, "signatures": [{"keyid": "a", "sig": "00"}]})
    assert "0 valid signatures" in rejected(vd, env, keys_of([ed]))


def test_device_command_signature_threshold(trio: list[CryptoSigner]) -> None:
    reason = rejected(vc, sign(command(), trio[1]), keys_of(trio, threshold=3))
    assert reason == "device command has 1 valid signature from command keys, 3 required"


# ---- content rejections (all correctly signed) ----------------------------------------------------


@pytest.mark.parametrize(
    ("signed", "expected"),
    [
        (deploy(seq=0), "deployment command: seq:"),
        (deploy(seq="x"), "deployment command: seq:"),
        (deploy(group="lobby"), "name exactly one of 'device' or 'group'"),
        (deploy(device=None), "name exactly one of 'device' or 'group'"),
        (deploy(expires=NOW - 120), "'expires' must be later than 'issued'"),
        (deploy(v=99), "protocol version 99 is not supported"),
        (deploy(type="command"), "deployment command: type:"),
        (deploy(target="../etc/passwd"), "deployment command: target:"),
        (deploy(extra=1), "deployment command: extra:"),
        (command(), "deployment command: type:"),
    ],
)
def test_malformed_deploy(ed: CryptoSigner, signed: dict[str, Any], expected: str) -> None:
    assert expected in rejected(vd, sign(signed, ed), keys_of([ed]))


@pytest.mark.parametrize(
    ("signed", "expected"),
    [
        (command(name="format-disk"), "device command: name:"),
        (command(device=None), "device command: device:"),
        (command(args={"k": 1}), "device command: args.k:"),
        (deploy(), "device command: type:"),
    ],
)
def test_malformed_device_command(ed: CryptoSigner, signed: dict[str, Any], expected: str) -> None:
    assert expected in rejected(vc, sign(signed, ed), keys_of([ed]))


def test_deploy_for_another_device(ed: CryptoSigner) -> None:
    reason = rejected(vd, sign(deploy(device="cam-02"), ed), keys_of([ed]))
    assert reason == "deployment command rollout-1 is addressed to device 'cam-02', not 'cam-01'"


def test_deploy_for_another_group(ed: CryptoSigner) -> None:
    reason = rejected(vd, sign(deploy(device=None, group="garage"), ed), keys_of([ed]))
    assert reason == "deployment command rollout-1 is addressed to group 'garage', which this device is not in"
    assert "group 'beta'" in rejected(vd, sign(deploy(device=None, group="beta"), ed), keys_of([ed]), groups=set())


def test_device_command_for_another_device(ed: CryptoSigner) -> None:
    reason = rejected(vc, sign(command(device="cam-02"), ed), keys_of([ed]))
    assert reason == "device command cmd-1 is addressed to device 'cam-02', not 'cam-01'"


@pytest.mark.parametrize("last_seq", [10, 11, 1000])
def test_replay(ed: CryptoSigner, last_seq: int) -> None:
    reason = rejected(vd, sign(deploy(seq=10), ed), keys_of([ed]), last_seq=last_seq)
    assert reason == f"sequence 10 is not newer than {last_seq} already accepted"


def test_replay_message_from_the_brief(ed: CryptoSigner) -> None:
    reason = rejected(vc, sign(command(seq=7), ed), keys_of([ed]), last_seq=9)
    assert reason == "sequence 7 is not newer than 9 already accepted"


def test_expired(ed: CryptoSigner) -> None:
    keys = keys_of([ed])
    reason = rejected(vd, sign(deploy(expires=NOW - 30), ed), keys)
    assert reason == "deployment command rollout-1 expired 30 s ago"
    assert "expired" in rejected(vd, sign(deploy(), ed), keys, now=NOW + 3600.5)
    assert "device command cmd-1 expired" in rejected(vc, sign(command(), ed), keys, now=NOW + 61)


def test_issued_in_the_future(ed: CryptoSigner) -> None:
    keys = keys_of([ed])
    env = sign(deploy(issued=NOW + 301, expires=NOW + 4000), ed)
    reason = rejected(vd, env, keys)
    assert reason == "deployment command rollout-1 was issued 301 s in the future (clock skew allowed: 300 s)"
    assert vd(env, keys, max_clock_skew_s=400).seq == 10
    assert "in the future" in rejected(vd, sign(deploy(issued=NOW + 1, expires=NOW + 60), ed), keys, max_clock_skew_s=0)
    assert "in the future" in rejected(vc, sign(command(issued=NOW + 301, expires=NOW + 900), ed), keys)


def test_signatures_are_checked_before_content(ed: CryptoSigner, ec: CryptoSigner) -> None:
    # an unsigned command that is also malformed, misaddressed, replayed and expired: the signature is the reason
    env = sign(deploy(device="cam-02", seq=1, expires=NOW - 100, issued=NOW - 200), ec)
    assert "0 valid signatures" in rejected(vd, env, keys_of([ed]), last_seq=50)
    env = sign({"garbage": True}, ec)
    assert "0 valid signatures" in rejected(vd, env, keys_of([ed]))


def test_check_order_address_before_replay_before_expiry(ed: CryptoSigner) -> None:
    keys = keys_of([ed])
    env = sign(deploy(device="cam-02", seq=1, expires=NOW - 10, issued=NOW - 200), ed)
    assert "addressed to device" in rejected(vd, env, keys)
    env = sign(deploy(seq=1, expires=NOW - 10, issued=NOW - 200), ed)
    assert "sequence 1" in rejected(vd, env, keys)


def test_rotated_root_drops_old_key(trio: list[CryptoSigner]) -> None:
    env = sign(deploy(), trio[0])
    assert vd(env, keys_of([trio[0]])).seq == 10
    assert "0 valid signatures" in rejected(vd, env, keys_of([trio[1], trio[2]]))
