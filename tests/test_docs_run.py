"""Docs that run: the quick starts in README.md and docs/*.md are executed as written, against real processes.

A block is selected by a marker comment on the line before its fence::

    <!-- doc-test: fleet-quickstart -->
    ```sh
    fleet init
    ```

Blocks with the same name (in one file) run in order as one bash script (``set -e``), so a quick start may be
split by prose. Options after the name: ``cwd=checkout`` runs the script in the repository root (for commands
that read the checkout, e.g. ``agent/samples/...``; the default is a fresh temporary directory) and
``timeout=S`` bounds it (default 240 s).

Each script runs in a network namespace of its own (``unshare --net``; see ``netns_prefix`` for other users) with
only ``lo`` up, so documented default ports are free and nothing on the machine (its own broker, fleet) is
touched; ``HOME`` is a scratch directory; ``PATH`` starts with the virtualenv's ``bin``. The script is the leader
of its own process group: background processes it starts (``... &``) are stopped when it ends. A failure shows
the blocks, the failing command, the output and the tails of the ``*.log`` files the script wrote.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Quick starts that must stay runnable: deleting a marker must not silently drop its test.
REQUIRED = {"readme-quickstart", "fleet-quickstart"}
DEFAULT_TIMEOUT = 240.0

_MARKER = re.compile(
    r"^<!--\s*doc-test:\s*(?P<name>[A-Za-z0-9_.-]+)(?P<opts>[^>]*?)\s*-->[ \t]*\n"
    r"```(?P<lang>[A-Za-z]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$",
    re.M | re.S,
)


@dataclass
class DocScript:
    """The marked blocks of one name in one markdown file, run in order as one script."""

    name: str
    source: Path
    blocks: list[tuple[int, str]] = field(default_factory=list)  # (line of the fence, body)
    cwd: str = "tmp"  # "tmp" or "checkout"
    timeout: float = DEFAULT_TIMEOUT

    @property
    def text(self) -> str:
        return "".join(body for _, body in self.blocks)

    def describe(self) -> str:
        rel = self.source.relative_to(ROOT) if self.source.is_relative_to(ROOT) else self.source
        parts = [f"--- {rel}:{line}\n{body}" for line, body in self.blocks]
        return "".join(parts)


def extract(markdown: str, source: Path) -> dict[str, DocScript]:
    """The doc-test scripts in ``markdown``, by name. Raises ``ValueError`` on a bad marker or fence language."""
    scripts: dict[str, DocScript] = {}
    for match in _MARKER.finditer(markdown):
        name, lang = match["name"], match["lang"]
        line = markdown.count("\n", 0, match.start("lang")) + 1
        if lang not in ("sh", "bash", "shell"):
            raise ValueError(f"{source}:{line}: doc-test block {name!r} is ```{lang}, not a shell block")
        script = scripts.setdefault(name, DocScript(name, source))
        for opt in match["opts"].split():
            key, _, value = opt.partition("=")
            if key == "cwd" and value in ("tmp", "checkout"):
                script.cwd = value
            elif key == "timeout" and value.replace(".", "", 1).isdigit():
                script.timeout = float(value)
            else:
                raise ValueError(f"{source}:{line}: unknown doc-test option {opt!r} (cwd=tmp|checkout, timeout=S)")
        script.blocks.append((line, match["body"]))
    return scripts


def collect() -> list[DocScript]:
    found: list[DocScript] = []
    for doc in DOCS:
        found.extend(extract(doc.read_text(encoding="utf-8"), doc).values())
    return found


def netns_prefix() -> list[str] | None:
    """The command that runs a program in a fresh network namespace, or None when this machine cannot.

    Root: ``unshare --net``. Others: a user namespace mapping them to root (to bring ``lo`` up), then a nested
    one mapping them back to their own uid, so that programs behave as they do for that user (Mosquitto started
    as "root" would try to drop to its own user, which does not exist in the namespace).
    """
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        return None
    if os.geteuid() == 0:
        prefix = [unshare, "--net"]
    else:
        inner = f'ip link set lo up && exec {unshare} --map-user={os.geteuid()} --map-group={os.getegid()} "$@"'
        prefix = [unshare, "--map-root-user", "--net", "bash", "-c", inner, "doc-test"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


_PRELUDE = """\
set -e
trap 'echo "doc-test: FAILED (exit $?): $BASH_COMMAND" >&2' ERR
ip link set lo up 2>/dev/null || true
"""


def _stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_script(script: DocScript, prefix: list[str], workdir: Path) -> tuple[int | None, str]:
    """Run ``script`` under ``prefix`` (the netns command); returns (exit status or None on timeout, output)."""
    home = workdir / ".home"
    home.mkdir()
    script_file = workdir / ".doc-test.sh"
    script_file.write_text(_PRELUDE + script.text)
    out_file = workdir / ".doc-test.out"
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "XDG_"))}
    env.pop("COLUMNS", None)  # output as a user sees it in a pipe or a log: 80 columns
    env |= {"HOME": str(home), "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", "PYTHONUNBUFFERED": "1"}
    cwd = ROOT if script.cwd == "checkout" else workdir
    with out_file.open("wb") as out:
        proc = subprocess.Popen(
            [*prefix, "bash", str(script_file)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status: int | None = proc.wait(script.timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            _stop_group(proc.pid)
            proc.wait(10)
    return status, out_file.read_text(errors="replace")


def failure_report(script: DocScript, status: int | None, output: str, workdir: Path) -> str:
    failed = [ln for ln in output.splitlines() if ln.startswith("doc-test: FAILED")]
    what = failed[-1] if failed else f"timed out after {script.timeout:.0f} s"
    if status is not None and not failed:
        what = f"exit status {status}"
    logs = [
        f"--- {path.relative_to(workdir)} (last 40 lines)\n{_tail(path, 40)}"
        for path in sorted(workdir.rglob("*.log"))
        if path.is_file()
    ]
    out = "\n".join(output.splitlines()[-120:])
    return (
        f"doc-test {script.name!r} failed: {what}\n"
        f"=== blocks\n{script.describe()}=== output (last 120 lines)\n{out}\n" + "\n".join(logs)
    )


# --------------------------------------------------------------------------------------------- the extractor


def test_extract_joins_marked_blocks_and_reads_options() -> None:
    md = (
        "# Title\n\n<!-- doc-test: quick cwd=checkout timeout=30 -->\n```sh\necho one\n```\n\nprose\n\n"
        "```sh\necho not marked\n```\n\n<!-- doc-test: quick -->\n```bash\necho two\n```\n"
    )
    scripts = extract(md, Path("x.md"))
    assert list(scripts) == ["quick"]
    quick = scripts["quick"]
    assert quick.text == "echo one\necho two\n"
    assert [line for line, _ in quick.blocks] == [4, 15]
    assert quick.cwd == "checkout" and quick.timeout == 30.0


@pytest.mark.parametrize(
    ("md", "needle"),
    [
        ("<!-- doc-test: q -->\n```toml\na = 1\n```\n", "not a shell block"),
        ("<!-- doc-test: q where=else -->\n```sh\ntrue\n```\n", "unknown doc-test option"),
    ],
)
def test_extract_refuses_bad_markers(md: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        extract(md, Path("x.md"))


def test_required_quick_starts_are_marked() -> None:
    names = {s.name for s in collect()}
    assert names >= REQUIRED, f"missing doc-test markers: {sorted(REQUIRED - names)}"


# --------------------------------------------------------------------------------------------- the docs


@pytest.mark.parametrize("script", collect(), ids=lambda s: f"{s.source.name}:{s.name}")
def test_doc_commands_run_as_written(script: DocScript) -> None:
    prefix = netns_prefix()
    if prefix is None:
        reason = "cannot create a network namespace here (unshare --net / unshare -rn refused)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    # Not under pytest's 0700 tmp tree: a broker started by the doc drops to its own user and must read its files.
    workdir = Path(tempfile.mkdtemp(prefix=f"doc-test-{script.name}-"))
    workdir.chmod(0o755)
    try:
        status, output = run_script(script, prefix, workdir)
        if status != 0:
            pytest.fail(failure_report(script, status, output, workdir), pytrace=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
