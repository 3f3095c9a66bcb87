"""Every documented install works: each combination of extras, installed into its own fresh venv exactly as the
docs say (README "Install on a device", systemd/install.sh's defaults), runs `edge-agent check` and
`edge-agent run --duration 3` with a config that uses what it installed, against a real Mosquitto.

One wheel of the working tree is built per session and installed with each extra: that is what
`pip install '.[EXTRAS]'` from a clone does (pip builds the same wheel, then installs it), only built once.
A configured feature whose extra is missing must fail `check` and `run` with one line naming the extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from agent.extras import DISTRIBUTION
from tests.conftest import INPUTS, ROOT, SAMPLES, assert_one_line_error
from tests.daemon_helpers import stop, wait_until
from tests.mosquitto import Broker, Subscriber, find_mosquitto
from tests.test_fleet_console import Fleet, ProvisionedBroker, assert_fleet_error

INSTALL_SH = ROOT / "systemd" / "install.sh"
PIP_TIMEOUT = 600  # seconds for one venv's install (pip's cache makes it a fraction of that)
RUN_TIMEOUT = 120
DEVICE = "dev1"


# ---- building venvs ---------------------------------------------------------------------------------------------


def _sh(*args: str | Path, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env or _clean_env()
    )
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing pointing into this checkout or the test's own venv."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    return env | {"PYTHONUNBUFFERED": "1", "COLUMNS": "400", "PIP_DISABLE_PIP_VERSION_CHECK": "1"} | extra


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once from the working tree (what `pip install .` builds and installs)."""
    out = tmp_path_factory.mktemp("wheel")
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, ROOT, timeout=PIP_TIMEOUT)
    (built,) = out.glob("*.whl")
    assert built.name.startswith(DISTRIBUTION.replace("-", "_") + "-"), built.name
    return built


def make_venv(where: Path, wheel: Path, extras: str) -> Path:
    """A fresh venv with ``wheel[extras]`` installed the way the docs say; returns its bin directory."""
    _sh(sys.executable, "-m", "venv", where, timeout=120)
    _sh(where / "bin" / "pip", "install", "--quiet", "--no-compile", f"{wheel}[{extras}]", timeout=PIP_TIMEOUT)
    return where / "bin"


def install_sh_venv(prefix: Path) -> Path:
    """systemd/install.sh with its defaults into a staging prefix (for real as root, else its planned pip line)."""
    (prefix / "etc").mkdir(parents=True)
    (prefix / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (prefix / "etc/group").write_text("root:x:0:\nvideo:x:44:\ndialout:x:20:\n")
    env = _clean_env(PYTHON=sys.executable)
    if os.geteuid() == 0 and shutil.which("useradd") and shutil.which("systemctl"):
        _sh("bash", INSTALL_SH, "--prefix", prefix, "--no-start", "--board", "generic", timeout=PIP_TIMEOUT, env=env)
        venv = prefix / "opt/edge-agent/venv"
        assert (prefix / "etc/systemd/system/edge-agent.service").is_file()
        wants = prefix / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
        assert os.readlink(wants) == "/etc/systemd/system/edge-agent.service"  # enabled, as seen from the prefix
        assert "edge-agent:" in (prefix / "etc/passwd").read_text()
        assert (prefix / "etc/edge-agent/agent.toml").stat().st_mode & 0o777 == 0o640
        return venv / "bin"
    plan = _sh("bash", INSTALL_SH, "--dry-run", "--prefix", prefix, "--board", "generic", timeout=60, env=env)
    pip_line = next(line for line in plan.splitlines() if " -m pip install " in line)
    target = pip_line.split()[-1]  # /checkout[extras]
    extras = target[target.index("[") + 1 : -1]
    venv = prefix / "opt/edge-agent/venv"
    _sh(sys.executable, "-m", "venv", venv, timeout=120)
    _sh(venv / "bin/pip", "install", "--quiet", "--no-compile", f"{ROOT}[{extras}]", timeout=PIP_TIMEOUT)
    return venv / "bin"


@dataclass(frozen=True)
class InstallSh:
    """A staging root that systemd/install.sh installed into with its defaults (``--board generic``)."""

    prefix: Path
    bin_dir: Path  # <prefix>/opt/edge-agent/venv/bin


@pytest.fixture(scope="module")
def install_sh(tmp_path_factory: pytest.TempPathFactory) -> InstallSh:
    """install.sh's defaults, run once for this module's tests (the install is what takes time)."""
    prefix = tmp_path_factory.mktemp("install-sh") / "root"
    return InstallSh(prefix, install_sh_venv(prefix))


# ---- configs ------------------------------------------------------------------------------------------------------


def base_config(tmp: Path, model: str) -> dict[str, Any]:
    """Sample digits at 20 fps through ``model``; results on stdout."""
    return {
        "device_id": DEVICE,
        "state_dir": str(tmp / "state"),
        "sources": {"digits": {"type": "replay", "path": str(INPUTS / "digit_*.png"), "rate": 20.0}},
        "pipelines": {"digits": {"source": "digits", "model": model, "sinks": ["stdout"]}},
    }


def fleet_root(tmp: Path) -> Path:
    """A fleet's pinned TUF root (root.json), as `fleet device provision` hands it to a device."""
    from fleet.keys import KeyStore
    from fleet.repository import Repository

    repo = Repository.init(tmp / "fleet-repo", KeyStore(tmp / "fleet-keys"))
    return repo.metadata_dir / "1.root.json"


def provisioned_config(tmp: Path, broker: Broker, model: str | None = None) -> Path:
    """agent.toml and root.json exactly as `fleet device provision` writes them (update enabled), state in ``tmp``."""
    from fleet.provision import agent_toml

    device_dir = tmp / "device"
    device_dir.mkdir()
    shutil.copy(fleet_root(tmp), device_dir / "root.json")
    text = agent_toml(
        device_id=DEVICE,
        group="default",
        broker_url=broker.url,
        device_prefix="edge/{device_id}/",
        credentials="none",
        tls_ca=False,
        hardware=None,
        install_dir=str(device_dir),
    )
    first = f'device_id = "{DEVICE}"\n'
    assert first in text
    text = text.replace(first, first + f'state_dir = "{tmp / "state"}"\n')
    if model is not None:
        text = text.replace('model = "sample:digits-classifier-tflite"', f'model = "{model}"')
    path = device_dir / "agent.toml"
    path.write_text(text)
    return path


def write_config(tmp: Path, config: dict[str, Any], name: str = "agent.toml") -> Path:
    path = tmp / name
    path.write_text(tomli_w.dumps(config))
    return path


class SerialSensor:
    """A pseudo-terminal that prints the sample accelerometer CSV (header first) in a loop: a serial sensor."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.lines = (INPUTS / "sensor_normal.csv").read_bytes().splitlines(keepends=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        i = 0
        while not self._stop.wait(0.005):
            with contextlib.suppress(OSError):  # nobody reading: the buffer is full
                os.write(self.master, self.lines[i % len(self.lines)] if i else self.lines[0])
            i = i + 1 if i + 1 < len(self.lines) else 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def serial_sensor() -> Iterator[SerialSensor]:
    sensor = SerialSensor()
    yield sensor
    sensor.close()


# ---- running the installed agent -----------------------------------------------------------------------------


def agent(bin_dir: Path, *args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "edge-agent"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=cwd,
        env=_clean_env(**env),
    )


def check_passes(bin_dir: Path, config: Path, cwd: Path, **env: str) -> list[dict[str, Any]]:
    proc = agent(bin_dir, "check", "--config", config, "--json", cwd=cwd, **env)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert proc.returncode == 0 and not failed, failed or proc.stderr
    return report["checks"]


def runs(bin_dir: Path, config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = agent(bin_dir, "run", "--config", config, "--duration", "3", "--results", "json", cwd=cwd)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def stdout_results(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, f"no results on stdout:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return results


def mqtt_results(
    bin_dir: Path, config: Path, cwd: Path, broker: Broker, pipeline: str
) -> subprocess.CompletedProcess[str]:
    """`run --duration 3` with the broker watched: exit 0, no traceback, results published on the broker."""
    sub = Subscriber(broker, f"edge/{DEVICE}/#")
    try:
        proc = runs(bin_dir, config, cwd)
        sub.wait_for(f"edge/{DEVICE}/results/{pipeline}", timeout=10)
        sub.wait_for(f"edge/{DEVICE}/status", timeout=10)
    finally:
        sub.close()
    return proc


def assert_installed_from_venv(bin_dir: Path, cwd: Path) -> None:
    where = _sh(bin_dir / "python", "-c", "import agent; print(agent.__file__)", timeout=60, cwd=cwd).strip()
    assert where.startswith(str(bin_dir.parent)), f"the venv imports agent from {where}, not its own install"


# ---- the matrix ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Combo:
    extras: str  # as in `pip install '.[EXTRAS]'`; "install.sh": systemd/install.sh's defaults
    exercise: Callable[[Path, Path, Broker, Any], None]  # (bin_dir, tmp, broker, serial_sensor)


def litert_offline(bin_dir: Path, tmp: Path, broker: Broker, sensor: Any) -> None:
    config = write_config(tmp, base_config(tmp, "sample:digits-classifier-tflite"))
    check_passes(bin_dir, config, tmp)
    results = stdout_results(runs(bin_dir, config, tmp))
    assert results[0]["pipeline"] == "digits"
    # Features configured without their extra: one line naming the extra, from check and from run.
    with_mqtt = write_config(
        tmp, base_config(tmp, "sample:digits-classifier-tflite") | {"mqtt": {"broker": broker.url}}
    )
    with_serial = write_config(tmp, serial_config(tmp, sensor), "agent-serial.toml")
    (tmp / "provisioned").mkdir()
    for config, features, extras in (
        (with_mqtt, ["mqtt"], "mqtt"),
        (provisioned_config(tmp / "provisioned", broker), ["mqtt", "update"], "mqtt,update"),
        (with_serial, ["serial"], "serial"),
    ):
        proc = agent(bin_dir, "check", "--config", config, cwd=tmp)
        assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
        assert len(failed) == len(features), proc.stdout
        for line, feature in zip(failed, features, strict=True):
            assert f"[{feature}]" in line and f"pip install '{DISTRIBUTION}[{feature}]'" in line, line
        proc = agent(bin_dir, "run", "--config", config, "--duration", "3", cwd=tmp)
        line = assert_one_line_error(proc, "packages are not installed", f"pip install '{DISTRIBUTION}[{extras}]'")
        assert all(f"[{feature}]" in line for feature in features), line


def onnx_offline(bin_dir: Path, tmp: Path, broker: Broker, sensor: Any) -> None:
    config = write_config(tmp, base_config(tmp, "sample:digits-classifier-onnx"))
    checks = check_passes(bin_dir, config, tmp)
    assert any(c["what"] == "pipeline digits" and "onnxruntime" in c["detail"] for c in checks), checks
    assert stdout_results(runs(bin_dir, config, tmp))[0]["pipeline"] == "digits"


def mqtt_without_update(bin_dir: Path, tmp: Path, broker: Broker, sensor: Any) -> None:
    """[mqtt] without [update]: results and status flow; device commands are off, said once in the log."""
    config = write_config(tmp, base_config(tmp, "sample:digits-classifier-onnx") | {"mqtt": {"broker": broker.url}})
    checks = check_passes(bin_dir, config, tmp)
    off = [c for c in checks if c["what"] == "device commands"]
    assert off and f"pip install '{DISTRIBUTION}[update]'" in off[0]["detail"], checks
    proc = mqtt_results(bin_dir, config, tmp, broker, "digits")
    assert proc.stderr.count("device commands are off") == 1, proc.stderr[-4000:]


def serial_config(tmp: Path, sensor: SerialSensor) -> dict[str, Any]:
    """The sample anomaly model over the accelerometer on ``sensor``."""
    return {
        "device_id": DEVICE,
        "state_dir": str(tmp / "state"),
        "sources": {"accel": {"type": "serial", "port": sensor.path, "channels": ["ax", "ay", "az"]}},
        "pipelines": {"vibration": {"source": "accel", "model": "sample:sensor-anomaly", "sinks": ["stdout"]}},
    }


def serial_sensor_offline(bin_dir: Path, tmp: Path, broker: Broker, sensor: SerialSensor) -> None:
    config = write_config(tmp, serial_config(tmp, sensor))
    check_passes(bin_dir, config, tmp)
    assert stdout_results(runs(bin_dir, config, tmp))[0]["pipeline"] == "vibration"


def provisioned(model: str | None = None) -> Callable[[Path, Path, Broker, Any], None]:
    """The agent.toml and root.json from `fleet device provision` (update enabled), as INSTALL.md uses them."""

    def exercise(bin_dir: Path, tmp: Path, broker: Broker, sensor: Any) -> None:
        config = provisioned_config(tmp, broker, model)
        checks = check_passes(bin_dir, config, tmp)
        assert any(c["what"] == "update trust root" for c in checks), checks
        assert not any(c["what"] == "device commands" for c in checks), checks  # on: the update extra is there
        proc = mqtt_results(bin_dir, config, tmp, broker, "main")
        assert "device commands are off" not in proc.stderr

    return exercise


COMBOS = {
    "litert": Combo("litert", litert_offline),
    "onnx": Combo("onnx", onnx_offline),
    "onnx,mqtt": Combo("onnx,mqtt", mqtt_without_update),
    "litert,serial": Combo("litert,serial", serial_sensor_offline),
    "onnx,update": Combo("onnx,update", provisioned("sample:digits-classifier-onnx")),
    "device": Combo("device", provisioned()),
    "install_sh": Combo("install.sh", provisioned()),
}


#: In `make test`: the combinations that catch a feature imported without its extra (litert alone given [mqtt] and
#: [update]; mqtt without update) and the path a provisioned device takes (install.sh's defaults, = [device]'s
#: packages). The rest run with SLOW=1 (make test-all): each venv is 20-70 s on 2 busy cores.
DEFAULT_RUN = {"litert", "onnx,mqtt", "install_sh"}
SLOW = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("SLOW"), reason="full install matrix: SLOW=1")]


@pytest.mark.timeout(2 * PIP_TIMEOUT)
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in DEFAULT_RUN else SLOW) for n in COMBOS])
def test_documented_install(
    name: str,
    wheel: Path,
    tmp_path: Path,
    broker: Broker,
    serial_sensor: SerialSensor,
    request: pytest.FixtureRequest,
) -> None:
    combo = COMBOS[name]
    if combo.extras == "install.sh":
        bin_dir = request.getfixturevalue("install_sh").bin_dir  # shared with the signed update below
    else:
        bin_dir = make_venv(tmp_path / "venv", wheel, combo.extras)
    work = tmp_path / "work"
    work.mkdir()
    assert_installed_from_venv(bin_dir, work)
    combo.exercise(bin_dir, work, broker, serial_sensor)


# ---- a device installed by install.sh takes a signed update -----------------------------------------------------

UPDATE_TIMEOUT = 180  # seconds for `fleet deploy --wait` (a 5 s health window; about 20 s when idle)
FLEET_USER = "fleet"


def _background(args: list[str | Path], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """A long-lived process (a service), its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )


def _alive(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        assert proc.poll() is None, f"{proc.args[:3]} exited with {proc.returncode}"


def _device(fleet: Fleet, device: str) -> dict[str, Any]:
    (found,) = [d for d in fleet.json("devices") if d["id"] == device]
    return found


@pytest.mark.timeout(2 * PIP_TIMEOUT)
def test_install_sh_device_takes_a_signed_update(
    install_sh: InstallSh, tmp_path: Path, service_log: Callable[[str, Path], Path]
) -> None:
    """A device installed by install.sh's defaults and set up with the files of `fleet device provision` as its
    INSTALL.md says runs as its unit runs it (its ExecStart= command line and StateDirectory=; as root here, not
    under systemd) against a real Mosquitto that uses the fleet's generated password and ACL files, and takes a signed update made with `fleet bundle build`/`publish` and `fleet deploy --wait` (the quick
    start of docs/fleet.md): it ends `committed` and reports the new version. `fleet deploy` first refuses a health
    window too short for the device's result rate."""
    find_mosquitto()
    fleet = Fleet(tmp_path / "fleet")
    password_file = fleet.home / "fleet-broker-password"
    password_file.write_text(secrets.token_urlsafe(18) + "\n")
    fleet_user = {"username": FLEET_USER, "password_file": str(password_file)}
    fleet.write_config("mqtt://127.0.0.1:1", **fleet_user)
    fleet.ok("init")  # the fleet's own broker user goes into the passwd and ACL files
    passwd, acl = fleet.data / "mosquitto" / "passwd", fleet.data / "mosquitto" / "acl"
    broker = ProvisionedBroker(tmp_path / "broker", passwd, acl)  # its port: the URL devices are given
    fleet.write_config(broker.url, **fleet_user)
    report = fleet.json("device", "provision", "cam-1", "--group", "lab")
    assert (Path(report["password_file"]), Path(report["acl_file"])) == (passwd, acl)

    # INSTALL.md step 2: the device's files into /etc/edge-agent (here under the staging prefix), mode 0640.
    etc = install_sh.prefix / "etc" / "edge-agent"
    provisioned_dir = Path(report["directory"])
    for path in provisioned_dir.iterdir():
        if path.name != "INSTALL.md":
            shutil.copy(path, etc / path.name)
            (etc / path.name).chmod(0o640)
    config = etc / "agent.toml"
    text = config.read_text()
    # Two changes to the provisioned file, for a bounded test: the sample source at 10 results/s instead of 2 (a
    # 5 s health window then sees the agent's default 20 results), and telemetry every 2 s instead of 30 (the
    # result rate `fleet deploy` judges a window by arrives soon).
    assert text.count("rate = 2.0\n") == 1 and text.count(f'broker = "{broker.url}"\n') == 1, text
    text = text.replace("rate = 2.0\n", "rate = 10.0\n")
    text = text.replace(f'broker = "{broker.url}"\n', f'broker = "{broker.url}"\ntelemetry_interval = 2.0\n')
    config.write_text(text)
    state = install_sh.prefix / "var" / "lib" / "edge-agent"
    service_env = {"STATE_DIRECTORY": str(state)}  # what the unit's StateDirectory= gives the agent
    work = tmp_path / "work"
    work.mkdir()

    serve_log = service_log("fleet serve", tmp_path / "fleet-serve.log")
    agent_log = service_log("edge-agent (install.sh venv)", tmp_path / "agent.log")
    service_log("mosquitto", broker.log_path)
    with contextlib.ExitStack() as stack:
        broker.start()
        stack.callback(broker.stop)
        # INSTALL.md step 3: check (broker, credentials, trust root, runtimes), then the service.
        checks = check_passes(install_sh.bin_dir, config, work, **service_env)
        assert any(c["what"] == "update trust root" for c in checks), checks
        fleet_env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        serve = _background(
            [sys.executable, "-m", "fleet.console", "--config", fleet.config, "serve"], serve_log, fleet_env, fleet.home
        )
        stack.callback(stop, serve)
        device = _background(
            [install_sh.bin_dir / "edge-agent", "run", "--config", config], agent_log, _clean_env(**service_env), work
        )
        stack.callback(stop, device)

        def reporting() -> bool:
            _alive(serve, device)
            found = _device(fleet, "cam-1")
            return bool(found["online"]) and (found.get("fps") or 0) > 0

        assert wait_until(reporting, 90, interval=1.0), _device(fleet, "cam-1")
        before = _device(fleet, "cam-1")["models"]["main"]
        assert before["name"] == "digits-classifier-tflite", before

        # docs/fleet.md's quick start: a bundle of the sample model, signed into the repository.
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        shutil.copy(SAMPLES / "digits-classifier-tflite" / "digits_cnn_int8.tflite", bundle / "model.tflite")
        (bundle / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
        archive = bundle / "digits-1.1.0.tar.gz"
        fleet.ok(
            "bundle",
            "build",
            bundle / "model.tflite",
            "--name",
            "digits",
            "--version",
            "1.1.0",
            "--task",
            "classification",
            "--labels",
            bundle / "labels.txt",
            "-o",
            archive,
        )
        fleet.ok("bundle", "publish", archive)

        # A window too short for the device's rate (about 10 results/s, so 1 s gives about 10 of the 20): refused.
        line = assert_fleet_error(
            fleet("deploy", "digits@1.1.0", "--group", "lab", "--health-window", "1", "--wait"),
            "health window 1 s x",
            "results/s on cam-1",
            "fewer than the 20 needed",
            "--health-window",
        )
        assert "or more" in line, line
        assert fleet.json("rollout", "list") == [], "a refused deployment created a rollout"

        deploy = fleet(
            "deploy",
            "digits@1.1.0",
            "--group",
            "lab",
            "--health-window",
            "5",
            "--wait",
            "--wait-timeout",
            str(UPDATE_TIMEOUT),
            timeout=UPDATE_TIMEOUT + 60,
        )
        assert deploy.returncode == 0 and "Traceback" not in deploy.stderr, deploy.stdout + deploy.stderr
        assert "committed" in deploy.stdout, deploy.stdout
        _alive(serve, device)

        # What the device reports it runs (status `models`), in the registry and on the broker.
        def runs_new_version() -> bool:
            return _device(fleet, "cam-1")["models"]["main"]["version"] == "1.1.0"

        assert wait_until(runs_new_version, 30, interval=1.0), _device(fleet, "cam-1")
        after = _device(fleet, "cam-1")["models"]["main"]
        # the quick start's bundle holds the sample model itself: a new name and version, the same model file
        assert after == {"name": "digits", "version": "1.1.0", "sha256": before["sha256"]}, after
        fleet_password = password_file.read_text().strip()
        with Subscriber(broker, "edge/cam-1/status", username=FLEET_USER, password=fleet_password) as sub:
            (status,) = sub.wait_for("edge/cam-1/status", timeout=10)[-1:]
        assert status.retain
        reported = json.loads(status.payload)
        assert reported["state"] == "online" and reported["models"]["main"]["version"] == "1.1.0", reported
        shown = fleet.json("device", "show", "cam-1")
        assert "committed" in json.dumps(shown), shown
        assert "Denied PUBLISH" not in broker.log_text()  # nothing the agent sent was refused by the ACL

        assert stop(device) == 0  # a clean shutdown of the service
    log = agent_log.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    assert any(ln.startswith("[main#") and "] digits:" in ln for ln in log.splitlines()), log[-4000:]


# ---- the rule itself, in process (fast) -------------------------------------------------------------------------


def _config(**extra: Any) -> Any:
    from agent.config import parse_config

    data = {
        "sources": {"s": {"type": "serial", "port": "/dev/ttyUSB0", "channels": ["ax"]}},
        "pipelines": {"p": {"source": "s", "model": "sample:sensor-anomaly"}},
    }
    return parse_config(data | extra, "test config")


def test_installed_extras_leave_nothing_missing() -> None:
    from agent.extras import commands_unavailable, missing_extras

    cfg = _config(mqtt={"broker": "mqtt://127.0.0.1:1883"}, update={"enabled": True, "trust_root": "root.json"})
    assert missing_extras(cfg) == []  # this venv has every extra
    assert commands_unavailable() is None


def test_each_configured_feature_without_its_package_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import extras
    from agent.errors import AgentError

    for feature in ("mqtt", "update", "serial", "commands"):
        monkeypatch.setitem(extras.FEATURE_MODULES, feature, ("no_such_module_for_" + feature,))
    offline = _config()
    (serial,) = extras.missing_extras(offline)
    assert serial.check == "source s" and serial.extra == "serial"
    assert str(serial) == (
        "source s is a serial source but its packages are not installed: No module named 'no_such_module_for_serial'"
        f" (fix: pip install '{DISTRIBUTION}[serial]' or use another source type)"
    )
    with pytest.raises(AgentError) as one:
        extras.require_extras(offline)
    assert (one.value.problem, one.value.fix) == (serial.problem, serial.fix)

    full = _config(mqtt={"broker": "mqtt://127.0.0.1:1883"}, update={"enabled": True, "trust_root": "root.json"})
    assert [m.extra for m in extras.missing_extras(full)] == ["mqtt", "update", "serial"]
    with pytest.raises(AgentError) as all_three:
        extras.require_extras(full)
    assert all_three.value.fix == f"pip install '{DISTRIBUTION}[mqtt,update,serial]'"
    assert "\n" not in str(all_three.value) and "[update] is enabled" in all_three.value.problem
    off = extras.commands_unavailable()
    assert off is not None and f"pip install '{DISTRIBUTION}[update]'" in off
