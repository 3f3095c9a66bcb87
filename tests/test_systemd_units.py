"""systemd/edge-agent.service (systemd-analyze verify / security) and systemd/install.sh (--dry-run plan; the real
install into a --prefix with its default extras runs in tests/test_install_matrix.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge-agent.service"
INSTALL = ROOT / "systemd" / "install.sh"
EXEC_START = "/opt/edge-agent/venv/bin/edge-agent"
MAX_EXPOSURE = 2.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def analyze() -> str:
    """systemd-analyze; missing it fails the run in CI and skips it elsewhere."""
    found = shutil.which("systemd-analyze") or next(
        (p for p in ("/usr/bin/systemd-analyze", "/bin/systemd-analyze") if os.access(p, os.X_OK)), None
    )
    if found is None:
        message = "systemd-analyze not found (fix: apt-get install systemd)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, env=env)


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _exposure(output: str) -> float:
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert m, f"no overall exposure in systemd-analyze output:\n{output}"
    return float(m.group(1))


def _verifiable_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart pointing at an executable that exists here, so verify checks everything else."""
    candidate = Path(sys.executable).with_name("edge-agent")
    exe = str(candidate) if candidate.exists() else shutil.which("true") or "/bin/true"
    text = UNIT.read_text()
    assert text.count(f"ExecStart={EXEC_START} ") == 1
    text = text.replace(f"ExecStart={EXEC_START} ", f"ExecStart={exe} ")
    if extra:
        text = text.replace("\n[Install]", f"\n{extra}\n[Install]")
    path = tmp_path / "edge-agent.service"
    path.write_text(text)
    return path


# ---- the unit ------------------------------------------------------------------------------------------------


def test_unit_has_the_required_settings() -> None:
    s = _unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"{EXEC_START} run --config /etc/edge-agent/agent.toml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (one["WatchdogSec"], one["Restart"], one["RestartSec"], one["TimeoutStopSec"]) == (
        "30",
        "on-failure",
        "5",
        "30",
    )
    assert (one["User"], one["Group"], one["KillSignal"]) == ("edge-agent", "edge-agent", "SIGTERM")
    assert (one["StateDirectory"], one["ConfigurationDirectory"]) == ("edge-agent", "edge-agent")
    assert "PYTHONUNBUFFERED=1" in s["Environment"]
    assert set(one["SupplementaryGroups"].split()) == {"video", "dialout"}
    assert one["DevicePolicy"] == "closed"
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"char-video4linux", "char-ttyUSB", "char-ttyACM", "char-ttyS", "char-ttyAMA"} <= allowed
    assert "AF_UNIX" in one["RestrictAddressFamilies"].split()  # sd_notify
    assert one["CapabilityBoundingSet"] == "" and one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict" and one["UMask"] == "0027"
    # Deliberately off (see the comments in the unit): JIT memory, the broker's address, device nodes.
    assert "MemoryDenyWriteExecute" not in s and "IPAddressDeny" not in s and "PrivateDevices" not in s


def test_verify_reports_nothing(analyze: str, tmp_path: Path) -> None:
    # systemd-analyze verify exits 0 even on unknown keys or bad values; it only prints them: require silence.
    result = _run(analyze, "verify", _verifiable_copy(tmp_path))
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr


def test_verify_of_the_shipped_unit_only_misses_the_installed_binary(analyze: str) -> None:
    result = _run(analyze, "verify", UNIT)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if Path(EXEC_START).exists():
        assert lines == []
    else:
        assert lines and all(EXEC_START in line for line in lines), lines


def test_verify_would_catch_a_typo(analyze: str, tmp_path: Path) -> None:
    result = _run(analyze, "verify", _verifiable_copy(tmp_path, extra="ProtectSytem=strict"))
    assert "Unknown key" in result.stdout + result.stderr and "ProtectSytem" in result.stdout + result.stderr


def test_security_exposure_is_low(analyze: str) -> None:
    result = _run(analyze, "security", "--offline=true", UNIT)
    assert _exposure(result.stdout + result.stderr) <= MAX_EXPOSURE, result.stdout


def test_security_exposure_with_the_jetson_dropin(analyze: str, tmp_path: Path) -> None:
    dropin = _run("bash", INSTALL, "--show-dropin", "--board", "jetson")
    assert dropin.returncode == 0 and "DevicePolicy=auto" in dropin.stdout and "PrivateTmp=no" in dropin.stdout
    units = tmp_path / "etc/systemd/system"
    (units / "edge-agent.service.d").mkdir(parents=True)
    shutil.copy(UNIT, units / "edge-agent.service")
    (units / "edge-agent.service.d/10-board.conf").write_text(dropin.stdout)
    result = _run(analyze, "security", "--offline=true", f"--root={tmp_path}", "edge-agent.service")
    output = result.stdout + result.stderr
    assert (
        "PrivateTmp=" in output and "Service has access to other software's temporary files" in output
    )  # drop-in read
    assert _exposure(output) <= MAX_EXPOSURE, output


# ---- install.sh ----------------------------------------------------------------------------------------------


def test_install_script_syntax() -> None:
    assert _run("bash", "-n", INSTALL).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        result = _run(shellcheck, INSTALL)
        assert result.returncode == 0, result.stdout


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    """A staging root with the account files useradd --root needs."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nvideo:x:44:\ndialout:x:20:\n")
    return tmp_path


def _plan(prefix: Path, *args: str) -> str:
    env = {**os.environ, "PYTHON": sys.executable}
    result = _run("bash", INSTALL, "--dry-run", "--prefix", prefix, *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_dry_run_plan_on_a_pi(prefix: Path) -> None:
    before = _tree(prefix)
    plan = _plan(prefix, "--board", "pi")
    assert _tree(prefix) == before, "--dry-run changed files"
    assert "[dry-run] useradd --root" in plan and "--groups video,dialout edge-agent" in plan  # user
    assert f"-m venv {prefix}/opt/edge-agent/venv" in plan  # venv
    assert f"pip install --upgrade {ROOT}[litert,onnx,serial,mqtt,update]" in plan  # what a provisioned agent needs
    copy = next(line for line in plan.splitlines() if line.startswith("[dry-run] cp -f"))  # profiles
    assert "firmware-profiles/rpi4.toml" in copy and copy.endswith(f" {prefix}/opt/edge-agent/firmware-profiles/")
    assert f"[dry-run] write {prefix}/etc/edge-agent/agent.toml (mode 0640, group edge-agent)" in plan  # config
    assert "| device_id = " in plan
    assert f"edge-agent.service {prefix}/etc/systemd/system/edge-agent.service" in plan  # unit
    assert f"systemctl --root={prefix} enable edge-agent" in plan
    assert "10-board.conf" not in plan


def test_dry_run_plan_on_a_jetson_keeps_an_existing_config(prefix: Path) -> None:
    (prefix / "etc/edge-agent").mkdir()
    (prefix / "etc/edge-agent/agent.toml").write_text('device_id = "kept"\n')
    plan = _plan(prefix, "--board", "jetson")
    assert f"pip install --upgrade {ROOT}[onnx,serial,mqtt,update]" in plan
    assert "exists: kept as it is" in plan and "write " + str(prefix / "etc/edge-agent/agent.toml") not in plan
    assert "edge-agent.service.d/10-board.conf" in plan and "| DevicePolicy=auto" in plan
    assert (prefix / "etc/edge-agent/agent.toml").read_text() == 'device_id = "kept"\n'


def test_default_extras_are_the_device_extra(prefix: Path) -> None:
    """install.sh's default on a Pi/PC installs what `pip install '.[device]'` does (tests/test_install_matrix.py
    installs it for real and runs a provisioned agent.toml from it)."""
    device = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["device"]
    (self_reference,) = device
    extras = self_reference[self_reference.index("[") + 1 : -1].split(",")
    line = next(ln for ln in _plan(prefix, "--board", "generic").splitlines() if "pip install" in ln)
    assert sorted(line[line.rindex("[") + 1 : -1].split(",")) == sorted(extras)


def test_extras_option_overrides_the_default(prefix: Path) -> None:
    plan = _plan(prefix, "--board", "pi", "--extras", "onnx,mqtt")
    assert f"pip install --upgrade {ROOT}[onnx,mqtt]" in plan and "update]" not in plan
    plan = _plan(prefix, "--board", "jetson", "--extras=litert")
    assert f"pip install --upgrade {ROOT}[litert]" in plan


def test_dry_run_uninstall(prefix: Path) -> None:
    plan = _plan(prefix, "--uninstall")
    assert f"systemctl --root={prefix} disable edge-agent" in plan
    assert f"rm -f {prefix}/etc/systemd/system/edge-agent.service" in plan and f"rm -rf {prefix}/opt/edge-agent" in plan
    assert "kept" in plan and "userdel" not in plan


def test_bad_options_are_refused(prefix: Path) -> None:
    for args in (["--bogus"], ["--board", "beaglebone"], ["--purge"]):
        result = _run("bash", INSTALL, "--dry-run", "--prefix", prefix, *args)
        assert result.returncode == 2 and "install.sh:" in result.stderr, args


# ---- the fleet server's unit ------------------------------------------------------------------------------------

FLEET_UNIT = ROOT / "systemd" / "fleet-server.service"
FLEET_EXEC = "/opt/fleet/venv/bin/fleet"


def test_fleet_unit_verifies_and_is_sandboxed(analyze: str, tmp_path: Path) -> None:
    candidate = Path(sys.executable).with_name("fleet")
    exe = str(candidate) if candidate.exists() else shutil.which("true") or "/bin/true"
    text = FLEET_UNIT.read_text()
    assert text.count(f"ExecStart={FLEET_EXEC} serve --config /etc/fleet/fleet.toml") == 1
    copy = tmp_path / "fleet-server.service"
    copy.write_text(text.replace(f"ExecStart={FLEET_EXEC} ", f"ExecStart={exe} "))
    result = _run(analyze, "verify", copy)
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr
    security = _run(analyze, "security", "--offline=true", FLEET_UNIT)
    assert _exposure(security.stdout + security.stderr) <= MAX_EXPOSURE, security.stdout
