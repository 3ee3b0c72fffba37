"""Dataset layout checks: `exmap-ray datasets check NAME --root PATH`, and the same check in preflight.

A dataset with an on-disk layout registers a *scanner* under its name in `LAYOUTS`. A scanner reads
the dataset's index (metadata files, folder names) without decoding images and returns a `Scan`:
the table of samples (paths, labels, split, true group, attributes) and every problem it found, each
a `Finding` with what is wrong, where, and the precise fix. Builders use the same scanner
(`scan_or_raise`), so a run and the check agree on what is broken.

`check_dataset` adds the per-split, per-group counts and opens every image (PIL's verify: header
and structure, no full decode) to find unreadable files. Datasets without a scanner (cmnist,
folder) are checked by building them and verifying their image files the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from ..errors import DataError, SpecError, near_name
from ..registry import Registry

LAYOUTS: Registry = Registry("dataset layout", "dataset.name")
SPLIT_NAMES = ("train", "val", "test")
MAX_LISTED = 5  # files named per finding; the count says how many there are


@dataclass
class Finding:
    problem: str   # short kind: "missing file", "unreadable image", "missing column", "wrong folder name", ...
    detail: str    # what and where: the file, line, column or folder
    fix: str       # the precise fix

    def line(self) -> str:
        return f"{self.problem}: {self.detail}"


@dataclass
class Scan:
    root: Path
    table: Optional[dict] = None   # paths, y, split, group, group_names, n_classes[, attrs]; None if unreadable
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)    # what was read, e.g. "official attribute files"
    extras: dict = field(default_factory=dict)         # scanner-specific (e.g. UrbanCars ratios)

    def add(self, problem: str, detail: str, fix: str) -> None:
        self.findings.append(Finding(problem, detail, fix))

    def renamed(self, problem: str, want: Path, found: Path, folder: bool = False,
                rename_to: Optional[Path] = None) -> None:
        """`want` is missing but `found`, a near name (`near_name`), exists: a rename to undo."""
        slash = "/" if folder else ""
        self.add(problem, f"'{want}{slash}' not found, but '{found}{slash}' exists",
                 f"rename '{found}' to '{rename_to or want}'")


def _fatal_message(findings: list[Finding], root) -> str:
    f = findings[0]
    more = f" (and {len(findings) - 1} more problem(s); `exmap-ray datasets check` lists them all)" \
        if len(findings) > 1 else ""
    return f"{f.line()}. Fix: {f.fix}{more}"


def scan_or_raise(name: str, dspec) -> Scan:
    """Scan the layout of `dspec`; any finding stops here as a DataError naming the file and the fix."""
    scan = LAYOUTS.get(name)(dspec)
    if scan.findings or scan.table is None:
        raise DataError(f"dataset '{name}' at '{scan.root}': {_fatal_message(scan.findings, scan.root)}")
    return scan


def require_root(dspec, name: str, expected: str) -> Path:
    if not dspec.root:
        raise SpecError(f"spec key 'dataset.root' is required for dataset.name '{name}' ({expected}); "
                        f"e.g. --set dataset.root=/data/... (--root PATH with `exmap-ray datasets check`)")
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


def root_problem(scan: Scan, root: Path, marker: str, folder_name: str, archive_hint: str = "") -> bool:
    """Check that `root/marker` exists; if not, record where it is instead (a parent folder was given,
    an archive was not extracted) and return False."""
    if (root / marker).exists():
        return True
    if not root.exists():
        scan.add("missing folder", f"dataset.root '{root}' does not exist",
                 f"set dataset.root to the '{folder_name}' folder (it holds {marker})")
        return False
    inner = find_below(root, marker)
    if inner is not None:
        scan.add("wrong folder", f"'{root}' has no {marker}, but '{inner / marker}' exists",
                 f"set dataset.root={inner}")
        return False
    archives = sorted(p.name for p in root.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".zip", ".tar")))
    if archives:
        scan.add("not extracted", f"'{root}' has no {marker}; it holds the archive(s) {', '.join(archives)}",
                 f"extract it there ({'tar -xzf' if archives[0].endswith(('gz', 'tar')) else 'unzip'} "
                 f"{root / archives[0]} -C {root}) and set dataset.root to the '{folder_name}' folder it makes"
                 + (f"; {archive_hint}" if archive_hint else ""))
        return False
    near = near_name(Path(marker).name, [p.name for p in root.iterdir()])
    if near is not None:
        scan.renamed("renamed file", root / marker, root / near)
        return False
    scan.add("missing file", f"'{root / marker}' not found",
             f"set dataset.root to the '{folder_name}' folder that holds {marker}" +
             (f"; {archive_hint}" if archive_hint else ""))
    return False


def missing_files(scan: Scan, absent: list[tuple[str, Path]], listed_in: str, fix: str) -> None:
    """One finding for all files listed but not on disk: the count and the first few, by location."""
    if not absent:
        return
    shown = "; ".join(f"{where}: '{p}'" for where, p in absent[:MAX_LISTED])
    more = f" and {len(absent) - MAX_LISTED} more" if len(absent) > MAX_LISTED else ""
    scan.add("missing file", f"{len(absent)} image file(s) listed in {listed_in} are not on disk: {shown}{more}",
             fix)


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
    counts: Optional[dict] = None          # split -> group name -> n
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_images: int = 0
    verified: bool = False                 # every image was opened

    @property
    def ok(self) -> bool:
        return not self.findings

    def raise_if_bad(self) -> None:
        if self.findings:
            raise DataError(f"dataset '{self.name}'" + (f" at '{self.root}'" if self.root else "") + ": "
                            + _fatal_message(self.findings, self.root))

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


def empty_groups(scan: Scan, counts: dict, fix: str) -> None:
    """A true group with no images in a split cannot be scored there: name it."""
    for s in SPLIT_NAMES:
        empty = [g for g, n in counts[s].items() if n == 0]
        if empty:
            scan.add("empty group", f"the {s} split has no images of group(s) {', '.join(repr(g) for g in empty)}",
                     fix)


def _verified_marker(dspec, files: list[Path]) -> Optional[Path]:
    """A marker beside the decode cache saying these exact files (paths, sizes, mtimes) all opened:
    later checks (every run's preflight, sweeps) skip re-opening hundreds of thousands of images."""
    from .images import _files_key, decode_cache_dir

    cache = decode_cache_dir(dspec)
    return None if cache is None or not files else cache / f"verified-{dspec.name}-{_files_key(files, 0)}"


def check_dataset(dspec, verify: bool = True, seed: int = 0,
                  progress: Optional[Callable[[str], None]] = None) -> Report:
    """Layout, counts, missing and unreadable files of the dataset `dspec` describes."""
    from .base import build_dataset

    name = dspec.name
    if name in LAYOUTS:
        scan = LAYOUTS.get(name)(dspec)
        report = Report(name, scan.root, findings=list(scan.findings), notes=list(scan.notes))
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
                report.findings.append(Finding(
                    "unreadable image", f"{len(bad)} file(s) cannot be read as images: {shown}{more}",
                    "replace them with the original files (re-extract the dataset archive), or delete them and "
                    "their rows/entries from the index"))
        return report
    # no scanner: build it (its own checks raise DataError) and verify whatever image files it has
    root = Path(dspec.root).expanduser() if getattr(dspec, "root", None) else None
    report = Report(name, root)
    try:
        data = build_dataset(dspec, seed)
    except DataError as e:
        report.findings.append(Finding("layout", str(e), "see the message: it names the file, line or column"))
        return report
    report.counts = {s: {g: int((data.split(s).group == i).sum()) for i, g in enumerate(data.group_names)}
                     for s in SPLIT_NAMES}
    report.n_images = sum(len(data.split(s)) for s in SPLIT_NAMES)
    files = [p for s in SPLIT_NAMES for p in getattr(data.split(s).images, "paths", [])]
    if verify and files:
        bad = unreadable_images(files)
        report.verified = True
        if bad:
            report.findings.append(Finding(
                "unreadable image", f"{len(bad)} file(s) cannot be read as images, e.g. '{bad[0][0]}' ({bad[0][1]})",
                "replace them or drop their rows from the index"))
    return report


# --------------------------------------------------------------------------- the group_DRO metadata.csv


def _as_int(v) -> Optional[int]:
    try:
        f = float(str(v).strip())
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def scan_metadata_csv(scan: Scan, root: Path, source: str, values: dict | None = None) -> Optional[dict]:
    """Check ROOT/metadata.csv in the group_DRO layout (img_filename, y, split, place) and read it with the
    `folder` loader's reader. Every bad column, split value, label value and missing file is a finding;
    returns the folder reader's dict (paths, y, split, group, spurious, ...) or None."""
    import csv

    from .folder import read_metadata

    meta = root / "metadata.csv"
    columns = ("img_filename", "y", "split", "place")
    values = values if values is not None else {"y": (0, 1), "place": (0, 1)}
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    for c in columns:
        if c in header:
            continue
        near = near_name(c, [h for h in header if h not in columns])
        if near:
            scan.add("missing column", f"'{meta}' has no column '{c}' (its header: {', '.join(header)})",
                     f"rename the column '{near}' to '{c}' in the first line of {meta}")
        else:
            scan.add("missing column", f"'{meta}' has no column '{c}' (its header: {', '.join(header)})",
                     f"restore {meta} from {source}; it needs the columns {', '.join(columns)}")
    if scan.findings:
        return None
    if not rows:
        scan.add("empty index", f"'{meta}' has a header but no rows", f"restore {meta} from {source}")
        return None
    for col, allowed in [("split", (0, 1, 2))] + list(values.items()):
        bad = [(i + 2, r[col]) for i, r in enumerate(rows) if _as_int(r[col]) not in allowed]
        if bad:
            shown = ", ".join(f"line {ln} has {v!r}" for ln, v in bad[:MAX_LISTED])
            more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            what = "0 (train), 1 (val) or 2 (test)" if col == "split" else " or ".join(map(str, allowed))
            scan.add(f"bad {col} value", f"'{meta}' column '{col}': {shown}{more}",
                     f"set column '{col}' on those lines of {meta} to {what}" +
                     (f" (or restore the file from {source})" if col != "split" else ""))
    if scan.findings:
        return None
    try:
        m = read_metadata(root, missing_ok=True)
    except DataError as e:
        scan.add("bad index", str(e), f"fix {meta} as the message says, or restore it from {source}")
        return None
    missing_files(scan, [(f"line {ln}", p) for ln, p in m["absent"]], f"'{meta}'",
                  f"restore those files from {source}, or delete their lines from {meta}")
    return m
