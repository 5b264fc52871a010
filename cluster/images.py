"""The project's container images, built with buildah, and their import into the real nodes.

    python -m cluster.images build [--base IMAGE] [NAME ...]   # `make images`
    python -m cluster.images import --address SOCK [NAME ...]  # into one node's containerd

Why buildah: it needs no daemon (Docker's would have to be started, stopped and
cleaned up after: it rewrites the host's iptables FORWARD policy and chains), reads
the same Dockerfiles (BuildKit-style `RUN --mount=type=cache`), runs RUN steps
chroot-isolated on the host network, and writes docker-archive tarballs that
containerd (`ctr images import`) and Docker (`docker load`) both read.

Everything lives outside the repository, in ~/.cache/remotegpu/images: buildah's
storage, its cache mounts, the Debian base and the archives. The dependency layers
install from the host's own uv cache, mounted into the build: what `make install`
downloaded (PyTorch, the CUDA wheels: GBs) is copied, not fetched a second time. An
image is rebuilt only when its inputs change: its tag is a hash of
its Dockerfile, the files its COPY lines name, the build arguments and the base
image's ID, and a finished archive of that tag is the stamp.

No registry is reachable here, so the base defaults to a local Debian bookworm
(mmdebstrap from Debian's packages: Python 3.11, the lock's Python) passed as the
Dockerfiles' BASE_IMAGE; `--base python:3.11-slim-bookworm` uses the official one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(
    os.environ.get("REMOTEGPU_IMAGE_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "remotegpu" / "images"
)
LOCAL_BASE = "localhost/remotegpu/debian:bookworm"
SUITE = "bookworm"
MIRRORS = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]
# What the Dockerfiles need from the base beyond Debian's minimal one (the official
# python image has them all).
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates", "passwd"]


# A TLS-intercepting proxy's CA (this machine has one): the host's trust store and pip
# configuration are mounted into the RUN steps, never copied into the image.
HOST_TRUST = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf"]
# Where the host's uv cache is mounted in the RUN steps (the Dockerfiles' UV_CACHE_DIR).
UV_CACHE_MOUNT = "/var/cache/remotegpu-uv"


def host_uv_cache() -> Path | None:
    """The uv cache `make install` fills (uv's own answer: UV_CACHE_DIR, XDG_CACHE_HOME...)."""
    uv = REPO / ".venv" / "bin" / "uv"
    if not uv.exists():
        return None
    out = subprocess.run([str(uv), "cache", "dir"], capture_output=True, text=True)
    path = Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: str  # relative to the repository
    context: str = "."  # relative to the repository

    @property
    def repository(self) -> str:
        return f"localhost/remotegpu/{self.name}"


IMAGES = {
    i.name: i
    for i in [
        Image("remotegpu", "Dockerfile"),
        Image("worker", "inference-worker/Dockerfile"),
        # Test-only stand-in for the chart's bundled docker.io/library/postgres.
        Image("postgresql", "cluster/postgresql/Dockerfile", "cluster/postgresql"),
        # The real nodes' pod sandbox image.
        Image("pause", "cluster/pause/Dockerfile", "cluster/pause"),
    ]
}


def log(msg: str) -> None:
    print(f"[images] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def buildah(*args: str, capture: bool = True) -> str:
    """Runs buildah on the project's own storage (not the machine's /var/lib/containers)."""
    argv = [
        "buildah",
        "--root",
        str(CACHE / "storage"),
        "--runroot",
        str(CACHE / "run"),
        "--storage-driver",
        "overlay",
        *args,
    ]
    # Cache mounts live under $TMPDIR/buildah-cache-<uid>: keep them in the cache too.
    env = {**os.environ, "TMPDIR": str(CACHE / "tmp")}
    (CACHE / "tmp").mkdir(parents=True, exist_ok=True)
    out = subprocess.run(argv, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if out.returncode:
        raise RuntimeError(
            f"buildah {shlex.join(args[:3])} ... failed ({out.returncode}); see the output above"
        )
    return out.stdout if capture else ""


def image_id(ref: str) -> str | None:
    out = subprocess.run(
        ["buildah", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run"), "images", "-q",
         "--no-trunc", ref],
        capture_output=True,
        text=True,
    )  # fmt: skip
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None


def local_base() -> str:
    """The Debian bookworm base, made once from Debian's packages (mmdebstrap, about 80 s)."""
    if image_id(LOCAL_BASE):
        return LOCAL_BASE
    rootfs = CACHE / f"debian-{SUITE}.tar"
    if not rootfs.exists():
        log(f"creating a Debian {SUITE} base with mmdebstrap ({', '.join(BASE_PACKAGES)})")
        partial = rootfs.with_suffix(".partial")
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(partial),
             *MIRRORS],
            check=True,
        )  # fmt: skip
        partial.rename(rootfs)
    container = buildah("from", "scratch").strip()
    try:
        buildah("add", container, str(rootfs), "/")
        buildah("config", "--cmd", "/bin/bash", "--env", "LANG=C.UTF-8", container)
        buildah("commit", "--rm", container, LOCAL_BASE)
    except Exception:
        buildah("rm", container)
        raise
    return LOCAL_BASE


def copy_sources(dockerfile: Path) -> list[str]:
    """The context paths the Dockerfile's COPY/ADD lines read (no --from copies)."""
    sources: list[str] = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        sources += args[:-1]
    return sources


def input_hash(image: Image, base_ref: str, base_id: str) -> str:
    """A hash of everything the build reads: a change anywhere rebuilds, nothing else does."""
    h = hashlib.sha256()
    dockerfile = REPO / image.dockerfile
    context = REPO / image.context
    h.update(dockerfile.read_bytes())
    h.update(f"{base_ref}\0{base_id}\0".encode())
    for src in sorted(copy_sources(dockerfile)):
        root = context / src
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(context).as_posix()
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(f"{rel}\0{f.stat().st_mode & 0o111}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def uv_cache_args(image: Image) -> list[str]:
    """The host's uv cache as UV_CACHE_DIR, for a Dockerfile that installs with uv; read
    and written by the build (uv locks it: a concurrent `uv pip sync` on the host is safe)."""
    cache = host_uv_cache()
    if cache is None or "ARG UV_CACHE_DIR" not in (REPO / image.dockerfile).read_text():
        return []
    return ["--volume", f"{cache}:{UV_CACHE_MOUNT}", "--build-arg", f"UV_CACHE_DIR={UV_CACHE_MOUNT}"]


@dataclass
class Built:
    image: Image
    ref: str
    archive: Path
    size_bytes: int


def archive_path(ref: str) -> Path:
    return CACHE / "archives" / (ref.rsplit("/", 1)[-1].replace(":", "-") + ".tar")


def build(image: Image, base: str | None = None) -> Built:
    """Builds one image (unless an archive of the same inputs exists) and returns its archive."""
    base_ref = base or local_base()
    base_id = image_id(base_ref) or base_ref  # a remote base: its name (buildah pulls it)
    ref = f"{image.repository}:{input_hash(image, base_ref, base_id)}"
    archive = archive_path(ref)
    meta = archive.with_suffix(".json")
    if archive.exists() and meta.exists():
        return Built(image, ref, archive, json.loads(meta.read_text())["size_bytes"])
    log(f"building {ref} from {image.dockerfile} on {base_ref}")
    started = time.monotonic()
    buildah(
        "bud",
        "--layers",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={base_ref}",
        *[arg for path in HOST_TRUST if Path(path).is_file() for arg in ("--volume", f"{path}:{path}:ro")],
        *uv_cache_args(image),
        "-f",
        str(REPO / image.dockerfile),
        "-t",
        ref,
        str(REPO / image.context),
        capture=False,
    )
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    buildah("push", ref, f"docker-archive:{partial}:{ref}")
    partial.rename(archive)
    size = archive.stat().st_size  # its layers, uncompressed: what `docker images` shows
    meta.write_text(json.dumps({"ref": ref, "size_bytes": size}))
    _prune(image, keep=archive)
    log(f"built {ref} in {time.monotonic() - started:.0f}s: {size / 1e9:.2f} GB")
    return Built(image, ref, archive, size)


def _prune(image: Image, keep: Path) -> None:
    """Older builds of the image: their archives and tags (the layers stay buildah's cache)."""
    for old in keep.parent.glob(f"{image.name}-*.tar"):
        if old != keep:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
            tag = old.stem.removeprefix(f"{image.name}-")
            subprocess.run(
                ["buildah", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run"), "rmi",
                 f"{image.repository}:{tag}"],
                capture_output=True,
            )  # fmt: skip
            # Its own layers (the ones it shares with the new build stay, as the build cache).
            subprocess.run(
                ["buildah", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run"), "rmi", "--prune"],
                capture_output=True,
            )  # fmt: skip


def build_all(names: list[str] | None = None, base: str | None = None) -> dict[str, Built]:
    try:
        return {n: build(IMAGES[n], base) for n in names or list(IMAGES)}
    finally:
        release_storage()


def release_storage() -> None:
    """Nothing stays mounted between builds: a failed RUN's working container, the store's own mount."""
    store = ["buildah", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run")]
    subprocess.run([*store, "rm", "--all"], capture_output=True)
    overlay = str(CACHE / "storage" / "overlay")
    if any(line.split()[4] == overlay for line in Path("/proc/self/mountinfo").read_text().splitlines()):
        subprocess.run(["umount", overlay], capture_output=True)


def import_into(address: str, built: Built, ctr: str = "ctr") -> None:
    """Imports an archive into a containerd's Kubernetes namespace, unless already there;
    the node keeps the unpacked image only (see drop_layer_blobs)."""
    base = [ctr, "--address", address, "--namespace", "k8s.io"]
    if built.ref not in image_targets(base):
        with built.archive.open("rb") as f:
            subprocess.run([*base, "images", "import", "-"], stdin=f, check=True, capture_output=True)
    drop_layer_blobs(base, built.ref)  # also those an earlier import kept
    remove_superseded(base, built.ref)


def image_targets(base: list[str]) -> dict[str, str]:
    """Every image reference of a containerd namespace and the digest it points at."""
    rows = subprocess.run([*base, "images", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: line.split()[2] for line in rows.splitlines()[1:] if line.strip()}


def remove_superseded(base: list[str], ref: str) -> None:
    """Older builds of the image go (the node keeps its images across runs: disk), with the
    `sha256:<image id>` references the CRI plugin adds beside each name: left behind, those
    keep every old build's snapshots (6 GB a worker image) for good."""
    repository = ref.rsplit(":", 1)[0]
    targets = image_targets(base)
    old = [r for r in targets if r.rsplit(":", 1)[0] == repository and r != ref]
    named = {t for r, t in targets.items() if not r.startswith("sha256:") and r not in old}
    orphans = [r for r, t in targets.items() if r.startswith("sha256:") and t not in named]
    if old or orphans:
        subprocess.run([*base, "images", "remove", "--sync", *old, *orphans], capture_output=True, check=True)


def layer_digests(base: list[str], ref: str) -> list[str]:
    """The layer blobs of an image in a containerd (its manifest's, for this platform)."""

    def blob(digest: str) -> dict:
        out = subprocess.run([*base, "content", "get", digest], capture_output=True, check=True)
        return json.loads(out.stdout)

    manifest = blob(image_targets(base)[ref])
    if "manifests" in manifest:  # an index: the one manifest an import of one platform writes
        manifest = blob(manifest["manifests"][0]["digest"])
    return [layer["digest"] for layer in manifest.get("layers", [])]


def drop_layer_blobs(base: list[str], ref: str) -> None:
    """Deletes an imported image's layer blobs once unpacked, as the CRI plugin's
    `discard_unpacked_layers` does for pulled images: the kubelet runs containers from the
    unpacked snapshots, so the blobs would only double the node's disk (the worker's
    dependency layer is 5 GB; `ctr images check` calls the image incomplete from then on)."""
    stored = set(
        subprocess.run(
            [*base, "content", "ls", "-q"], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    layers = [digest for digest in layer_digests(base, ref) if digest in stored]
    if layers:
        subprocess.run([*base, "content", "rm", *layers], capture_output=True, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["build", "import"])
    parser.add_argument("names", nargs="*", help=f"images (default: all of {', '.join(IMAGES)})")
    parser.add_argument(
        "--base", default=os.environ.get("BASE_IMAGE") or None, help="BASE_IMAGE build argument"
    )
    parser.add_argument("--address", help="containerd socket (import)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(IMAGES)
    if unknown:
        parser.error(f"unknown images {sorted(unknown)}; known: {', '.join(IMAGES)}")
    started = time.monotonic()
    built = build_all(args.names or None, args.base)
    if args.action == "import":
        if not args.address:
            parser.error("import needs --address")
        for b in built.values():
            import_into(args.address, b)
    for b in built.values():
        print(f"{b.image.name:<11} {b.ref:<48} {b.size_bytes / 1e9:6.2f} GB  {b.archive}")
    log(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
