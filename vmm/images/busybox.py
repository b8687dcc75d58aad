"""The default guest's userland: busybox, built static against musl from Debian's source package.

Why not Debian's own busybox-static: it is linked against glibc, and on PVM
hosts every page a new process maps and every system call it makes is guest
kernel work in KVM's instruction emulator. glibc's static start-up maps and
touches far more than musl's, and needs a bigger brk. Measured on our PVM CI
host (AMD EPYC), `vmm run -- true` restored from a snapshot, command exit
counted by the guest's boot timer: 600 ms with Debian's glibc busybox, 316 ms
with this one; a 13 KiB musl program that only exits: 227 ms. musl also
copies a new process's TLS without the SSE stores PVM loses under
concurrency (docs/pvm-concurrency.md).

The build, cached under ``~/.cache/vmm/busybox/<key>/`` (``<key>`` hashes
this file and the compiler; a build takes ~20 s on 2 cores):

1. Debian's ``busybox`` source package, by ``apt-get source`` with a private
   apt configuration that lists the system's own Debian mirrors as
   ``deb-src`` (the system's apt configuration is not touched);
2. the upstream tarball plus Debian's patches (``debian/patches/series``);
3. Debian's configuration for its static package
   (``debian/config/pkg/static``) less :data:`MUSL_INCOMPATIBLE`;
4. ``make`` with ``musl-gcc``, the kernel's UAPI headers reached through a
   private include directory (musl-gcc sees only musl's own headers).

Where it cannot be built (no network, not Debian), the guest falls back to
Debian's busybox-static, with a warning: slower on PVM, the same commands.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from vmm.cache import cache_dir
from vmm.digest import hasher
from vmm.errors import GuestBuildError

# Options of Debian's static config that need GNU regex extensions musl has not
# (re_search, RE_SYNTAX_*, REG_STARTEND): vi's regex search and grep's
# "extra compat" mode. Everything else builds as Debian configured it.
MUSL_INCOMPATIBLE = ("CONFIG_FEATURE_VI_REGEX_SEARCH", "CONFIG_EXTRA_COMPAT")
# Kernel UAPI header folders busybox includes (musl-tools ships none).
UAPI_FOLDERS = {
    "linux": "/usr/include/linux",
    "asm": "/usr/include/x86_64-linux-gnu/asm",
    "asm-generic": "/usr/include/asm-generic",
    "mtd": "/usr/include/mtd",
}
SOURCE_PACKAGE = "busybox"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def busybox_key() -> str:
    digest = hasher()
    digest.update(Path(__file__).read_bytes())
    compiler = shutil.which("musl-gcc")
    if compiler:
        info = Path(compiler).resolve().stat()
        digest.update(f"{compiler}:{info.st_size}:{info.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_busybox() -> Path | None:
    path = cache_dir() / "busybox" / busybox_key() / "busybox"
    return path if path.is_file() else None


def build_busybox(progress=None) -> Path:
    """Build it into the cache (GuestBuildError naming the step that failed)."""
    if not shutil.which("musl-gcc"):
        raise GuestBuildError("musl-gcc not found: apt-get install musl-tools")
    target = cache_dir() / "busybox" / busybox_key()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        work = Path(scratch)
        if progress:
            progress("building the guest's busybox (musl, static; first use only, ~20 s)")
        source = fetch_source(work)
        version = source.name
        configure(source, work / "out")
        includes = uapi_includes(work / "include")
        _run(["make", "-s", f"-j{os.cpu_count() or 1}", f"O={work / 'out'}", "CC=musl-gcc",
              f"EXTRA_CFLAGS=-isystem {includes}"], cwd=source, what="make")
        built = work / "out" / "busybox"
        if not built.is_file():
            raise GuestBuildError("building busybox: make produced no busybox binary")
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staged-"))
        shutil.copy2(built, staging / "busybox")
        (staging / "version").write_text(f"{version} (Debian source), musl static\n")
        try:
            os.rename(staging, target)
        except OSError:  # another vmm built it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    return target / "busybox"


# --- the steps -----------------------------------------------------------------------------
def _run(command: list[str], *, cwd: Path, what: str, env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "(no output)").splitlines()
        errors = [line for line in lines if "error" in line.lower()] or lines
        raise GuestBuildError(f"building busybox: {what} failed: {errors[-1].strip()}")
    return result.stdout


def deb_src_lines(sources: tuple[Path, ...] = APT_SOURCES) -> list[str]:
    """The system's Debian archives as one-line ``deb-src`` entries."""
    entries: set[str] = set()
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(source.glob("*.list")) + sorted(source.glob("*.sources"))
        elif source.is_file():
            files.append(source)
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([\w-]+):\s*(.*)$", stanza, re.MULTILINE))
                if "deb" not in fields.get("Types", "").split() or fields.get("Enabled") == "no":
                    continue
                for uri in fields.get("URIs", "").split():
                    for suite in fields.get("Suites", "").split():
                        entries.add(f"deb-src {uri} {suite} {fields.get('Components', 'main')}")
        else:
            for line in text.splitlines():
                match = re.match(r"^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)$", line)
                if match:
                    entries.add(f"deb-src {match.group(2)} {match.group(3)} {match.group(4).strip()}")
    return sorted(entries)


def fetch_source(work: Path) -> Path:
    """Download and unpack Debian's busybox source with its patches; return the source tree."""
    apt = work / "apt"
    (apt / "lists" / "partial").mkdir(parents=True)
    (apt / "parts").mkdir()
    lines = deb_src_lines()
    if not lines:
        raise GuestBuildError("building busybox: no Debian archive in the apt sources")
    (apt / "sources.list").write_text("\n".join(lines) + "\n")
    (apt / "cache").mkdir()
    options = [f"-oDir::Etc::SourceList={apt / 'sources.list'}", f"-oDir::Etc::SourceParts={apt / 'parts'}",
               f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::Cache={apt / 'cache'}",
               "-oDebug::NoLocking=1", f"-oAPT::Sandbox::User={_user()}", "-q"]
    _run(["apt-get", *options, "update"], cwd=work, what="apt-get update (deb-src)")
    download = work / "download"
    download.mkdir()
    _run(["apt-get", *options, "source", "--download-only", SOURCE_PACKAGE], cwd=download,
         what="apt-get source busybox")
    origs = sorted(download.glob(f"{SOURCE_PACKAGE}_*.orig.tar.*"))
    debians = sorted(download.glob(f"{SOURCE_PACKAGE}_*.debian.tar.*"))
    if not origs or not debians:
        raise GuestBuildError("building busybox: apt-get source gave no orig/debian tarballs")
    _extract(origs[0], work / "src")
    (tree,) = [p for p in (work / "src").iterdir() if p.is_dir()]
    _extract(debians[0], tree)
    series = tree / "debian" / "patches" / "series"
    for line in series.read_text().splitlines() if series.exists() else []:
        name = line.split("#", 1)[0].strip().split(" ")[0]  # quilt: "name [-pN]  # comment"
        if not name:
            continue
        _run(["patch", "-p1", "-s", "-i", str(tree / "debian" / "patches" / name)], cwd=tree,
             what=f"patch {name}")
    version = debians[0].name.removeprefix(f"{SOURCE_PACKAGE}_").split(".debian.tar")[0]
    return tree.rename(tree.with_name(f"{SOURCE_PACKAGE}-{version}"))


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _extract(archive_path: Path, into: Path) -> None:
    with tarfile.open(archive_path) as archive:
        try:
            archive.extractall(into, filter="data")  # no absolute paths, links out, devices
        except TypeError:  # Python before 3.11.4: no filters
            archive.extractall(into)


def configure(source: Path, out: Path) -> None:
    """Debian's static configuration, less what musl cannot build."""
    config = (source / "debian" / "config" / "pkg" / "static").read_text()
    for option in MUSL_INCOMPATIBLE:
        config = re.sub(rf"^{option}=y$", f"# {option} is not set", config, flags=re.MULTILINE)
    out.mkdir()
    (out / ".config").write_text(config)
    _run(["make", "-s", f"O={out}", "CC=musl-gcc", "oldconfig"], cwd=source, what="make oldconfig",
         env={"KCONFIG_NOTIMESTAMP": "1"})


def uapi_includes(folder: Path) -> Path:
    folder.mkdir()
    for name, path in UAPI_FOLDERS.items():
        if Path(path).is_dir():
            (folder / name).symlink_to(path)
    return folder
