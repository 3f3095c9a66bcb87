"""Firmware profiles (firmware-profiles/*.toml, agent/profiles.py) and board detection (agent/board.py)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from agent.board import BoardInfo, detect_board, parse_l4t_release, read_temperatures, throttle_decision
from agent.errors import AgentError
from agent.profiles import (
    PROFILES_ENV,
    FirmwareProfile,
    ThermalConfig,
    available_profiles,
    builtin_dir,
    builtin_profiles,
    get_profile,
    load_profile,
    load_profiles,
    profile_dirs,
)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
PROFILE_SRC = ROOT / "firmware-profiles"
BOARDS = ROOT / "tests" / "fixtures" / "boards"
EXPECTED_IDS = {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86_64"}


@pytest.fixture(scope="module")
def profiles() -> dict[str, FirmwareProfile]:
    return builtin_profiles()


# ---- the profile files ---------------------------------------------------------------------------------------


def test_every_profile_file_loads_and_its_id_is_its_file_name() -> None:
    files = sorted(PROFILE_SRC.glob("*.toml"))
    assert {f.stem for f in files} == EXPECTED_IDS
    ids = [load_profile(f).id for f in files]
    assert ids == [f.stem for f in files]
    assert len(set(ids)) == len(ids)


def test_builtin_profiles_are_the_source_files(profiles: dict[str, FirmwareProfile]) -> None:
    assert set(profiles) == EXPECTED_IDS
    assert builtin_dir().resolve() == PROFILE_SRC.resolve()


def test_package_ships_the_profiles_through_a_symlink() -> None:
    link = ROOT / "agent" / "firmware_profiles"
    assert link.is_symlink(), "agent/firmware_profiles must be a symlink to ../firmware-profiles"
    assert link.resolve() == PROFILE_SRC.resolve()
    with (ROOT / "pyproject.toml").open("rb") as fh:
        package_data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["agent"]
    assert "firmware_profiles/*.toml" in package_data


def test_board_profiles_have_what_the_agent_needs(profiles: dict[str, FirmwareProfile]) -> None:
    for pid in ("rpi4", "rpi5"):
        p = profiles[pid]
        assert p.arch == "aarch64" and p.python == "3.11"
        assert p.runtime.order[0] == "litert"
        assert p.thermal.paths == ["/sys/class/thermal/thermal_zone0/temp"]
        assert p.thermal.firmware_throttle_c == 80.0
        assert p.camera.pipeline(640, 480, 30).startswith(
            "libcamerasrc ! video/x-raw,width=640,height=480,framerate=30/1"
        )
    for pid in ("jetson-nano", "jetson-orin-nano"):
        p = profiles[pid]
        assert p.runtime.order[0] == "onnxruntime"
        assert p.runtime.providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        assert "nvarguscamerasrc" in p.camera.pipeline() and "video/x-raw(memory:NVMM)" in p.camera.pipeline()
        assert p.thermal.zone_types and p.thermal.critical_c < p.thermal.firmware_throttle_c
    assert profiles["jetson-nano"].python == "3.6" and "newer Python" in profiles["jetson-nano"].notes
    assert profiles["jetson-orin-nano"].python == "3.10"
    assert profiles["x86_64"].detection.machine and profiles["x86_64"].camera.csi_pipeline is None
    for p in profiles.values():
        pipeline = p.camera.pipeline()
        assert pipeline is None or ("appsink" in pipeline and "{" not in pipeline)
        assert p.thermal.resume_c < p.thermal.throttle_c < p.thermal.critical_c


# ---- errors in profile files ---------------------------------------------------------------------------------


def _write_variant(tmp_path: Path, old: str, new: str, name: str = "rpi4.toml") -> Path:
    text = (PROFILE_SRC / "rpi4.toml").read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "throttle_c = 72.0",
            "throtle_c = 72.0",
            [
                "unknown key 'thermal.throtle_c' (and 1 more)",
                "remove 'thermal.throtle_c' from rpi4.toml",
                "did you mean 'throttle_c'?",
            ],
        ),
        ("memory_budget_mb = 512", "memory_budget_mb = 'lots'", ["memory_budget_mb", "correct 'memory_budget_mb'"]),
        ("memory_budget_mb = 512\n", "", ["missing key 'memory_budget_mb'", "add 'memory_budget_mb' to rpi4.toml"]),
        ("resume_c = 67.0", "resume_c = 77.0", ["thermal", "resume_c < throttle_c < critical_c"]),
        (
            "firmware_throttle_c = 80.0",
            "firmware_throttle_c = 78.0",
            ["critical_c (78) must be below firmware_throttle_c"],
        ),
        ('order = ["litert"', 'order = ["tflite"', ["runtime.order.0"]),
        ("framerate={fps}/1", "framerate={rate}/1", ["camera.csi_pipeline", "unknown placeholders ['rate']"]),
        ('id = "rpi4"', 'id = "Raspberry Pi"', ["'id'", "lower-case"]),
        ("threads = 4", "threads = 0", ["runtime.threads"]),
    ],
)
def test_invalid_profile_names_the_key_and_the_fix(tmp_path: Path, old: str, new: str, expected: list[str]) -> None:
    path = _write_variant(tmp_path, old, new)
    with pytest.raises(AgentError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "(fix: " in message
    for part in expected:
        assert part in message


def test_invalid_toml_names_the_place(tmp_path: Path) -> None:
    path = _write_variant(tmp_path, "threads = 4", "threads = = 4")
    with pytest.raises(AgentError, match=r"invalid TOML: .*line \d+"):
        load_profile(path)


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")


def test_profile_id_must_match_file_name_in_a_directory(tmp_path: Path) -> None:
    _write_variant(tmp_path, 'id = "rpi4"', 'id = "rpi4-custom"')
    with pytest.raises(AgentError, match=r"id 'rpi4-custom' differs from the file name.*set id = 'rpi4'"):
        load_profiles(tmp_path)


# ---- looking profiles up -------------------------------------------------------------------------------------


def test_unknown_profile_id_lists_the_known_ones() -> None:
    with pytest.raises(AgentError) as info:
        get_profile("rpi3", dirs=[builtin_dir()])
    message = str(info.value)
    assert "unknown firmware profile 'rpi3'" in message
    assert "known: jetson-nano, jetson-orin-nano, rpi4, rpi5, x86_64" in message
    assert "\n" not in message


def test_override_directory_wins_over_builtin(tmp_path: Path) -> None:
    _write_variant(tmp_path, "threads = 4", "threads = 2")
    profile = get_profile("rpi4", dirs=[tmp_path, builtin_dir()])
    assert profile.runtime.threads == 2
    assert get_profile("rpi5", dirs=[tmp_path, builtin_dir()]).id == "rpi5"
    assert set(available_profiles([tmp_path])) == {"rpi4"}


def test_environment_directories_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    dirs = profile_dirs()
    assert dirs[0] == tmp_path and dirs[-1] == builtin_dir()
    _write_variant(tmp_path, "threads = 4", "threads = 3")
    assert available_profiles([tmp_path, builtin_dir()])["rpi4"].runtime.threads == 3


# ---- board detection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("board", "profile_id", "model", "l4t", "jetpack"),
    [
        ("rpi4", "rpi4", "Raspberry Pi 4 Model B Rev 1.4", None, None),
        ("rpi5", "rpi5", "Raspberry Pi 5 Model B Rev 1.0", None, None),
        ("jetson-nano", "jetson-nano", "NVIDIA Jetson Nano Developer Kit", "32.7.1", "4.6.1"),
        ("jetson-orin-nano", "jetson-orin-nano", "NVIDIA Jetson Orin Nano Developer Kit", "36.3.0", "6.0"),
    ],
)
def test_detects_each_board_from_its_files(
    profiles: dict[str, FirmwareProfile], board: str, profile_id: str, model: str, l4t: str | None, jetpack: str | None
) -> None:
    info = detect_board(BOARDS / board, machine="aarch64", profiles=profiles)
    assert info.profile_id == profile_id, info.reason
    assert info.model == model  # trailing NUL stripped
    assert (info.l4t_release, info.jetpack) == (l4t, jetpack)
    assert info.evidence["/proc/device-tree/model"] == model
    assert info.matched_by and info.reason.startswith(profile_id)
    assert any(m.startswith("model has") for m in info.matched_by)
    assert any(m.startswith("compatible has") for m in info.matched_by)
    assert info.warnings == ()
    if l4t:
        assert info.evidence["/etc/nv_tegra_release"].startswith(f"# R{l4t.split('.')[0]} (release)")


def test_compatible_alone_is_enough(tmp_path: Path, profiles: dict[str, FirmwareProfile]) -> None:
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/compatible").write_bytes(b"nvidia,p3768-0000+p3767-0003\0nvidia,tegra234\0")
    info = detect_board(tmp_path, machine="aarch64", profiles=profiles)
    assert info.profile_id == "jetson-orin-nano"
    assert info.model is None


def test_unknown_arm_board(profiles: dict[str, FirmwareProfile]) -> None:
    info = detect_board(BOARDS / "unknown-arm", machine="aarch64", profiles=profiles)
    assert info.profile_id is None
    assert info.model == "Radxa ROCK 5B"
    assert "no firmware profile matches" in info.reason and "'Radxa ROCK 5B'" in info.reason
    assert (
        "rockchip,rk3588" in info.reason and "known: jetson-nano, jetson-orin-nano, rpi4, rpi5, x86_64" in info.reason
    )


def test_other_orin_module_is_not_an_orin_nano(profiles: dict[str, FirmwareProfile]) -> None:
    info = detect_board(BOARDS / "jetson-agx-orin", machine="aarch64", profiles=profiles)
    assert info.profile_id is None
    assert (info.l4t_release, info.jetpack) == ("36.4.3", "6.2")


def test_aarch64_without_device_tree(tmp_path: Path, profiles: dict[str, FirmwareProfile]) -> None:
    info = detect_board(tmp_path, machine="aarch64", profiles=profiles)
    assert info.profile_id is None and "no device-tree model" in info.reason


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_x86_64_falls_back_by_machine(profiles: dict[str, FirmwareProfile], machine: str) -> None:
    info = detect_board(BOARDS / "x86_64", machine=machine, profiles=profiles)
    assert info.profile_id == "x86_64"
    assert info.matched_by == (f"machine is {machine!r}",)
    assert info.evidence == {"platform.machine()": machine}
    assert info.warnings == ()


def test_a_board_profile_wins_over_the_machine_fallback(profiles: dict[str, FirmwareProfile]) -> None:
    info = detect_board(BOARDS / "rpi4", machine="x86_64", profiles=profiles)  # e.g. a board image under emulation
    assert info.profile_id == "rpi4"
    assert any("is for aarch64 but this machine is x86_64" in w for w in info.warnings)


def test_32_bit_os_on_a_pi_warns(profiles: dict[str, FirmwareProfile]) -> None:
    info = detect_board(BOARDS / "rpi4", machine="armv7l", profiles=profiles)
    assert info.profile_id == "rpi4"
    assert info.warnings == ("profile rpi4 is for aarch64 but this machine is armv7l: wheels may be missing",)


def test_unexpected_l4t_release_warns(tmp_path: Path, profiles: dict[str, FirmwareProfile]) -> None:
    root = tmp_path / "orin"
    shutil.copytree(BOARDS / "jetson-orin-nano", root)
    (root / "etc/nv_tegra_release").write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref\n")
    info = detect_board(root, machine="aarch64", profiles=profiles)
    assert info.profile_id == "jetson-orin-nano"
    assert (info.l4t_release, info.jetpack) == ("35.4.1", "5.1.2")
    assert info.warnings == (
        "profile jetson-orin-nano is written for L4T R36 but this board runs R35.4.1 (JetPack 5.1.2)",
    )


def test_default_machine_is_this_one(profiles: dict[str, FirmwareProfile]) -> None:
    import platform

    info = detect_board(BOARDS / "unknown-arm", profiles=profiles)
    assert info.machine == platform.machine()


def test_board_info_is_plain_data(profiles: dict[str, FirmwareProfile]) -> None:
    info = detect_board(BOARDS / "jetson-nano", machine="aarch64", profiles=profiles)
    data = info.to_dict()
    assert data["profile_id"] == "jetson-nano" and data["compatible"][1] == "nvidia,jetson-nano"
    assert isinstance(info, BoardInfo)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64", ("32.7.1", "4.6.1")),
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64", ("36.4.0", "6.1")),
        ("# R36 (release), REVISION: 9.9, GCID: 1", ("36.9.9", "6.x")),
        ("# R99 (release), REVISION: 1.0", ("99.1.0", "unknown")),
        ("garbage", None),
    ],
)
def test_parse_l4t_release(text: str, expected: tuple[str, str] | None) -> None:
    assert parse_l4t_release(text) == expected


# ---- temperatures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("board", "profile_id", "expected"),
    [
        ("rpi4", "rpi4", {"cpu-thermal": 48.686}),
        ("rpi5", "rpi5", {"cpu-thermal": 55.35}),
        ("jetson-nano", "jetson-nano", {"CPU-therm": 43.0, "GPU-therm": 40.5}),  # not PMIC-Die's fixed 100
        ("jetson-orin-nano", "jetson-orin-nano", {"cpu-thermal": 47.531, "gpu-thermal": 46.406, "tj-thermal": 47.531}),
        ("x86_64", "x86_64", {"acpitz": 27.8, "x86_pkg_temp": 52.0}),
    ],
)
def test_read_temperatures_from_sysfs(
    profiles: dict[str, FirmwareProfile], board: str, profile_id: str, expected: dict[str, float]
) -> None:
    temps = read_temperatures(profiles[profile_id], root=BOARDS / board)
    assert temps == pytest.approx(expected)
    assert list(temps) == list(expected)


def test_explicit_path_is_keyed_by_its_zone_type(profiles: dict[str, FirmwareProfile]) -> None:
    # the Pi profile on another board: no cpu-thermal zone, but its explicit thermal_zone0/temp still reads
    assert read_temperatures(profiles["rpi4"], root=BOARDS / "unknown-arm") == {"soc-thermal": 38.846}


def test_read_temperatures_skips_missing_and_bad_sensors(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/thermal/thermal_zone3"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("N/A\n")
    custom = tmp_path / "sys/devices/platform/sensor/temp1_input"
    custom.parent.mkdir(parents=True)
    custom.write_text("61250\n")
    thermal = ThermalConfig(
        zone_types=["cpu-thermal", "gpu-thermal"],
        paths=["/sys/devices/platform/sensor/temp1_input", "/sys/nope/temp"],
        throttle_c=70,
        critical_c=80,
        resume_c=65,
    )
    assert read_temperatures(thermal, root=tmp_path) == {"/sys/devices/platform/sensor/temp1_input": 61.25}
    assert read_temperatures(thermal, root=tmp_path / "empty") == {}


def test_repeated_zone_types_get_distinct_keys(tmp_path: Path) -> None:
    for n, milli in ((0, "30000"), (1, "45000")):
        zone = tmp_path / f"sys/class/thermal/thermal_zone{n}"
        zone.mkdir(parents=True)
        (zone / "type").write_text("acpitz\n")
        (zone / "temp").write_text(milli)
    thermal = ThermalConfig(zone_types=["acpitz"], throttle_c=70, critical_c=80, resume_c=65)
    assert read_temperatures(thermal, root=tmp_path) == {"acpitz": 30.0, "acpitz/thermal_zone1": 45.0}


# ---- throttling ----------------------------------------------------------------------------------------------

T = ThermalConfig(throttle_c=75, critical_c=85, resume_c=70)


@pytest.mark.parametrize(
    ("temp", "throttled", "expected"),
    [
        (40.0, False, "normal"),
        (74.9, False, "normal"),
        (75.0, False, "throttle"),
        (80.0, False, "throttle"),
        (84.9, False, "throttle"),
        (85.0, False, "critical"),
        (99.0, False, "critical"),
        (85.0, True, "critical"),
        (80.0, True, "throttle"),  # cooling down from critical
        (72.0, True, "throttle"),  # hysteresis: still above resume_c
        (70.0, True, "throttle"),
        (69.9, True, "normal"),
        (72.0, False, "normal"),  # between resume and throttle, coming from below
        (-10.0, True, "normal"),
        (None, True, "throttle"),  # no reading keeps the state
        (None, False, "normal"),
        (math.nan, True, "throttle"),
        (math.nan, False, "normal"),
    ],
)
def test_throttle_decision(temp: float | None, throttled: bool, expected: str) -> None:
    assert throttle_decision(temp, T, throttled) == expected


def test_throttle_decision_over_a_heat_cycle() -> None:
    temps = [60, 74, 76, 80, 86, 90, 84, 78, 72, 70, 69, 72, 74, 75]
    states: list[str] = []
    state = "normal"
    for t in temps:
        state = throttle_decision(t, T, state != "normal")
        states.append(state)
    assert states == [
        "normal", "normal", "throttle", "throttle", "critical", "critical", "throttle", "throttle", "throttle",
        "throttle", "normal", "normal", "normal", "throttle",
    ]  # fmt: skip


def test_profile_thresholds_work_with_the_decision(profiles: dict[str, FirmwareProfile]) -> None:
    for p in profiles.values():
        t = p.thermal
        assert throttle_decision(t.throttle_c, t, False) == "throttle"
        assert throttle_decision(t.resume_c - 0.5, t, True) == "normal"
        assert throttle_decision(t.critical_c, t, True) == "critical"
