"""The wheels an offline GPU machine lacks for exmap-ray, packed as one site-packages tree in a .tar.xz.

    .venv/bin/python benchmarks/gpu_bundle.py build                 # here: .gpu_bundle/site-cp312.tar.xz
    .venv/bin/python benchmarks/gpu_bundle.py build --python 3.11   # for this machine's Python (trials)
    PYTHONPATH=SITE:. python benchmarks/gpu_bundle.py check         # every module the project imports
    .venv/bin/python benchmarks/gpu_bundle.py standin /tmp/standin  # a venv seeing only the image's packages

The device image has torch, torchvision, timm, scikit-learn, pyarrow and what they pull in (numpy,
scipy, pillow, pyyaml, tqdm, filelock, fsspec, click, packaging, ...), but no ray, mlflow or faiss, no
network, and each call carries at most 64 MiB. So the bundle holds only what `pip install -e .` adds
to that image and the project imports (found by running the demo and the GPU checks with nothing
else on the path, `check`), each at the version constraints.txt pins, downloaded for the target
Python as manylinux x86_64 binaries (`pip download --no-deps --only-binary=:all:`):
- Ray core and Ray Train/Tune's imports, without Ray's Java jars, RLlib, Serve, the LLM and Data
  libraries' large parts nobody here imports, the dashboard's web client and Ray's vendored copy of
  aiohttp for the runtime-env agent (the project never sets a runtime env that needs it). Ray's
  [default] extra (dashboard, metrics agent) is left out: `ray.init` on one node runs without it;
- mlflow-skinny with SQLAlchemy and Alembic (the SQLite tracking store), not the full mlflow server;
- faiss-cpu (clustering imports faiss at module level; on the device its k-means runs on the CPU);
- matplotlib (the run's figures).
Unpacked into a folder put first on PYTHONPATH it imports as installed (the .dist-info folders are kept,
so importlib.metadata sees the versions). No console scripts: the checks call `python -m`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the device lacks and the project imports (found with `check` on a stand-in for the device
# image). Versions come from constraints.txt; one not pinned there is named with its version here.
PACKAGES = [
    # Ray core, and the imports of ray.train / ray.tune
    "ray",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "attrs",
    "msgpack",
    "protobuf",
    "requests",
    "urllib3",
    "certifi",
    "charset-normalizer",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "pandas",
    "python-dateutil",
    "six",
    "tensorboardx",
    # MLflow tracking to SQLite
    "mlflow-skinny",
    "sqlalchemy",
    "alembic",
    "mako",
    "sqlparse",
    "cachetools",
    "importlib-metadata",
    "zipp",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-proto",
    "opentelemetry-semantic-conventions",
    "python-dotenv",
    "databricks-sdk",
    "google-auth",
    "pyasn1",
    "pyasn1-modules",
    "gitpython",
    "gitdb",
    "smmap",
    "fastapi",
    "starlette",
    "uvicorn",
    "annotated-doc",
    "cryptography",
    "cffi",
    "pycparser",
    # the rest
    "faiss-cpu",
    "matplotlib",
    "contourpy",
    "cycler",
    "fonttools",
    "kiwisolver",
    "pyparsing",
    # the GPU suite
    "pytest",
    "pluggy",
    "iniconfig",
    "pygments",
]
# Dropped from the unpacked tree (globs on paths inside site-packages). Each is code the project never
# reaches: checked by `check` and by the GPU suite on the device.
TRIM = [
    "ray/jars",
    "ray/rllib",
    "ray/serve",
    "ray/llm",
    "ray/dashboard/client",
    "ray/tests",
    "ray/core/src/ray/raylet/*.debug",
    "*/__pycache__",
    "*.pyc",
    "*.js.map",
    "*/tests",
    "*/testing/_data",
    "matplotlib/mpl-data/sample_data",
    "pandas/tests",
    "fontTools/*/tests",
]
# Packages whose compiled modules are Cython builds of .py files shipped beside them: without the .so,
# Python imports the .py (slower font subsetting and SQL compilation, neither on a hot path here).
PURE_FALLBACK = ("fontTools/", "sqlalchemy/")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def pins() -> dict[str, str]:
    """name -> version from constraints.txt (names normalised as pip does)."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            out[norm(m.group(1))] = m.group(2)
    return out


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(names: list[str], python: str, dest: Path) -> list[Path]:
    pinned = pins()
    missing = [n for n in names if "==" not in n and norm(n) not in pinned]
    if missing:
        raise SystemExit(f"gpu_bundle: {missing} not pinned in constraints.txt; name a version (name==x.y)")
    reqs = [n if "==" in n else f"{n}=={pinned[norm(n)]}" for n in names]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "-d",
        str(dest),
    ]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + reqs, check=True)
    wheels = sorted(dest.glob("*.whl"))
    got = {norm(w.name.split("-")[0]) for w in wheels}
    lost = [r for r in reqs if norm(r.split("==")[0]) not in got]
    if lost:
        raise SystemExit(f"gpu_bundle: pip downloaded no wheel for {lost}")
    return wheels


def trimmed(path: str, names: set[str]) -> bool:
    if any(fnmatch.fnmatch(path, g) or fnmatch.fnmatch(path, g + "/*") for g in TRIM):
        return True
    m = re.match(r"^(.*)\.cpython-[^/]*\.so$", path)
    return bool(m and path.startswith(PURE_FALLBACK) and m.group(1) + ".py" in names)


def strip_binaries(site: Path) -> int:
    """`strip --strip-unneeded` every ELF file that still has its symbol table (Ray's raylet, GCS server
    and _raylet.so: a third of their size); the dynamic symbols that loading needs stay. Bytes saved."""
    if shutil.which("strip") is None:
        print("gpu_bundle: no `strip` on this machine; binaries packed as they are")
        return 0
    saved = 0
    for p in site.rglob("*"):
        if not p.is_file() or p.is_symlink():
            continue
        with open(p, "rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        before = p.stat().st_size
        subprocess.run(["strip", "--strip-unneeded", str(p)], check=True, capture_output=True)
        saved += before - p.stat().st_size
    return saved


def unpack(wheels: list[Path], site: Path) -> dict:
    """Each wheel's files into `site`, as pip would lay them out (purelib/platlib data merged), trimmed."""
    kept = dropped = 0
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            names = set(z.namelist())
            for info in z.infolist():
                name = info.filename
                m = re.match(r"^[^/]+\.data/(purelib|platlib)/(.*)$", name)
                if m:
                    name = m.group(2)
                elif re.match(r"^[^/]+\.data/", name):
                    continue  # scripts, headers, data: not needed to import
                if info.is_dir() or not name:
                    continue
                if trimmed(name, names):
                    dropped += info.file_size
                    continue
                target = site / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = info.external_attr >> 16
                if mode & 0o111:
                    target.chmod(0o755)  # gcs_server, raylet and the .so files must stay executable
                kept += info.file_size
    return {"kept_bytes": kept, "trimmed_bytes": dropped}


def build(
    python: str, out: Path, keep_site: Path | None, pack: bool = True, preset: int = 9 | lzma.PRESET_EXTREME
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tag = "cp" + python.replace(".", "")
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_") as tmp:
        dl = ROOT / ".gpu_wheels" / tag  # kept, outside the carried bundle: a rebuild downloads nothing
        dl.mkdir(parents=True, exist_ok=True)
        have = {norm(w.name.split("-")[0]) for w in dl.glob("*.whl")}
        todo = [n for n in PACKAGES if norm(n.split("==")[0]) not in have]
        if todo:
            download(todo, python, dl)
        wanted = {norm(n) for n in PACKAGES}
        wheels = [w for w in sorted(dl.glob("*.whl")) if norm(w.name.split("-")[0]) in wanted]
        site = keep_site or Path(tmp) / "site"
        if site.exists():
            shutil.rmtree(site)
        site.mkdir(parents=True)
        sizes = unpack(wheels, site)
        sizes["stripped_bytes"] = strip_binaries(site)
        sizes["kept_bytes"] -= sizes["stripped_bytes"]
        manifest = {"python": python, "wheels": [w.name for w in wheels], "trim": TRIM, **sizes}
        (site / "gpu_bundle.json").write_text(json.dumps(manifest, indent=1))
        if not pack:
            print(f"{site}: {sizes['kept_bytes'] / 2**20:.0f} MiB unpacked (not packed)")
            return site
        archive = out / f"site-{tag}.tar.xz"
        tmp_archive = archive.with_suffix(".tmp")
        # xz -9e by default: the 64 MiB a device call carries is the limit, not the minutes spent here.
        # Files sorted by suffix, so that like compresses with like (the binaries side by side)
        files = sorted(site.rglob("*"), key=lambda p: (p.is_dir() is False, p.suffix, p.name, str(p)))
        with lzma.open(tmp_archive, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
            for p in files:
                tar.add(p, arcname=str(p.relative_to(site)), recursive=False)
        os.replace(tmp_archive, archive)
    size = archive.stat().st_size
    print(
        f"{archive}: {size / 2**20:.1f} MiB ({len(wheels)} wheels; "
        f"{sizes['kept_bytes'] / 2**20:.0f} MiB unpacked, "
        f"{sizes['trimmed_bytes'] / 2**20:.0f} MiB trimmed)"
    )
    return archive


# what the device image holds besides the standard library (with what these pull in)
IMAGE = ["torch", "torchvision", "timm", "scikit-learn", "pyarrow"]


def standin(folder: Path) -> Path:
    """A venv at folder/venv that sees only the device image's packages: IMAGE and their dependency
    closure, symlinked from this Python's environment into folder/site (no copies). With a bundle for
    this Python (`build --python 3.11`) it tries the run mode here as the device would run it."""
    import venv
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(IMAGE)
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    for name in sorted(seen):
        dist = metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "bin")}:
            src, dst = Path(dist.locate_file(top)), site / top
            if not top.endswith(".pth") and src.exists() and not dst.exists():
                dst.symlink_to(src)
    venv.EnvBuilder(clear=True, with_pip=False).create(folder / "venv")
    (next((folder / "venv" / "lib").glob("python*")) / "site-packages" / "image.pth").write_text(f"{site}\n")
    print(
        f"{folder / 'venv'}: a Python that sees {len(seen)} distributions ({', '.join(IMAGE)} and their "
        f"dependencies) from {site}"
    )
    return folder / "venv"


# imported lazily by the project or its tests, so walking exmap_ray's modules alone would miss them
EXTRA_IMPORTS = [
    "ray.train.torch",
    "ray.tune",
    "ray.util.state",
    "mlflow",
    "mlflow.tracking",
    "faiss",
    "matplotlib.pyplot",
    "sqlalchemy",
    "alembic",
    "pytest",
    "timm",
    "sklearn",
    "pyarrow.fs",
]


def check() -> int:
    """Import every exmap_ray module and the lazily imported packages; print where each package comes
    from. Exit 1, naming the module and the error, when one fails."""
    import importlib
    import pkgutil
    from importlib import metadata

    import exmap_ray

    names = [
        m.name for m in pkgutil.walk_packages(exmap_ray.__path__, "exmap_ray.") if not m.name.endswith("__main__")
    ] + EXTRA_IMPORTS  # __main__ would run the CLI
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report every failure, then fail once
            failed.append(f"{name}: {type(e).__name__}: {e}")
    for dist in (
        "torch",
        "timm",
        "scikit-learn",
        "pyarrow",
        "numpy",
        "ray",
        "mlflow-skinny",
        "faiss-cpu",
        "matplotlib",
        "pytest",
    ):
        try:
            d = metadata.distribution(dist)
            print(f"  {dist:<14} {d.version:<14} {d.locate_file('')}")
        except metadata.PackageNotFoundError:
            print(f"  {dist:<14} (not installed)")
    if failed:
        print("gpu_bundle check: these imports failed:\n  " + "\n  ".join(failed))
        return 1
    print(f"gpu_bundle check: {len(names)} modules import")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, trim and pack the bundle")
    b.add_argument("--python", default="3.12", help="the device's Python (major.minor)")
    b.add_argument("--out", type=Path, default=ROOT / ".gpu_bundle")
    b.add_argument("--keep-site", type=Path, default=None, help="also keep the unpacked tree here")
    b.add_argument("--no-pack", action="store_true", help="only unpack (with --keep-site): quick tries")
    b.add_argument(
        "--fast",
        action="store_true",
        help="xz -3 instead of -9e: minutes less, a larger file (a bundle for trying the run mode on this machine)",
    )
    sub.add_parser("check", help="import every project module (PYTHONPATH as the device will have it)")
    st = sub.add_parser("standin", help="a venv seeing only the device image's packages, to try `run` here")
    st.add_argument("folder", type=Path)
    args = ap.parse_args()
    if args.cmd == "check":
        return check()
    if args.cmd == "standin":
        standin(args.folder)
        return 0
    if args.cmd == "build":
        preset = 3 if args.fast else 9 | lzma.PRESET_EXTREME
        build(args.python, args.out, args.keep_site, not args.no_pack, preset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
