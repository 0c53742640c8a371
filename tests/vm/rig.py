#!/usr/bin/env python3
"""Build and boot the broker test VM (Python standard library only).

Subcommands, each runnable as `python3 tests/vm/rig.py SUBCOMMAND`:

image
    mmdebstrap builds a Debian 12 root filesystem from the host's apt sources.
    `mkfs.ext4 -d` turns it into root.img, and the kernel and initrd are copied
    out of its /boot. The result is cached in $BROKER_VM_CACHE/<recipe hash>/.
    The hash covers the package list, every hook and guest file, and
    RIG_VERSION, so any change to the recipe builds a new image. A build runs in
    a temporary directory that is renamed into place only when it is complete.
wheelhouse
    pip downloads the project's third-party dependencies and pytest as CPython
    3.11 manylinux x86_64 wheels (the guest runs Debian's python3 3.11). They
    are cached in $BROKER_VM_CACHE/wheelhouse-<hash>/, keyed by the dependency
    list. The project's own wheel is rebuilt on every call because it carries
    the BPF objects that `make bpf` has just built.
run SCRIPT
    Prepares a share directory with a copy of the project tree, the wheelhouse,
    SCRIPT and a generated run.sh, and boots the image with qemu. In the guest,
    broker-vm-runner.service mounts the share over 9p, waits until boot has
    finished, and runs run.sh. That script installs the project with
    `scripts/install --no-apt --wheelhouse` and then runs SCRIPT. The runner
    copies the output to the share, the kernel console (ttyS0) and the second
    serial port (ttyS1), which the rig streams to its own stdout. Then the
    runner writes the exit code to the share and powers off. The rig exits with
    the script's exit code, 124 on timeout, or 125 when the rig itself failed.

    The boot disk is a qcow2 overlay of root.img, attached with snapshot=on, so
    every boot starts from the same state. One earlier boot prepared the
    overlay: it ran scripts/install and kept only the venv with the
    dependencies, so a run does not install numpy, scipy and scikit-learn
    again. The overlay is cached beside root.img, keyed by the wheelhouse and
    scripts/install. BROKER_VM_PREPARED=0 boots root.img itself instead.
demo
    Runs tests/vm/demo.sh in the VM.

The VM has no network card (`-nic none`), so only loopback exists inside it.
The rig holds a lock for the whole boot and waits for any other qemu on the host
to end first, so at most one VM runs at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

log = logging.getLogger("rig")

# Bump when the build steps change in a way the recipe text below does not show.
RIG_VERSION = 1

PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path("/var/cache/broker-vm")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
HOST_SOURCES = (
    Path("/etc/apt/sources.list.d/debian.sources"),
    Path("/etc/apt/sources.list"),
)

SUITE = "bookworm"
GUEST_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "procps",
    "initramfs-tools",
    "linux-image-amd64",
    "python3",
    "python3-venv",
    "iproute2",
    "libbpf1",
    "curl",
    "wrk",
    "iperf3",
)
# Documentation, translations, and drivers that a headless VM without a network
# card never loads.
DPKG_PATH_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/gpu/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/media/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/net/wireless/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/infiniband/*",
    "path-exclude=/usr/lib/modules/*/kernel/drivers/staging/*",
    "path-exclude=/usr/lib/modules/*/kernel/sound/*",
)
HOSTNAME = "broker-vm"
SHARE_TAG = "broker"
GUEST_SHARE = "/mnt/broker"
GUEST_STREAM = "/dev/ttyS1"

# Lines the guest runner and run.sh print, so the host can time the phases.
START_MARK = "BROKER-VM-START"
SCRIPT_MARK = "BROKER-VM-SCRIPT"
END_MARK = "BROKER-VM-END"

# The kernel's postinst builds the initrd with only these modules (6.5 MB,
# against about 36 MB with MODULES=most). 9p and 9pnet_virtio are not needed
# to mount the root disk, so the runner loads them after boot.
INITRAMFS_CONF = "MODULES=list\n"
INITRAMFS_MODULES = "virtio_pci\nvirtio_blk\next4\n"

RUNNER = f"""#!/bin/bash
# Runs in the broker test VM from broker-vm-runner.service: mount the 9p share,
# wait until boot has finished, run the share's run.sh, record its output and
# exit code in the share, then power off.
set -u
share={GUEST_SHARE}
stream={GUEST_STREAM}

uptime_s() {{ cut -d' ' -f1 /proc/uptime; }}
note() {{ echo "$*" | tee -a "$stream" >/dev/console; }}
finish() {{
    sync
    grep -qw broker_vm.keep_running /proc/cmdline || systemctl --no-block poweroff
}}
trap finish EXIT

# Raw mode, so the host reads the bytes as written (no CR before each LF).
stty -F "$stream" raw -echo
modprobe -q 9pnet_virtio
modprobe -q 9p
mkdir -p "$share"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {SHARE_TAG} "$share"
then
    note "{START_MARK} error=no-9p-share uptime=$(uptime_s)"
    exit 0
fi

# The broker's BPF probe attaches to tracepoints, which libbpf finds in tracefs.
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing

state=$(timeout 300 systemctl is-system-running --wait)
note "{START_MARK} uptime=$(uptime_s) system=$state"
bash "$share/run.sh" 2>&1 | tee "$share/out.log" "$stream" >/dev/console
rc=${{PIPESTATUS[0]}}
echo "$rc" >"$share/rc"
note "{END_MARK} rc=$rc uptime=$(uptime_s)"
"""

# Type=exec, not oneshot: a oneshot unit after multi-user.target would keep the
# system "starting", and `systemctl is-system-running --wait` would never return.
RUNNER_UNIT = """[Unit]
Description=Run the broker test VM's job from the 9p share, then power off
After=multi-user.target

[Service]
Type=exec
ExecStart=/usr/local/sbin/broker-vm-runner
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

FSTAB = "/dev/vda / ext4 rw,relatime,errors=remount-ro 0 1\n"

# Guest files by stage: "essential" files are in place before the kernel
# package is configured, "customize" files are added at the end.
ESSENTIAL_FILES = {
    "/etc/initramfs-tools/conf.d/broker-vm": INITRAMFS_CONF,
    "/usr/share/initramfs-tools/modules.d/broker-vm": INITRAMFS_MODULES,
}
CUSTOMIZE_FILES = {
    "/etc/hostname": HOSTNAME + "\n",
    "/etc/fstab": FSTAB,
    "/usr/local/sbin/broker-vm-runner": RUNNER,
    "/etc/systemd/system/broker-vm-runner.service": RUNNER_UNIT,
}
# Shell commands that mmdebstrap runs with the root filesystem path as "$1".
CUSTOMIZE_COMMANDS = (
    'chmod 0755 "$1/usr/local/sbin/broker-vm-runner"',
    'chroot "$1" passwd --delete root',
    'chroot "$1" systemctl enable broker-vm-runner.service',
    (
        'chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer'
        " e2scrub_all.timer fstrim.timer systemd-timesyncd.service"
    ),
    # An empty machine-id makes systemd generate a fresh one on every boot.
    ': > "$1/etc/machine-id"',
)

# Prepared overlays kept per image. Each contains a venv of about 350 MB.
KEEP_PREPARED_DISKS = 3

# Free space left in root.img for the guest's venv and test data, in MiB.
IMAGE_HEADROOM_MIB = 1024

VM_MEMORY = "2G"
VM_CPUS = 2
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0 panic=-1"
DEFAULT_TIMEOUT = 1200.0
OTHER_VM_WAIT = 1800.0

# /dev/kvm ioctls from <linux/kvm.h>: _IO(KVMIO=0xAE, 0x00) and _IO(KVMIO, 0x01).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12

GUEST_PYTHON = "3.11"
GUEST_GLIBC_MINOR = 36  # Debian 12 ships glibc 2.36
EXTRA_WHEELS = ("pytest",)

# Parts of the project tree copied into the share.
PROJECT_PARTS = (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "Makefile",
    "broker",
    "bpf",
    "scripts",
    "systemd",
    "policies",
    "tests",
)
COPY_IGNORE = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".mypy_cache", "build"
)

GUEST_WHEELHOUSE = f"{GUEST_SHARE}/wheelhouse"
GUEST_PIP = "/opt/broker/bin/pip"
PIP_INSTALL_EXTRAS = (
    f"{GUEST_PIP} install --quiet --disable-pip-version-check --no-index"
    f" --find-links {GUEST_WHEELHOUSE} {' '.join(EXTRA_WHEELS)}"
)
# run.sh of a run: install the project as an admin would, then run the script.
RUN_BODY = f"""bash scripts/install --no-apt --wheelhouse {GUEST_WHEELHOUSE}
/opt/broker/bin/python -c 'import pytest' 2>/dev/null || {PIP_INSTALL_EXTRAS}
echo "{SCRIPT_MARK} uptime=$(cut -d' ' -f1 /proc/uptime)"
exec {GUEST_SHARE}/script
"""
# run.sh of the prepared disk: the same install, after which only the venv with
# the dependencies (bytecode compiled) stays. Measured under TCG on a 2-core
# host, this saves each run about 4 minutes: 60 s for `python3 -m venv` and
# 175 s for pip to install and compile numpy, scipy and scikit-learn.
PREPARE_BODY = f"""bash scripts/install --no-apt --wheelhouse {GUEST_WHEELHOUSE}
{PIP_INSTALL_EXTRAS}
{GUEST_PIP} uninstall --yes --quiet broker
rm -f /usr/local/bin/broker /etc/systemd/system/broker.service
rm -rf /etc/broker
"""

EXIT_TIMEOUT = 124
EXIT_RIG_FAILED = 125


class RigError(Exception):
    """A rig step failed; the message names the step and what to check."""


@dataclass(frozen=True)
class Image:
    """A built VM image: root filesystem, kernel and initrd."""

    directory: Path
    root_img: Path
    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class Disk:
    """The VM's root disk; with snapshot=on, qemu discards every write at exit."""

    path: Path
    format: str  # "raw" or "qcow2"
    snapshot: bool = True


@dataclass(frozen=True)
class RunResult:
    """The outcome of one VM boot."""

    exit_code: int
    share: Path
    output_log: Path
    console_log: Path
    timings: dict[str, float]


# --------------------------------------------------------------------------
# Common helpers
# --------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("BROKER_VM_CACHE") or DEFAULT_CACHE)


def run_command(command: list[str], step: str, **kwargs: object) -> None:
    """Run a command and raise RigError naming the step if it fails."""
    log.debug("running %s", " ".join(command))
    try:
        subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise RigError(f"{step}: {command[0]} not found; install it first") from exc
    except subprocess.CalledProcessError as exc:
        raise RigError(f"{step} failed: exit code {exc.returncode}") from exc


@contextlib.contextmanager
def file_lock(path: Path, purpose: str) -> Iterator[None]:
    """Hold an exclusive flock on PATH, logging once when another holder waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another rig process to finish %s", purpose)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def content_hash(recipe: object) -> str:
    text = json.dumps(recipe, sort_keys=True, indent=0)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def remove_stale_builds(root: Path, prefix: str) -> None:
    """Remove temporary build directories left by an interrupted build.

    Call this only while holding the build lock, so no build is running.
    """
    for stale in root.glob(prefix + "*"):
        log.info("removing unfinished build %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(source, target)


# --------------------------------------------------------------------------
# image
# --------------------------------------------------------------------------


def image_recipe() -> dict[str, object]:
    """Return every input of the image build, the key of the image cache."""
    return {
        "rig_version": RIG_VERSION,
        "suite": SUITE,
        "packages": list(GUEST_PACKAGES),
        "dpkg_options": list(DPKG_PATH_EXCLUDES),
        "essential_files": ESSENTIAL_FILES,
        "customize_files": CUSTOMIZE_FILES,
        "customize_commands": list(CUSTOMIZE_COMMANDS),
        "headroom_mib": IMAGE_HEADROOM_MIB,
    }


def image_paths(directory: Path) -> Image:
    return Image(
        directory=directory,
        root_img=directory / "root.img",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
    )


def ensure_image(rebuild: bool = False) -> Image:
    """Return the cached image for the current recipe, building it if absent."""
    root = cache_root()
    final = root / content_hash(image_recipe())
    with file_lock(root / "image.lock", "an image build"):
        if final.exists() and not rebuild:
            log.info("image: cached at %s", final)
            return image_paths(final)
        remove_stale_builds(root, ".image-")
        started = time.monotonic()
        building = Path(tempfile.mkdtemp(prefix=".image-", dir=root))
        building.chmod(0o755)  # apt's sandbox user _apt reads the rootfs inside
        build_image(building)
        if final.exists():
            shutil.rmtree(final)
        building.rename(final)
        log.info("image: built in %.1f s at %s", time.monotonic() - started, final)
    return image_paths(final)


def build_image(directory: Path) -> None:
    """Build root.img, vmlinuz, initrd.img and manifest.json in DIRECTORY."""
    rootfs = directory / "rootfs"
    started = time.monotonic()
    run_mmdebstrap(rootfs, write_guest_files(directory / "files"))
    bootstrap_seconds = time.monotonic() - started

    image = image_paths(directory)
    kernel_version = copy_boot_files(rootfs, image)
    rootfs_mib = make_ext4(rootfs, image.root_img)
    shutil.rmtree(rootfs)
    shutil.rmtree(directory / "files")

    manifest = {
        "recipe": image_recipe(),
        "kernel": kernel_version,
        "rootfs_mib": rootfs_mib,
        "bootstrap_seconds": round(bootstrap_seconds, 1),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info(
        "image: mmdebstrap %.1f s, rootfs %d MiB, kernel %s",
        bootstrap_seconds,
        rootfs_mib,
        kernel_version,
    )


def write_guest_files(directory: Path) -> dict[str, dict[str, Path]]:
    """Write the guest files to DIRECTORY; return guest path -> host path by stage."""
    staged: dict[str, dict[str, Path]] = {}
    stages = (("essential", ESSENTIAL_FILES), ("customize", CUSTOMIZE_FILES))
    for stage, files in stages:
        staged[stage] = {}
        for number, (guest_path, text) in enumerate(sorted(files.items())):
            host_path = directory / f"{stage}-{number}"
            host_path.parent.mkdir(parents=True, exist_ok=True)
            host_path.write_text(text)
            staged[stage][guest_path] = host_path
    return staged


def upload_hooks(kind: str, files: dict[str, Path]) -> list[str]:
    """Return mmdebstrap hook options that create the parent and upload each file."""
    hooks = []
    for guest_path, host_path in files.items():
        parent = str(Path(guest_path).parent)
        hooks.append(f'--{kind}-hook=mkdir -p "$1{parent}"')
        hooks.append(f"--{kind}-hook=upload {host_path} {guest_path}")
    return hooks


def host_apt_sources() -> str:
    """Return the mirror argument for mmdebstrap: the host's Debian sources file.

    BROKER_VM_SOURCES overrides it. A host without Debian sources (Ubuntu, for
    one) gets the Debian mirror, because the image is Debian 12.
    """
    override = os.environ.get("BROKER_VM_SOURCES")
    if override:
        return override
    for path in HOST_SOURCES:
        if path.is_file() and "debian" in path.read_text():
            return str(path)
    return DEBIAN_MIRROR


def run_mmdebstrap(rootfs: Path, files: dict[str, dict[str, Path]]) -> None:
    command = [
        "mmdebstrap",
        "--mode=root",
        "--variant=apt",
        "--include=" + ",".join(GUEST_PACKAGES),
        "--dpkgopt=force-unsafe-io",
    ]
    command += [f"--dpkgopt={option}" for option in DPKG_PATH_EXCLUDES]
    command += upload_hooks("essential", files["essential"])
    command += upload_hooks("customize", files["customize"])
    command += [f"--customize-hook={hook}" for hook in CUSTOMIZE_COMMANDS]
    sources = host_apt_sources()
    if sources == DEBIAN_MIRROR and DEBIAN_KEYRING.is_file():
        # A non-Debian host (Ubuntu) does not trust Debian's archive keys.
        command.append(f"--keyring={DEBIAN_KEYRING}")
    command += [SUITE, str(rootfs), sources]
    run_command(command, "mmdebstrap", stdin=subprocess.DEVNULL)


def copy_boot_files(rootfs: Path, image: Image) -> str:
    """Copy the kernel and initrd out of the root filesystem; return the version."""
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RigError(f"image: expected one kernel in {rootfs}/boot, found {kernels}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[0], image.kernel)
    shutil.copyfile(rootfs / "boot" / f"initrd.img-{version}", image.initrd)
    return version


def make_ext4(rootfs: Path, root_img: Path) -> int:
    """Write ROOTFS into a sparse ext4 image; return the tree's size in MiB."""
    usage = subprocess.run(
        ["du", "-sm", str(rootfs)], check=True, capture_output=True, text=True
    )
    rootfs_mib = int(usage.stdout.split()[0])
    size_mib = rootfs_mib * 13 // 10 + IMAGE_HEADROOM_MIB
    command = ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(rootfs)]
    run_command(command + [str(root_img), f"{size_mib}M"], "mkfs.ext4")
    return rootfs_mib


# --------------------------------------------------------------------------
# wheelhouse
# --------------------------------------------------------------------------


def project_dependencies(project: Path) -> list[str]:
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    return list(pyproject["project"]["dependencies"])


def wheel_platforms() -> list[str]:
    """Return the manylinux tags the guest's glibc accepts, newest first.

    pip does not expand a custom --platform to older glibc versions, so every
    tag is listed.
    """
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(GUEST_GLIBC_MINOR, 16, -1)]
    return tags + ["manylinux2014_x86_64", "linux_x86_64"]


def wheelhouse_recipe(project: Path) -> dict[str, object]:
    return {
        "rig_version": RIG_VERSION,
        "requirements": project_dependencies(project) + list(EXTRA_WHEELS),
        "python": GUEST_PYTHON,
        "platforms": wheel_platforms(),
    }


def ensure_dependency_wheels(project: Path) -> Path:
    """Return the cached directory of third-party wheels, downloading if absent."""
    root = cache_root()
    recipe = wheelhouse_recipe(project)
    final = root / f"wheelhouse-{content_hash(recipe)}"
    with file_lock(root / "wheelhouse.lock", "a wheelhouse build"):
        if final.exists():
            log.info("wheelhouse: cached at %s", final)
            return final
        remove_stale_builds(root, ".wheelhouse-")
        started = time.monotonic()
        building = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=root))
        download_wheels(recipe, building)
        building.rename(final)
    size_mib = sum(p.stat().st_size for p in final.iterdir()) / 2**20
    log.info(
        "wheelhouse: %d wheels, %.0f MiB, downloaded in %.1f s to %s",
        len(list(final.iterdir())),
        size_mib,
        time.monotonic() - started,
        final,
    )
    return final


def download_wheels(recipe: dict[str, object], directory: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
    command += ["--only-binary=:all:", "--dest", str(directory)]
    command += ["--python-version", str(recipe["python"]), "--implementation", "cp"]
    command += ["--abi", "cp" + str(recipe["python"]).replace(".", "")]
    for platform in recipe["platforms"]:  # type: ignore[attr-defined]
        command += ["--platform", platform]
    command += list(recipe["requirements"])  # type: ignore[call-overload]
    run_command(command, "pip download")


def build_bpf(project: Path) -> None:
    """Build broker/bpf/*.bpf.o with `make bpf`, so the wheel ships fresh objects."""
    if not list((project / "bpf").glob("*.bpf.c")):
        log.info("bpf: no BPF sources in %s/bpf, nothing to build", project)
        return
    run_command(["make", "-C", str(project), "--no-print-directory", "bpf"], "make bpf")


def build_project_wheel(source: Path, directory: Path) -> Path:
    """Build the project's wheel from SOURCE into DIRECTORY and return its path."""
    for old in directory.glob("broker-*.whl"):
        old.unlink()
    command = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check"]
    command += ["--quiet", "--no-deps", "--wheel-dir", str(directory), str(source)]
    run_command(command, "pip wheel of the project")
    # pip builds in the source tree; its build/ and broker.egg-info would be
    # found by tools that search the working directory in the guest.
    shutil.rmtree(source / "build", ignore_errors=True)
    for egg_info in source.glob("*.egg-info"):
        shutil.rmtree(egg_info)
    wheels = list(directory.glob("broker-*.whl"))
    if len(wheels) != 1:
        raise RigError(f"pip wheel: expected one broker wheel, found {wheels}")
    return wheels[0]


def assemble_wheelhouse(source: Path, dependencies: Path, directory: Path) -> None:
    """Fill DIRECTORY with the cached dependency wheels and a fresh project wheel."""
    directory.mkdir(parents=True, exist_ok=True)
    for wheel in dependencies.iterdir():
        target = directory / wheel.name
        if not target.exists():
            link_or_copy(wheel, target)
    wheel = build_project_wheel(source, directory)
    log.info("wheelhouse: project wheel %s", wheel.name)


# --------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------


def copy_project(project: Path, target: Path) -> None:
    """Copy the parts of the project tree that the guest uses."""
    target.mkdir(parents=True)
    for part in PROJECT_PARTS:
        source = project / part
        if source.is_dir():
            shutil.copytree(source, target / part, ignore=COPY_IGNORE)
        elif source.is_file():
            shutil.copy2(source, target / part)


def shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def write_run_script(share: Path, body: str, env: dict[str, str]) -> None:
    """Write the share's run.sh: the common environment, then BODY."""
    exports = "".join(
        f"export {name}={shell_quote(value)}\n" for name, value in env.items()
    )
    text = f"""#!/bin/bash
# Generated by tests/vm/rig.py. Runs in the test VM as root.
set -eu
export BROKER_VM_SHARE={GUEST_SHARE}
export BROKER_VM_PROJECT={GUEST_SHARE}/project
export BROKER_VM_GUEST=1
export PYTHONDONTWRITEBYTECODE=1
{exports}cd "$BROKER_VM_PROJECT"
{body}"""
    (share / "run.sh").write_text(text)
    (share / "run.sh").chmod(0o755)


def prepare_share(share: Path, script: Path | None, dependencies: Path) -> None:
    """Fill SHARE with a project copy, the wheelhouse and SCRIPT."""
    share.mkdir(parents=True, exist_ok=True)
    # Guest tests run servers as unprivileged users from the project copy, so the
    # share must be readable by all (mkdtemp creates it 0700).
    share.chmod(0o755)
    for leftover in ("out.log", "rc", "console.log", "qemu.log", "project"):
        path = share / leftover
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    copy_project(PROJECT, share / "project")
    assemble_wheelhouse(share / "project", dependencies, share / "wheelhouse")
    if script is not None:
        shutil.copy2(script, share / "script")
        (share / "script").chmod(0o755)


# --------------------------------------------------------------------------
# Prepared disk: the image plus a venv with the dependencies installed
# --------------------------------------------------------------------------


def prepared_disk_path(image: Image, dependencies: Path) -> Path:
    """Return the overlay's path, keyed by everything that shapes its content."""
    recipe = {
        "rig_version": RIG_VERSION,
        "image": image.directory.name,
        "wheels": dependencies.name,
        "install": (PROJECT / "scripts" / "install").read_text(),
        "body": PREPARE_BODY,
    }
    return image.directory / f"prepared-{content_hash(recipe)}.qcow2"


def ensure_disk(image: Image, dependencies: Path, out: TextIO) -> Disk:
    """Return the disk to boot: the prepared overlay unless BROKER_VM_PREPARED=0."""
    if os.environ.get("BROKER_VM_PREPARED", "1") == "0":
        return Disk(image.root_img, "raw")
    final = prepared_disk_path(image, dependencies)
    with file_lock(cache_root() / "prepare.lock", "a prepared disk"):
        if final.exists():
            log.info("prepared disk: cached at %s", final)
        else:
            build_prepared_disk(image, dependencies, final, out)
    return Disk(final, "qcow2")


def build_prepared_disk(
    image: Image, dependencies: Path, final: Path, out: TextIO
) -> None:
    """Boot once on a new overlay that keeps the venv that scripts/install made."""
    remove_stale_builds(image.directory, ".prepared-")
    building = image.directory / f".{final.name}"
    command = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw"]
    command += ["-b", str(image.root_img), str(building)]
    run_command(command, "qemu-img create")

    share = Path(tempfile.mkdtemp(prefix="broker-vm-prepare-"))
    prepare_share(share, None, dependencies)
    write_run_script(share, PREPARE_BODY, {})
    log.info("prepared disk: installing the dependencies once, share %s", share)
    disk = Disk(building, "qcow2", snapshot=False)
    result = boot_vm(image, disk, share, DEFAULT_TIMEOUT, out)
    if result.exit_code != 0:
        raise RigError(f"preparing the disk failed; see {result.output_log}")
    building.rename(final)
    shutil.rmtree(share)
    log.info("prepared disk: %s", final)
    remove_old_prepared_disks(image)


def remove_old_prepared_disks(image: Image) -> None:
    """Remove all but the newest KEEP_PREPARED_DISKS overlays of IMAGE.

    Checkouts with different wheelhouses share the cache, so more than one is
    kept: otherwise two branches would keep deleting each other's overlay.
    """
    disks = sorted(
        image.directory.glob("prepared-*.qcow2"),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for old in disks[KEEP_PREPARED_DISKS:]:
        log.info("prepared disk: removing the oldest overlay %s", old)
        old.unlink()


# --------------------------------------------------------------------------
# Booting
# --------------------------------------------------------------------------


def kvm_usable() -> bool:
    """Return True if /dev/kvm is a hardware KVM that can create a VM.

    kvm_pvm (a software hypervisor behind /dev/kvm on some cloud VMs) runs only
    guest kernels built for it, and Debian's stock kernel hangs or faults there.
    """
    kvm = Path("/dev/kvm")
    if not kvm.is_char_device() or Path("/sys/module/kvm_pvm").exists():
        return False
    try:
        fd = os.open(kvm, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != KVM_API_VERSION:
            return False
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def choose_accelerator() -> str:
    """Return "kvm" or "tcg": BROKER_VM_ACCEL if set, else what the host supports."""
    requested = os.environ.get("BROKER_VM_ACCEL", "auto")
    if requested in ("kvm", "tcg"):
        return requested
    if requested != "auto":
        raise RigError(
            f"BROKER_VM_ACCEL={requested!r} is invalid; use kvm, tcg or auto"
        )
    return "kvm" if kvm_usable() else "tcg"


def qemu_command(image: Image, disk: Disk, share: Path, accel: str) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg"]
    if accel == "tcg":
        cpu += ["-cpu", "max"]
    drive = f"file={disk.path},if=virtio,format={disk.format}"
    if disk.snapshot:
        drive += ",snapshot=on"
    share_device = (
        f"local,path={share},mount_tag={SHARE_TAG},security_model=none,id={SHARE_TAG}"
    )
    # ttyS0 is the kernel console, ttyS1 carries only the runner's output.
    return [
        "qemu-system-x86_64",
        *cpu,
        "-machine", "q35",
        "-m", VM_MEMORY,
        "-smp", str(VM_CPUS),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-nic", "none",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", KERNEL_APPEND,
        "-drive", drive,
        "-virtfs", share_device,
        "-serial", f"file:{share / 'console.log'}",
        "-serial", "stdio",
    ]  # fmt: skip


def running_qemu_pids() -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().startswith("qemu-system"):
                pids.append(int(comm.parent.name))
    return pids


def wait_for_other_vms(limit: float) -> None:
    """Wait until no other qemu runs on the host, so VMs never share the CPUs."""
    deadline = time.monotonic() + limit
    reported = False
    while pids := running_qemu_pids():
        if time.monotonic() > deadline:
            raise RigError(f"another VM (qemu pid {pids}) still runs after {limit} s")
        if not reported:
            log.info("waiting for the running VM (qemu pid %s) to end", pids)
            reported = True
        time.sleep(5)


class GuestStream:
    """Copier of the guest's ttyS1 output to a text stream, timing the markers."""

    def __init__(self, out: TextIO, started: float):
        self.out = out
        self.started = started
        self.marks: dict[str, float] = {}
        self.partial = ""

    def feed(self, data: bytes) -> None:
        text = data.decode("utf-8", errors="replace")
        self.out.write(text)
        self.out.flush()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            self.record_mark(line)

    def record_mark(self, line: str) -> None:
        for mark in (START_MARK, SCRIPT_MARK, END_MARK):
            if line.startswith(mark) and mark not in self.marks:
                self.marks[mark] = time.monotonic() - self.started

    def timings(self) -> dict[str, float]:
        names = {START_MARK: "boot_to_runner", SCRIPT_MARK: "boot_to_script"}
        timings = {"total": time.monotonic() - self.started}
        timings.update({names[m]: t for m, t in self.marks.items() if m in names})
        return timings


def pump_output(
    process: subprocess.Popen[bytes], stream: GuestStream, limit: float
) -> bool:
    """Copy qemu's stdout into STREAM until EOF; return False if LIMIT passed first."""
    assert process.stdout is not None
    deadline = time.monotonic() + limit
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not selector.select(timeout=min(remaining, 5.0)):
                continue
            data = os.read(process.stdout.fileno(), 65536)
            if not data:
                return True
            stream.feed(data)


def stop_qemu(process: subprocess.Popen[bytes], finished: bool) -> None:
    """Reap qemu; kill it by pid if it timed out or does not exit by itself."""
    if finished:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
            return
    log.warning("killing qemu pid %d", process.pid)
    process.kill()
    process.wait()


def boot_vm(
    image: Image, disk: Disk, share: Path, timeout: float, out: TextIO
) -> RunResult:
    """Boot the VM on DISK with SHARE, stream ttyS1 to OUT, return the outcome."""
    with file_lock(cache_root() / "vm.lock", "its VM"):
        wait_for_other_vms(OTHER_VM_WAIT)
        accel = choose_accelerator()
        log.info("qemu: booting %s with %s, timeout %.0f s", disk.path, accel, timeout)
        stream = GuestStream(out, time.monotonic())
        with open(share / "qemu.log", "wb") as qemu_log:
            process = subprocess.Popen(
                qemu_command(image, disk, share, accel),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=qemu_log,
            )
            finished = False
            try:
                finished = pump_output(process, stream, timeout)
            finally:
                stop_qemu(process, finished)
    result = RunResult(
        exit_code=read_exit_code(share, finished),
        share=share,
        output_log=share / "out.log",
        console_log=share / "console.log",
        timings=stream.timings(),
    )
    log_timings(result)
    return result


def read_exit_code(share: Path, finished: bool) -> int:
    if not finished:
        log.error("the VM timed out and was killed; console: %s", share / "console.log")
        return EXIT_TIMEOUT
    try:
        return int((share / "rc").read_text())
    except (OSError, ValueError):
        log.error(
            "the guest wrote no exit code; see %s and %s",
            share / "console.log",
            share / "qemu.log",
        )
        return EXIT_RIG_FAILED


def log_timings(result: RunResult) -> None:
    timings = result.timings
    parts = [f"{name} {seconds:.1f} s" for name, seconds in timings.items()]
    log.info("run: exit code %d; %s", result.exit_code, ", ".join(parts))
    log.info(
        "run: guest output in %s, console in %s", result.output_log, result.console_log
    )


def run_script(
    script: Path,
    share: Path,
    timeout: float = DEFAULT_TIMEOUT,
    env: dict[str, str] | None = None,
    out: TextIO = sys.stdout,
) -> RunResult:
    """Boot the VM, install the project, run SCRIPT and return its outcome."""
    if not script.is_file():
        raise RigError(f"script {script} not found")
    image = ensure_image()
    build_bpf(PROJECT)
    dependencies = ensure_dependency_wheels(PROJECT)
    disk = ensure_disk(image, dependencies, out)
    prepare_share(share, script, dependencies)
    write_run_script(share, RUN_BODY, env or {})
    return boot_vm(image, disk, share, timeout, out)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rig.py",
        description=__doc__.split("\n\n")[0],
        epilog="Environment: BROKER_VM_CACHE (default /var/cache/broker-vm), "
        "BROKER_VM_ACCEL=kvm|tcg|auto, BROKER_VM_SOURCES (apt sources file or "
        "mirror URL for mmdebstrap), BROKER_VM_PREPARED=0 (boot the plain image "
        "and install everything in each run), DEMO_SECONDS (demo length, "
        "default 300). "
        "Exit codes: the script's own, 124 on timeout, 125 when the rig failed.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every command"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    image = commands.add_parser("image", help="build or reuse the cached VM image")
    image.add_argument("--rebuild", action="store_true", help="build even if cached")

    wheelhouse = commands.add_parser("wheelhouse", help="assemble the guest's wheels")
    wheelhouse.add_argument(
        "--dest", type=Path, default=PROJECT / ".cache" / "wheelhouse",
        help="directory to fill (default: .cache/wheelhouse in the project)",
    )  # fmt: skip

    run = commands.add_parser("run", help="boot the VM and run SCRIPT in it as root")
    run.add_argument("script", type=Path)
    run.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT,
        help=f"seconds before the VM is killed (default {DEFAULT_TIMEOUT:.0f})",
    )  # fmt: skip
    run.add_argument(
        "--share", type=Path,
        help="share directory to use and keep (default: a new directory in /tmp)",
    )  # fmt: skip

    commands.add_parser("demo", help="run tests/vm/demo.sh in the VM")
    return parser


def command_image(args: argparse.Namespace) -> int:
    started = time.monotonic()
    image = ensure_image(rebuild=args.rebuild)
    log.info("image: %s ready after %.1f s", image.root_img, time.monotonic() - started)
    return 0


def command_wheelhouse(args: argparse.Namespace) -> int:
    build_bpf(PROJECT)
    dependencies = ensure_dependency_wheels(PROJECT)
    with tempfile.TemporaryDirectory(prefix="broker-wheel-") as temporary:
        source = Path(temporary) / "project"
        copy_project(PROJECT, source)
        assemble_wheelhouse(source, dependencies, args.dest)
    log.info("wheelhouse: ready in %s", args.dest)
    return 0


def command_run(args: argparse.Namespace, env: dict[str, str] | None = None) -> int:
    keep_all = args.share is not None
    share = args.share or Path(tempfile.mkdtemp(prefix="broker-vm-"))
    result = run_script(args.script.resolve(), share.resolve(), args.timeout, env)
    if not keep_all:
        # Keep only the logs and the exit code of a throwaway share.
        for bulky in ("project", "wheelhouse"):
            shutil.rmtree(share / bulky, ignore_errors=True)
    return result.exit_code


def command_demo(args: argparse.Namespace) -> int:
    seconds = os.environ.get("DEMO_SECONDS", "300")
    if not seconds.isdigit():
        raise RigError(f"DEMO_SECONDS={seconds!r} is invalid; use whole seconds")
    args.script = PROJECT / "tests" / "vm" / "demo.sh"
    args.timeout = DEFAULT_TIMEOUT + int(seconds)
    args.share = None
    return command_run(args, {"DEMO_SECONDS": seconds})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="rig: %(message)s", stream=sys.stderr)
    handlers = {
        "image": command_image,
        "wheelhouse": command_wheelhouse,
        "run": command_run,
        "demo": command_demo,
    }
    try:
        return handlers[args.command](args)
    except RigError as exc:
        log.error("%s", exc)
        return EXIT_RIG_FAILED


if __name__ == "__main__":
    sys.exit(main())
