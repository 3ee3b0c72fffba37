"""Dataset layout checks: `exmap-ray datasets check NAME --root PATH`, and the same check in preflight.

A dataset on disk registers its *scanner* with `@DATASETS.register(NAME, on_disk=True)`: one `DatasetEntry` in
`DATASETS` holds the scanner and the builder, which is the shared image path over the scanned table
(`images.image_group_data`: the paper's transforms, the val/test decode cache). A scanner reads the
dataset's index (metadata files, folder names) without decoding images and returns a `Scan`: the
table of samples (paths, labels, split, true group, attributes) and every problem it found, each a
`Finding` with what is wrong, where, and the precise fix. The builder scans through `scan_or_raise`,
so a run and the check agree on what is broken.

`check_dataset` adds the per-split, per-group counts and opens every image (PIL's verify: header
and structure, no full decode) to find unreadable files. Datasets made in memory (cmnist,
cmnist_multi) have no scanner: they are checked by building them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from ..errors import DataError, SpecError, near_name
from .base import DATASETS, DatasetEntry, GroupData, RootKeys  # noqa: F401  (RootKeys: data modules import it here)
from .images import PAPER, _files_key, decode_cache_dir, image_group_data

SPLIT_NAMES = ("train", "val", "test")
MAX_LISTED = 5  # files named per finding; the count says how many there are


@dataclass
class Finding:
    problem: str  # short kind: "missing file", "unreadable image", "missing column", "wrong folder name", ...
    detail: str  # what and where: the file, line, column or folder
    fix: str  # the precise fix

    def line(self) -> str:
        return f"{self.problem}: {self.detail}"


@dataclass
class Scan:
    root: Path
    table: Optional[dict] = None  # paths, y, split, group, group_names, n_classes[, attrs]; None if unreadable
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was read, e.g. "official attribute files"
    extras: dict = field(default_factory=dict)  # e.g. "shortcut_metrics": (pred, y, attrs) -> dict (UrbanCars)

    def add(self, problem: str, detail: str, fix: str) -> None:
        self.findings.append(Finding(problem, detail, fix))

    def renamed(
        self, problem: str, want: Path, found: Path, folder: bool = False, rename_to: Optional[Path] = None
    ) -> None:
        """`want` is missing but `found`, a near name (`near_name`), exists: a rename to undo."""
        slash = "/" if folder else ""
        self.add(
            problem,
            f"'{want}{slash}' not found, but '{found}{slash}' exists",
            f"rename '{found}' to '{rename_to or want}'",
        )


def _fatal_message(findings: list[Finding], root) -> str:
    f = findings[0]
    more = (
        f" (and {len(findings) - 1} more problem(s); `exmap-ray datasets check` lists them all)"
        if len(findings) > 1
        else ""
    )
    return f"{f.line()}. Fix: {f.fix}{more}"


def scan_or_raise(name: str, dspec) -> Scan:
    """Scan the layout of `dspec`; any finding stops here as a DataError naming the file and the fix."""
    scan = DATASETS.get(name).scan(dspec)
    if scan.findings or scan.table is None:
        raise DataError(f"dataset '{name}' at '{scan.root}': {_fatal_message(scan.findings, scan.root)}")
    return scan


def build_dataset(dspec, seed: int) -> GroupData:
    """The dataset `dspec` names, as a `GroupData`: its builder, or for one on disk the shared image path
    over its scanned table (any finding stops here, naming the file and the fix)."""
    entry = DATASETS.get(dspec.name)
    if entry.build is not None:
        return entry.build(dspec, seed)
    scan = scan_or_raise(entry.name, dspec)
    return image_group_data(
        scan.table,
        dspec,
        entry.name,
        shortcut_metrics=scan.extras.get("shortcut_metrics"),
        how=entry.transforms or PAPER,
    )


def require_root(dspec, name: str, expected: str) -> Path:
    if not dspec.root:
        raise SpecError(
            f"spec key 'dataset.root' is required for dataset.name '{name}' ({expected}); "
            f"e.g. --set dataset.root=/data/... (--root PATH with `exmap-ray datasets check`)"
        )
    return Path(dspec.root).expanduser()


def find_below(root: Path, rel: str, depth: int = 2) -> Optional[Path]:
    """`root/**/rel` up to `depth` folders down (the user pointed at a parent folder), or None."""
    if not root.is_dir():
        return None
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for d in frontier:
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for s in subs:
                if (s / rel).exists():
                    return s
            nxt += subs
        frontier = nxt
    return None


def root_problem(scan: Scan, root: Path, marker: str, folder_name: Optional[str], archive_hint: str = "") -> bool:
    """Check that `root/marker` exists; if not, record where it is instead (a parent folder was given,
    an archive was not extracted) and return False. `folder_name`: the dataset folder's usual name."""
    if (root / marker).exists():
        return True
    the_folder = f"the '{folder_name}' folder" if folder_name else "the folder"
    if not root.is_dir():
        scan.add(
            "missing folder",
            f"dataset.root '{root}' " + ("is not a folder" if root.exists() else "does not exist"),
            f"set dataset.root to {the_folder} that holds {marker}",
        )
        return False
    inner = find_below(root, marker)
    if inner is not None:
        scan.add(
            "wrong folder", f"'{root}' has no {marker}, but '{inner / marker}' exists", f"set dataset.root={inner}"
        )
        return False
    archives = sorted(p.name for p in root.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".zip", ".tar")))
    if archives:
        scan.add(
            "not extracted",
            f"'{root}' has no {marker}; it holds the archive(s) {', '.join(archives)}",
            f"extract it there ({'tar -xzf' if archives[0].endswith(('gz', 'tar')) else 'unzip'} "
            f"{root / archives[0]} -C {root}) and set dataset.root to {the_folder} it makes"
            + (f"; {archive_hint}" if archive_hint else ""),
        )
        return False
    near = near_name(Path(marker).name, [p.name for p in root.iterdir()])
    if near is not None:
        scan.renamed("renamed file", root / marker, root / near)
        return False
    scan.add(
        "missing file",
        f"'{root / marker}' not found",
        f"set dataset.root to {the_folder} that holds {marker}" + (f"; {archive_hint}" if archive_hint else ""),
    )
    return False


def missing_files(scan: Scan, absent: list[tuple[str, Path]], listed_in: str, fix: str) -> None:
    """One finding for all files listed but not on disk: the count and the first few, by location."""
    if not absent:
        return
    shown = "; ".join(f"{where}: '{p}'" for where, p in absent[:MAX_LISTED])
    more = f" and {len(absent) - MAX_LISTED} more" if len(absent) > MAX_LISTED else ""
    scan.add("missing file", f"{len(absent)} image file(s) listed in {listed_in} are not on disk: {shown}{more}", fix)


def unreadable_images(paths: list[Path]) -> list[tuple[Path, str]]:
    """Every file PIL cannot open and verify, with the reason."""
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except FileNotFoundError:
            continue  # reported as a missing file
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, struct.error)
            msg = str(e)
            bad.append((p, type(e).__name__ + (f": {msg}" if msg and str(p) not in msg else "")))
    return bad


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    name: str
    root: Optional[Path]
    counts: Optional[dict] = None  # split -> group name -> n
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_images: int = 0
    verified: bool = False  # every image was opened

    @property
    def ok(self) -> bool:
        return not self.findings

    def raise_if_bad(self) -> None:
        if self.findings:
            raise DataError(
                f"dataset '{self.name}'"
                + (f" at '{self.root}'" if self.root else "")
                + ": "
                + _fatal_message(self.findings, self.root)
            )

    def format(self) -> str:
        lines = [f"dataset {self.name}" + (f" at {self.root}" if self.root else "")]
        lines += [f"  {n}" for n in self.notes]
        if self.counts:
            groups = list(next(iter(self.counts.values())).keys())
            width = max(12, *(len(g) for g in groups)) + 2
            lines.append("")
            lines.append(f"{'group':<{width}}" + "".join(f"{s:>9}" for s in SPLIT_NAMES) + f"{'total':>9}")
            for g in groups:
                row = [self.counts[s].get(g, 0) for s in SPLIT_NAMES]
                lines.append(f"{g:<{width}}" + "".join(f"{n:>9}" for n in row) + f"{sum(row):>9}")
            tot = [sum(self.counts[s].values()) for s in SPLIT_NAMES]
            lines.append(f"{'all':<{width}}" + "".join(f"{n:>9}" for n in tot) + f"{sum(tot):>9}")
        lines.append("")
        if self.ok:
            how = "every image opened" if self.verified else "images not opened"
            lines.append(f"OK: {self.n_images} images, layout as expected ({how})")
            return "\n".join(lines)
        lines.append(f"{len(self.findings)} problem(s):")
        for i, f in enumerate(self.findings, 1):
            lines.append(f"  {i}. {f.line()}")
        lines.append("")
        for i, f in enumerate(self.findings, 1):
            lines.append(f"fix {i}: {f.fix}")
        return "\n".join(lines)


def _counts(table: dict, ok_rows: np.ndarray | None = None) -> dict:
    split, group = np.asarray(table["split"]), np.asarray(table["group"])
    keep = np.ones(len(split), bool) if ok_rows is None else ok_rows
    out = {}
    for code, s in enumerate(SPLIT_NAMES):
        m = keep & (split == code)
        out[s] = {name: int(((group == g) & m).sum()) for g, name in enumerate(table["group_names"])}
    return out


def _verified_marker(dspec, files: list[Path]) -> Optional[Path]:
    """A marker beside the decode cache saying these exact files (paths, sizes, mtimes) all opened:
    later checks (every run's preflight, sweeps) skip re-opening hundreds of thousands of images."""
    cache = decode_cache_dir(dspec)
    return None if cache is None or not files else cache / f"verified-{dspec.name}-{_files_key(files, 0)}"


def check_dataset(
    dspec, verify: bool = True, seed: int = 0, progress: Optional[Callable[[str], None]] = None
) -> Report:
    """Layout, counts, missing and unreadable files of the dataset `dspec` describes."""
    entry = DATASETS.get(dspec.name)
    if entry.scan is None:
        return _check_by_building(entry, dspec, seed)
    scan = entry.scan(dspec)
    report = Report(entry.name, scan.root, findings=list(scan.findings), notes=list(scan.notes))
    if scan.table is None:
        return report
    paths = scan.table["paths"]
    present = np.array([p.is_file() for p in paths], bool) if paths else np.zeros(0, bool)
    report.counts = _counts(scan.table, present)
    report.n_images = int(present.sum())
    if verify:
        files = [p for p, ok in zip(paths, present) if ok]
        marker = _verified_marker(dspec, files)
        if marker is not None and marker.is_file():
            report.verified = True
            report.notes.append(f"images verified by an earlier check; sizes and times unchanged ({marker})")
            return report
        if progress:
            progress(f"opening {report.n_images} images ...")
        bad = unreadable_images(files)
        report.verified = True
        if not bad and not report.findings and marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        if bad:
            shown = "; ".join(f"'{p}' ({why})" for p, why in bad[:MAX_LISTED])
            more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            report.findings.append(
                Finding(
                    "unreadable image",
                    f"{len(bad)} file(s) cannot be read as images: {shown}{more}",
                    "replace them with the original files (re-extract the dataset archive), or delete them and "
                    "their rows/entries from the index",
                )
            )
    return report


def _check_by_building(entry: DatasetEntry, dspec, seed: int) -> Report:
    """A dataset made in memory (no files to scan): build it (its own checks raise DataError) and count."""
    report = Report(entry.name, None)
    try:
        data = entry.build(dspec, seed)
    except DataError as e:
        report.findings.append(Finding("build", str(e), "see the message: it names the file or the key"))
        return report
    report.counts = {
        s: {g: int((data.split(s).group == i).sum()) for i, g in enumerate(data.group_names)} for s in SPLIT_NAMES
    }
    report.n_images = sum(len(data.split(s)) for s in SPLIT_NAMES)
    return report


def check_before_run(dspec) -> None:
    """What a run checks before any work starts: a dataset on disk gets the check `exmap-ray datasets
    check` does (layout, index files, every missing and unreadable image); a dataset made in memory has
    nothing on disk, and its builder raises on bad keys."""
    if DATASETS.get(dspec.name).scan is not None:
        check_dataset(dspec).raise_if_bad()
