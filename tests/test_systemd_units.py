"""The systemd files: they verify, they are hardened, and they agree with each other.

Needs systemd's tools (`systemd-analyze`, `systemd-sysusers`, `systemd-tmpfiles`;
Debian package `systemd`). They are required, not optional: without them these
tests fail and say what to install.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from support.procs import require_os_tool

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
DAEMON_UNIT = "ctxstore.service"
READER_UNIT = "ctxstore-reader@.service"
UNITS = (DAEMON_UNIT, READER_UNIT)
MAX_EXPOSURE = 2.0

Unit = dict[str, dict[str, list[str]]]


# --- tools ---------------------------------------------------------------------------------


def _tool(name: str) -> str:
    return require_os_tool(name, "systemd")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def verify_problems(unit_text: str, name: str, directory: Path) -> list[str]:
    """What `systemd-analyze verify` objects to in a unit, or [] when it is clean.

    The unit is written as ``directory/name`` with mode 0644 (verify warns about
    odd file modes of a checkout). systemd reports many mistakes (an unknown
    key, an unparsable value) as warnings it "ignores" while still exiting 0 on
    some versions, so any line that mentions the unit counts as a problem, as
    does a non-zero exit.
    """
    path = directory / name
    path.write_text(unit_text)
    path.chmod(0o644)
    done = _run(_tool("systemd-analyze"), "verify", "--man=no", "--recursive-errors=no", str(path))
    output = (done.stdout + done.stderr).splitlines()
    # systemd names a template after a made-up instance ("x@.service" -> "x@i.service").
    stem = name.partition("@")[0] + "@" if "@" in name else name
    problems = [line for line in output if stem in line or str(path) in line]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}: {output}")
    return problems


def exposure(unit_path: Path) -> float:
    """The overall exposure `systemd-analyze security --offline` gives a unit file."""
    done = _run(_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit_path))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    if match is None:
        pytest.fail(
            "systemd-analyze security --offline=yes gave no figure (it needs systemd >= 250):\n"
            + done.stdout
            + done.stderr
        )
    return float(match.group(1))


# --- unit files as data --------------------------------------------------------------------


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value assigned, in order (systemd's own file syntax)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for line in _logical_lines(text):
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
        else:
            key, sep, value = line.partition("=")
            assert section is not None and sep, f"not a section or an assignment: {line!r}"
            section.setdefault(key.strip(), []).append(value.strip())
    return unit


def _logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""


def _load(name: str) -> Unit:
    return parse_unit((SYSTEMD_DIR / name).read_text())


def _one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def _all(unit: Unit, section: str, key: str) -> list[str]:
    return [word for value in unit.get(section, {}).get(key, []) for word in value.split()]


def _environment(unit: Unit) -> dict[str, str]:
    pairs = (word.partition("=") for word in _all(unit, "Service", "Environment"))
    return {key: value for key, _, value in pairs}


@pytest.fixture(scope="module")
def daemon() -> Unit:
    return _load(DAEMON_UNIT)


@pytest.fixture(scope="module")
def reader() -> Unit:
    return _load(READER_UNIT)


# --- systemd-analyze verify ----------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies(name: str, tmp_path: Path) -> None:
    assert verify_problems((SYSTEMD_DIR / name).read_text(), name, tmp_path) == []


def test_the_follower_drop_in_verifies_over_the_daemon_unit(tmp_path: Path) -> None:
    """systemd/ctxstore-follower.conf (docs/scale-out.md) as installed: a drop-in of
    ctxstore.service; an unknown key in it would be reported against the drop-in."""
    drop_in = tmp_path / f"{DAEMON_UNIT}.d"
    drop_in.mkdir()
    text = (SYSTEMD_DIR / "ctxstore-follower.conf").read_text()
    (drop_in / "follower.conf").write_text(text)
    (drop_in / "follower.conf").chmod(0o644)
    assert verify_problems((SYSTEMD_DIR / DAEMON_UNIT).read_text(), DAEMON_UNIT, tmp_path) == []
    (drop_in / "follower.conf").write_text(text.replace("IPAddressAllow=", "IPAddresAllow="))
    problems = verify_problems((SYSTEMD_DIR / DAEMON_UNIT).read_text(), DAEMON_UNIT, tmp_path)
    assert problems and "follower.conf" in " ".join(problems)


def test_reader_template_instance_verifies(tmp_path: Path) -> None:
    text = (SYSTEMD_DIR / READER_UNIT).read_text()
    assert verify_problems(text, "ctxstore-reader@7.service", tmp_path) == []


# Each breakage is (text to find, replacement); "[Service]\n" inserts a line.
BREAKAGES = {
    "misspelled directive": ("ProtectSystem=strict", "ProtectSystm=strict"),
    "unknown service type": ("[Service]\n", "[Service]\nType=notifyy\n"),
    "unparsable time span": ("[Service]\n", "[Service]\nRestartSec=thirty\n"),
    "unknown address family": ("[Service]\n", "[Service]\nRestrictAddressFamilies=AF_BOGUS\n"),
    "missing executable": ("ExecStart=/usr/bin/env", "ExecStart=/nonexistent/env"),
    "executable not on systemd's path": ("ExecStart=/usr/bin/env ctxstore", "ExecStart=ctxstorez"),
    "no ExecStart": ("ExecStart=", "#ExecStart="),
}


@pytest.mark.parametrize("name", UNITS)
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_unit_fails_verification(name: str, breakage: str, tmp_path: Path) -> None:
    old, new = BREAKAGES[breakage]
    text = (SYSTEMD_DIR / name).read_text()
    assert old in text, f"the breakage {breakage!r} no longer applies to {name}"
    assert verify_problems(text.replace(old, new), name, tmp_path) != []


# --- security exposure ---------------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_security_exposure_at_most_two(name: str) -> None:
    figure = exposure(SYSTEMD_DIR / name)
    assert figure <= MAX_EXPOSURE, f"{name}: exposure {figure} > {MAX_EXPOSURE}"


def test_exposure_figure_catches_a_weak_unit(tmp_path: Path) -> None:
    weak = tmp_path / "weak.service"
    weak.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(weak) > MAX_EXPOSURE


# --- the daemon unit -----------------------------------------------------------------------

DAEMON_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
    "User": "ctxstore",
    "Group": "ctxstore-readers",
    "StateDirectory": "ctxstore",
    "StateDirectoryMode": "0750",
    "RuntimeDirectory": "ctxstore",
    "RuntimeDirectoryMode": "0750",
    "ConfigurationDirectory": "ctxstore",
    "EnvironmentFile": "-/etc/ctxstore/env",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "KeyringMode": "private",
    "DevicePolicy": "closed",
    "IPAddressDeny": "any",
    "IPAddressAllow": "localhost",
}


@pytest.mark.parametrize(("key", "value"), sorted(DAEMON_SERVICE.items()))
def test_daemon_directive(daemon: Unit, key: str, value: str) -> None:
    assert _one(daemon, "Service", key) == value


def test_daemon_runs_ctxstore_daemon(daemon: Unit) -> None:
    argv = _one(daemon, "Service", "ExecStart").split()
    assert PurePosixPath(argv[0]).is_absolute()
    assert argv[argv.index("ctxstore") + 1] == "daemon"


def test_daemon_has_watchdog_and_stop_timeout(daemon: Unit) -> None:
    for key in ("WatchdogSec", "TimeoutStopSec"):
        done = _run(_tool("systemd-analyze"), "timespan", _one(daemon, "Service", key))
        assert done.returncode == 0, done.stderr
        usec = re.search(r"μs: (\d+)", done.stdout)
        assert usec is not None and int(usec.group(1)) > 0, f"{key} must be a positive duration"


def test_umask_keeps_group_read_and_nothing_for_others(daemon: Unit) -> None:
    umask = int(_one(daemon, "Service", "UMask"), 8)
    assert umask & 0o007 == 0o007, "files must not be world-accessible"
    assert umask & 0o040 == 0, "files must be group-readable for the readers group"


def test_daemon_keeps_dev_shm_shared_with_readers(daemon: Unit) -> None:
    # The version table lives in /dev/shm; PrivateDevices= bind-mounts the host's
    # /dev/shm, but these settings would hide it from (or fork it off) the readers.
    service = daemon["Service"]
    for key in ("RootDirectory", "RootImage", "MountAPIVFS"):
        assert key not in service, f"{key}= would replace the /dev the readers share"
    for key in ("InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths"):
        for path in _all(daemon, "Service", key):
            target = path.lstrip("-+").split(":")[0]
            assert not ("/dev/shm".startswith(target) or target.startswith("/dev/shm")), (
                f"{key}={path} covers /dev/shm"
            )


# --- the reader template -------------------------------------------------------------------


def test_reader_joins_the_daemons_group(daemon: Unit, reader: Unit) -> None:
    assert _all(reader, "Service", "SupplementaryGroups") == [_one(daemon, "Service", "Group")]


def test_reader_sees_the_store_read_only(daemon: Unit, reader: Unit) -> None:
    store = f"/var/lib/{_one(daemon, 'Service', 'StateDirectory')}"
    assert store in _all(reader, "Service", "ReadOnlyPaths")
    assert _environment(reader)["CTXSTORE_HOME"] == store


def test_reader_finds_the_socket_without_binding_the_runtime_dir(
    daemon: Unit, reader: Unit
) -> None:
    runtime = f"/run/{_one(daemon, 'Service', 'RuntimeDirectory')}"
    socket_path = PurePosixPath(_environment(reader)["CTXSTORE_SOCKET"])
    assert socket_path.parent == PurePosixPath(runtime)
    # The runtime directory is recreated when the daemon stops and starts; a bind
    # mount of it in the reader's namespace would keep the old one.
    for key in ("ReadOnlyPaths", "BindPaths", "BindReadOnlyPaths", "InaccessiblePaths"):
        for path in _all(reader, "Service", key):
            assert not path.lstrip("-+").startswith(runtime), f"{key}={path}"


def test_reader_outlives_daemon_restarts(reader: Unit) -> None:
    assert DAEMON_UNIT in _all(reader, "Unit", "Wants")
    assert DAEMON_UNIT in _all(reader, "Unit", "After")
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert DAEMON_UNIT not in _all(reader, "Unit", key), f"{key}= stops readers with the daemon"


def test_reader_example_command(reader: Unit) -> None:
    argv = _one(reader, "Service", "ExecStart").split()
    assert argv[argv.index("ctxstore") + 1 :] == ["watch", "%i"]


@pytest.mark.parametrize(
    "key",
    [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "NoNewPrivileges",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "SystemCallArchitectures",
        "RestrictNamespaces",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
    ],
)
def test_reader_shares_the_hardening(daemon: Unit, reader: Unit, key: str) -> None:
    assert _one(reader, "Service", key) == _one(daemon, "Service", key)


# --- sysusers.d and tmpfiles.d -------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An empty filesystem root with the sysusers file applied to it."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    done = _run(_tool("systemd-sysusers"), f"--root={root}", str(SYSTEMD_DIR / "ctxstore.sysusers"))
    assert done.returncode == 0, done.stderr
    return root


def _database(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


def test_sysusers_creates_the_daemon_user_in_the_readers_group(
    daemon: Unit, image_root: Path
) -> None:
    users = _database(image_root / "etc/passwd")
    groups = _database(image_root / "etc/group")
    user, group = _one(daemon, "Service", "User"), _one(daemon, "Service", "Group")
    assert user in users, users
    assert group in groups, groups
    assert users[user][3] == groups[group][2], "the daemon's primary group is the readers group"
    assert users[user][6] in {"/usr/sbin/nologin", "/sbin/nologin"}


def test_sysusers_refuses_a_broken_line(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    broken = tmp_path / "broken.conf"
    broken.write_text("x ctxstore -\n")
    done = _run(_tool("systemd-sysusers"), f"--root={tmp_path}", str(broken))
    assert done.returncode != 0


def test_tmpfiles_matches_the_state_directory(daemon: Unit) -> None:
    lines = [
        line.split()
        for line in (SYSTEMD_DIR / "ctxstore.tmpfiles").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    service = daemon["Service"]
    expected = [
        "d",
        f"/var/lib/{service['StateDirectory'][-1]}",
        service["StateDirectoryMode"][-1],
        service["User"][-1],
        service["Group"][-1],
        "-",
    ]
    assert lines == [expected]


@pytest.mark.skipif(os.geteuid() != 0, reason="creating files owned by ctxstore needs root")
def test_tmpfiles_creates_the_store_directory(daemon: Unit, image_root: Path) -> None:
    done = _run(
        _tool("systemd-tmpfiles"),
        f"--root={image_root}",
        "--create",
        str(SYSTEMD_DIR / "ctxstore.tmpfiles"),
    )
    assert done.returncode == 0, done.stderr
    store = image_root / "var/lib/ctxstore"
    info = store.stat()
    users = _database(image_root / "etc/passwd")
    assert oct(info.st_mode & 0o7777) == oct(int(_one(daemon, "Service", "StateDirectoryMode"), 8))
    assert str(info.st_uid) == users["ctxstore"][2]
    assert str(info.st_gid) == users["ctxstore"][3]
