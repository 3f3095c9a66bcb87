"""Serial source against real pseudo-terminals (and pyserial's loop://): parsing, bad lines, unplug and replug."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agent.sources import serial as serial_source
from agent.sources.base import Sample
from agent.sources.serial import SerialSource, SerialSourceConfig

pytestmark = pytest.mark.skipif(os.name != "posix", reason="pseudo-terminals are POSIX only")
FAST = {"read_timeout": 0.1, "reconnect_initial": 0.05, "reconnect_max": 0.2}


class Pty:
    """A fake serial device: the test writes to the master, the source opens the slave's path."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo / CR translation before the source configures the port
        os.set_blocking(self.master, False)  # a full buffer drops bytes instead of hanging the test
        self.path = os.ttyname(self.slave)
        self.closed = False

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError included
            os.write(self.master, data)

    def close(self) -> None:
        """Unplug: the slave node vanishes and the source's reads fail with EIO."""
        if not self.closed:
            self.closed = True
            os.close(self.master)
            os.close(self.slave)


class Feeder(threading.Thread):
    """A free-running sensor: writes ``line(i)`` every ``interval`` seconds until stopped."""

    def __init__(self, pty: Pty, line: Callable[[int], bytes], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pty, self.line, self.interval = pty, line, interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop_event.wait(self.interval):
            self.pty.write(self.line(i))
            i += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(2)


@pytest.fixture
def ptys():
    made: list[Pty] = []

    def make() -> Pty:
        made.append(Pty())
        return made[-1]

    yield make
    for pty in made:
        pty.close()


@pytest.fixture
def sources():
    made: list[SerialSource] = []

    def make(name: str = "s", **options) -> SerialSource:
        made.append(SerialSource(SerialSourceConfig(**(FAST | options)), name))
        return made[-1]

    yield make
    for source in made:
        source.close()


def read_until(source: SerialSource, done: Callable[[list[Sample]], bool], deadline: float = 5.0) -> list[Sample]:
    """Poll ``read`` until ``done(samples)`` holds; fail with the source's health after ``deadline`` seconds."""
    samples: list[Sample] = []
    end = time.monotonic() + deadline
    while True:
        if done(samples):
            return samples
        if time.monotonic() > end:
            raise AssertionError(f"condition not met: {len(samples)} samples, health {source.health}")
        sample = source.read(0.05)
        if sample is not None:
            samples.append(sample)


def rows(samples: list[Sample]) -> list[list[float]]:
    return [s.data.tolist() for s in samples]


def connect(source: SerialSource) -> None:
    """Open the port before the device talks (opening flushes the input, like a real UART)."""
    read_until(source, lambda _: source.health.connected, 3.0)


def write_slowly(pty: Pty, data: bytes, piece: int = 3, pause: float = 0.01) -> threading.Thread:
    """Write ``data`` in small pieces from a thread, so lines arrive split over several reads."""

    def run() -> None:
        for start in range(0, len(data), piece):
            pty.write(data[start : start + piece])
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ---- parsing ------------------------------------------------------------------------------------


def test_csv_header_gives_column_positions_and_split_lines_are_reassembled(ptys, sources) -> None:
    pty = ptys()
    source = sources(port=pty.path, channels=["az", "ax"])
    connect(source)
    data = b"ts,ax,ay,az,label\r\n1,0.5,0.25,-1.5,ok\r\n2,1.5,2.5,3.5,ok\r\n3,-2,0,7e2,ok\n"
    writer = write_slowly(pty, data)
    got = read_until(source, lambda s: len(s) >= 3)
    writer.join()
    assert rows(got) == [[-1.5, 0.5], [3.5, 1.5], [700.0, -2.0]]
    assert all(s.data.dtype == np.float32 and s.data.shape == (2,) for s in got)
    assert [s.gap for s in got] == [True, False, False]
    assert [s.seq for s in got] == [1, 2, 3]
    assert source.kind == "row"
    assert source.health.errors == 0 and source.health.samples == 3 and source.health.connected


def test_csv_without_header_takes_the_first_columns(ptys, sources) -> None:
    pty = ptys()
    source = sources(port=pty.path, channels=["a", "b"])
    connect(source)
    # the first line after opening may be the tail of a line in flight: it is dropped, not counted
    pty.write(b"9,9,9\n1,2,3\n4.5,-5,6\n")
    got = read_until(source, lambda s: len(s) >= 2)
    assert rows(got) == [[1.0, 2.0], [4.5, -5.0]]
    assert source.health.errors == 0


def test_csv_whitespace_delimiter(ptys, sources) -> None:
    pty = ptys()
    source = sources(port=pty.path, channels=["x", "y"], delimiter=" ")
    connect(source)
    pty.write(b"x y\n1  2\n3\t4 \n")
    assert rows(read_until(source, lambda s: len(s) >= 2)) == [[1.0, 2.0], [3.0, 4.0]]


def test_json_lines_with_nested_keys_in_configured_order(ptys, sources) -> None:
    pty = ptys()
    source = sources(port=pty.path, format="json", channels=["temp", "accel.z", "accel.x", "gyro.x", "v.1"])
    connect(source)
    line = b'{"accel": {"x": 1, "y": 2, "z": 3.5}, "temp": 21.25, "gyro.x": -4, "v": [7, 8]}\r\n'
    writer = write_slowly(pty, line * 2, piece=7)
    got = read_until(source, lambda s: len(s) >= 2)
    writer.join()
    assert rows(got) == [[21.25, 3.5, 1.0, -4.0, 8.0]] * 2
    assert got[0].gap and not got[1].gap
    assert source.health.errors == 0


# ---- bad input ------------------------------------------------------------------------------------


def test_malformed_csv_lines_are_skipped_and_counted(ptys, sources) -> None:
    pty = ptys()
    source = sources(port=pty.path, channels=["a", "b"])
    connect(source)
    pty.write(b"a,b,c\n1,2,3\n")
    bad = [b"1,x,3\n", b"1,2\n", b"1,2,3,4\n", b"nan,1,2\n", b"1,inf,2\n", b"\xff\xfe,1,2\n", b"1e40,1,1\n"]
    for i, line in enumerate(bad):
        pty.write(line + f"{i},{i},{i}\n".encode() + b"\r\n")  # blank lines are not errors
    got = read_until(source, lambda s: len(s) >= 1 + len(bad))
    assert rows(got) == [[1.0, 2.0]] + [[float(i), float(i)] for i in range(len(bad))]
    assert source.health.errors == len(bad)
    assert "1e40" in source.health.last_error or "non-finite" in source.health.last_error
    assert "\n" not in source.health.last_error
    assert source.health.connected and not source.closed


def test_malformed_json_lines_are_skipped_and_counted(ptys, sources) -> None:
    pty = ptys()
    source = sources(port=pty.path, format="json", channels=["a", "b.c"])
    connect(source)
    good = b'{"a": 1, "b": {"c": 2}}\n'
    bad = [
        b'{"a": 1, "b": {"c": 2}\n',  # truncated
        b"[1, 2]\n",
        b'{"a": 1}\n',
        b'{"a": "1", "b": {"c": 2}}\n',
        b'{"a": true, "b": {"c": 2}}\n',
        b'{"a": NaN, "b": {"c": 2}}\n',
        b'{"a": 1e999, "b": {"c": 2}}\n',
    ]
    pty.write(good + b"".join(line + good for line in bad))
    got = read_until(source, lambda s: len(s) >= 1 + len(bad))
    assert rows(got) == [[1.0, 2.0]] * (1 + len(bad))
    assert source.health.errors == len(bad)
    assert source.health.last_error and "a" in source.health.last_error


def test_over_long_lines_are_discarded_never_buffered(ptys, sources) -> None:
    pty = ptys()
    source = sources(port=pty.path, channels=["a"], max_line_bytes=64)
    connect(source)
    pty.write(b"a\n")
    writer = write_slowly(pty, b"1," * 400 + b"1\n" + b"5\n" + b"2" * 100 + b"\n6\n", piece=50, pause=0.005)
    got = read_until(source, lambda s: len(s) >= 2)
    writer.join()
    assert rows(got) == [[5.0], [6.0]]
    assert source.health.errors == 2
    assert "longer than 64 bytes" in source.health.last_error
    assert len(source._buf) <= 64


def test_merged_lines_are_caught_by_the_field_count(ptys, sources) -> None:
    pty = ptys()
    source = sources(port=pty.path, channels=["a", "b"])
    connect(source)
    pty.write(b"0,0,0\n1,1,1\n2,2,23,3,3\n4,4,4\n")  # the newline after "2,2,2" was lost
    assert rows(read_until(source, lambda s: len(s) >= 2)) == [[1.0, 1.0], [4.0, 4.0]]
    assert source.health.errors == 1 and "5 fields, expected 3" in source.health.last_error
    # a lasting new layout (firmware update, no header) is adopted after a few lines, not rejected forever
    pty.write(b"5,5,5,5\n6,6,6,6\n7,7,7,7\n8,8,8,8\n")
    assert rows(read_until(source, lambda s: len(s) >= 2)) == [[7.0, 7.0], [8.0, 8.0]]
    assert source.health.errors == 3


# ---- unplug, replug, absent device ------------------------------------------------------------------


def repoint(link: Path, target: str) -> None:
    """Atomically retarget a /dev/serial/by-id style symlink."""
    tmp = link.with_name(link.name + ".new")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def counter_line(i: int) -> bytes:
    return f"{i},{i * 2}\n".encode()


def test_device_vanishes_and_comes_back(tmp_path, ptys, sources) -> None:
    link = tmp_path / "usb-Sensor_1234-if00"
    first = ptys()
    repoint(link, first.path)
    source = sources(port=str(link), channels=["a", "b"])
    feeder = Feeder(first, counter_line)
    feeder.start()
    got = read_until(source, lambda s: len(s) >= 5)
    assert got[0].gap and not any(s.gap for s in got[1:])
    assert all(s.data[1] == 2 * s.data[0] for s in got)
    assert source.health.connected and source.health.reconnects == 0

    feeder.stop()
    # Unplug: udev drops the by-id link and the pts node vanishes, so the open handle fails with EIO.
    # (The link goes first because pts numbers are global: a pytest run beside this one may get the
    # same /dev/pts/N at once, and a link still pointing there would let this source open its pty.)
    repoint(link, str(tmp_path / "unplugged"))
    first.close()
    read_until(source, lambda _: not source.health.connected)
    assert source.health.errors >= 1 and str(link) in source.health.last_error
    assert all(source.read(0.05) is None for _ in range(3))  # absent device: None, no exception
    assert not source.health.connected and source.health.reconnects == 0
    assert "does not exist" in source.health.last_error  # the reopen attempts say why they fail

    second = ptys()
    repoint(link, second.path)
    feeder = Feeder(second, lambda i: counter_line(1000 + i))
    feeder.start()
    try:
        resumed = read_until(source, lambda s: len(s) >= 3)
    finally:
        feeder.stop()
    assert resumed[0].gap and not any(s.gap for s in resumed[1:])
    assert all(s.data[0] >= 1000 and s.data[1] == 2 * s.data[0] for s in resumed)
    assert source.health.connected and source.health.reconnects == 1
    assert resumed[0].seq == got[-1].seq + 1


def test_port_path_disappearing_while_silent_is_noticed(tmp_path, ptys, sources) -> None:
    link = tmp_path / "by-id-link"
    pty = ptys()
    repoint(link, pty.path)
    source = sources(port=str(link), channels=["a"])
    connect(source)
    pty.write(b"a\n1\n")
    assert rows(read_until(source, lambda s: len(s) >= 1)) == [[1.0]]
    repoint(link, str(tmp_path / "gone"))  # no read error (the pty lives on): only the path is gone
    read_until(source, lambda _: not source.health.connected)
    assert source.health.last_error in (
        f"serial port {link} disappeared",
        f"serial port {link} does not exist (fix: plug the sensor in or set [sources.s].port)",
    )
    repoint(link, pty.path)
    pty.write(b"2\n")
    read_until(source, lambda _: source.health.connected)
    assert source.health.reconnects == 1


def test_port_missing_at_start_then_plugged_in(tmp_path, ptys, sources) -> None:
    link = tmp_path / "ttyUSB-sensor"
    os.symlink(tmp_path / "nothing-here", link)
    source = sources(name="imu", port=str(link), channels=["a", "b"])
    assert source.read(0.1) is None
    reason = source.probe()
    assert reason == f"serial port {link} does not exist (fix: plug the sensor in or set [sources.imu].port)"
    assert source.health.errors >= 1 and source.health.last_error == reason
    assert not source.health.connected

    pty = ptys()
    repoint(link, pty.path)
    assert source.probe() is None
    feeder = Feeder(pty, counter_line)
    feeder.start()
    try:
        got = read_until(source, lambda s: len(s) >= 3)
    finally:
        feeder.stop()
    assert got[0].gap and source.health.connected
    assert source.health.reconnects == 0  # the first successful open is not a reconnect


def test_probe_explains_other_failures(tmp_path, sources) -> None:
    not_a_tty = tmp_path / "plain-file"
    not_a_tty.write_text("")
    reason = sources(name="s1", port=str(not_a_tty), channels=["a"]).probe()
    assert reason is not None and str(not_a_tty) in reason and "(fix: " in reason and "\n" not in reason
    # pyserial's own exception, as it raises it for EACCES (tests usually run as root, so no real chmod test)
    source = sources(name="s2", port=str(not_a_tty), channels=["a"])
    denied = serial_source._pyserial().SerialException(errno.EACCES, f"could not open port {not_a_tty}")
    assert "dialout" in source._explain(denied) and str(not_a_tty) in source._explain(denied)
    busy = serial_source._pyserial().SerialException(errno.EAGAIN, "Could not exclusively lock port")
    assert "in use" in source._explain(busy)


PROBE_AS_NOBODY = """
import sys
from agent.sources.serial import SerialSource, SerialSourceConfig
print(SerialSource(SerialSourceConfig(port=sys.argv[1], channels=["a"]), "imu").probe())
"""


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores permissions; no setpriv")
def test_probe_permission_denied_mentions_dialout(ptys) -> None:
    pty = ptys()
    os.chmod(pty.path, 0o600)
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    command = [*drop, sys.executable, "-c", PROBE_AS_NOBODY, pty.path]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"no permission to open serial port {pty.path}")
    assert "dialout" in proc.stdout and "(fix: " in proc.stdout


def test_second_reader_is_refused_with_a_clear_reason(ptys, sources) -> None:
    pty = ptys()
    first = sources(port=pty.path, channels=["a"])
    connect(first)
    reason = sources(name="other", port=pty.path, channels=["a"]).probe()
    assert reason is not None and "in use" in reason and pty.path in reason
    assert first.probe() is None  # already open here


def test_loop_url_round_trip(sources) -> None:
    source = sources(port="loop://", channels=["x", "y"], baudrate=9600)
    connect(source)
    source._port.write(b"x,y\n3,4\n")  # pyserial's loopback: what is written is read back
    got = read_until(source, lambda s: len(s) >= 1)
    assert rows(got) == [[3.0, 4.0]] and got[0].gap


def test_stall_counted_once_per_episode(sources) -> None:
    source = sources(port="loop://", channels=["x"], stall_after=0.2)
    connect(source)
    read_until(source, lambda _: source.health.stalls == 1)
    assert all(source.read(0.05) is None for _ in range(6))
    assert source.health.stalls == 1 and source.health.connected
    source._port.write(b"x\n")  # a valid line (a header counts) ends the episode
    read_until(source, lambda _: source.health.stalls == 2)


# ---- close, missing pyserial, config ------------------------------------------------------------------


@pytest.mark.parametrize("situation", ["waiting-for-data", "waiting-to-reconnect"])
def test_close_from_another_thread_unblocks_read(situation, tmp_path, ptys, sources) -> None:
    if situation == "waiting-for-data":
        source = sources(port=ptys().path, channels=["a"], read_timeout=2.0)
    else:
        source = sources(port=str(tmp_path / "absent"), channels=["a"], reconnect_initial=30, reconnect_max=30)
        source.read(0.05)  # first attempt fails; the next is 30 s away
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(source.read(30.0)), daemon=True)
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()
    started = time.monotonic()
    source.close()
    reader.join(5.0)
    assert not reader.is_alive() and result == [None]
    assert time.monotonic() - started < 5.0
    assert source.closed and not source.health.connected and source._port is None
    assert source.read(1.0) is None


def test_missing_pyserial_is_reported_not_raised(monkeypatch, sources) -> None:
    monkeypatch.setitem(sys.modules, "serial", None)  # `import serial` now raises ImportError
    source = sources(port="/dev/ttyUSB0", channels=["a"])
    assert source.read(0.05) is None
    assert source.read(0.05) is None
    assert source.health.last_error == "pyserial is not installed: pip install 'edge-inference-agent[serial]'"
    assert source.health.errors == 1
    assert "pip install 'edge-inference-agent[serial]'" in source.probe()


def test_module_imports_without_pyserial() -> None:
    code = (
        "import sys; sys.modules['serial'] = None\n"
        "from agent.sources import serial as s\n"
        "c = s.Config(port='/dev/ttyUSB0', channels=['a'])\n"
        "assert s.create(c, 'x').kind == 'row' and s.TYPE == 'serial'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_registry_hooks() -> None:
    config = serial_source.Config(port="loop://", channels=["a"])
    assert serial_source.TYPE == "serial" and serial_source.Config is SerialSourceConfig
    source = serial_source.create(config, "imu")
    assert isinstance(source, SerialSource) and source.name == "imu" and source.kind == "row"
    assert config.baudrate == 115200 and config.parity == "N" and config.stopbits == 1 and config.format == "csv"


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"bogus": 1}, "extra"),
        ({"parity": "X"}, "parity"),
        ({"channels": []}, "channels"),
        ({"channels": ["a", "a"]}, "unique"),
        ({"channels": [" "]}, "empty"),
        ({"baudrate": 11520}, "did you mean 115200"),
        ({"baudrate": 0}, "baudrate"),
        ({"bytesize": 9}, "bytesize"),
        ({"stopbits": 3}, "stopbits"),
        ({"format": "xml"}, "format"),
        ({"read_timeout": 0}, "read_timeout"),
        ({"reconnect_initial": 5, "reconnect_max": 1}, "reconnect_max"),
        ({"max_line_bytes": 0}, "max_line_bytes"),
        ({"delimiter": "\n"}, "delimiter"),
    ],
)
def test_config_validation(options, needle) -> None:
    with pytest.raises(ValidationError, match=needle):
        SerialSourceConfig(**({"port": "/dev/ttyUSB0", "channels": ["a"]} | options))


def test_config_accepts_serial_settings() -> None:
    config = SerialSourceConfig(port="socket://10.0.0.5:4000", channels=["a"], baudrate=250000, stopbits=1.5,
                                parity="E", bytesize=7)  # fmt: skip
    assert (config.baudrate, config.stopbits, config.parity, config.bytesize) == (250000, 1.5, "E", 7)
    with pytest.raises(ValidationError):
        SerialSourceConfig(port="", channels=["a"])
