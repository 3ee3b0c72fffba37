"""The storage root: one local path or URI under which every artifact of a run lives.

    from exmap_ray.storage import Loc
    root = Loc.parse("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http")  # or a local path
    (root / "a" / "x.json").write_text("{}")        # an object appears whole, or not at all
    arr = np.load((root / "a" / "h.npy").local_copy(), mmap_mode="r")

URIs use the syntax of Ray's `storage_path` (`pyarrow.fs.FileSystem.from_uri`): `s3://`, `gs://`,
`hdfs://`, `file://`, with the filesystem's options in the query string. Reads and writes go
through pyarrow's filesystems, which Ray itself uses; `Loc` only adds the path arithmetic and
the few pathlib-like calls the engine needs, so the same code runs on a laptop's disk and on a
bucket that the nodes of a cluster share.

Writes are atomic: a local file is written to a temp name and renamed; an object store makes an
object visible only when its upload completes. A `Loc` travels to Ray tasks and actors as its
URI string (`str(loc)`), never as a driver-local path.

`local_copy()` gives a local file for memory-mapped reads. For a remote root that file lives in
the **node-local derived cache** ($EXMAP_RAY_NODE_CACHE, default ~/.cache/exmap_ray/storage): a
copy any node can rebuild from the root, keyed by the object's URI, size and modification time.

The IO helpers every module writes through live here too (the bottom of this file): `atomic_path`
(temp file + rename, a full disk named as `DiskFullError`), `write_json` / `read_json`, `save_npy` /
`load_npy`, `save_npz` / `load_npz`, each taking a local path or a `Loc`.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np

from .errors import UserError

NODE_CACHE_ENV = "EXMAP_RAY_NODE_CACHE"
PROBE_TIMEOUT_S = 15.0  # an endpoint that has not answered by then is reported as unreachable


def node_cache_dir() -> Path:
    """The node-local derived cache: downloaded copies of immutable stage files, rebuildable from the root."""
    return Path(os.environ.get(NODE_CACHE_ENV) or Path.home() / ".cache" / "exmap_ray" / "storage")


def is_uri(s: str | os.PathLike) -> bool:
    s = str(s)
    return "://" in s and not s.startswith("file://")


class Loc:
    """A file or folder under a storage root (see the module docstring). Immutable and hashable."""

    __slots__ = ("fs", "path", "scheme", "query")

    def __init__(self, fs, path: str, scheme: str = "", query: str = ""):
        self.fs, self.path, self.scheme, self.query = fs, path, scheme, query

    # ------------------------------------------------------------------ construction

    @classmethod
    def parse(cls, where: "str | os.PathLike | Loc") -> "Loc":
        """A local path or a URI; bad URIs raise UserError naming them and the accepted forms."""
        if isinstance(where, Loc):
            return where
        s = os.fspath(where) if not isinstance(where, str) else where
        if not is_uri(s):
            from pyarrow import fs as pafs

            p = s[len("file://") :] if s.startswith("file://") else s
            return cls(pafs.LocalFileSystem(), str(Path(p).expanduser().resolve()))
        from pyarrow import fs as pafs
        from pyarrow.lib import ArrowException

        parts = urlsplit(s)
        try:
            fs, path = pafs.FileSystem.from_uri(s)
        except (ArrowException, ValueError, OSError) as e:
            raise UserError(
                f"storage URI '{redact(s)}' cannot be used ({' '.join(str(e).split())[:200]}). "
                f"Give a local path, or a URI as Ray's storage_path takes it: "
                f"s3://BUCKET/PREFIX[?region=...&endpoint_override=HOST:PORT&scheme=http] or "
                f"gs://BUCKET/PREFIX"
            ) from None
        return cls(fs, path.rstrip("/"), parts.scheme, parts.query)

    # ------------------------------------------------------------------ path arithmetic

    @property
    def is_local(self) -> bool:
        return not self.scheme

    def __truediv__(self, name: str | os.PathLike) -> "Loc":
        name = str(name).strip("/")
        return Loc(self.fs, f"{self.path}/{name}" if self.path else name, self.scheme, self.query)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Loc":
        return Loc(self.fs, self.path.rstrip("/").rsplit("/", 1)[0], self.scheme, self.query)

    def __str__(self) -> str:
        """The URI (or local path) that rebuilds this Loc with `Loc.parse` on any node."""
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"Loc({redact(str(self))!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Loc) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __fspath__(self) -> str:
        if not self.is_local:  # a remote object handed to open()/np.load: a bug, caught loudly here
            raise TypeError(f"{redact(str(self))} is not a local file; read it with read_bytes() or local_copy()")
        return self.path

    @property
    def local_path(self) -> Path:
        return Path(os.fspath(self))

    @property
    def fs_path(self) -> str:
        """The path inside `fs` (Ray's storage_path with storage_filesystem=fs)."""
        return self.path

    # ------------------------------------------------------------------ queries

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type == pafs.FileType.Directory

    def iterdir(self) -> Iterator["Loc"]:
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            yield Loc(self.fs, info.path.rstrip("/"), self.scheme, self.query)

    def glob(self, pattern: str) -> Iterator["Loc"]:
        """Matches per path component (`*/x.json`), as pathlib's glob without `**`."""
        head, _, rest = pattern.partition("/")
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, head):
                if not rest:
                    yield child
                elif child.is_dir():
                    yield from child.glob(rest)

    # ------------------------------------------------------------------ reads

    def read_bytes(self) -> bytes:
        if self.is_local:
            return Path(self.path).read_bytes()
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def local_copy(self) -> Path:
        """A local file with this file's bytes: the file itself when local, else a node-cache copy."""
        if self.is_local:
            return Path(self.path)
        info = self._info()
        tag = hashlib.sha1(f"{self}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
        dest = node_cache_dir() / tag / self.name
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with self.fs.open_input_stream(self.path) as src, open(tmp, "wb") as out:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return dest

    # ------------------------------------------------------------------ writes

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        if self.is_local:
            Path(self.path).mkdir(parents=parents, exist_ok=exist_ok)
        # object stores have no folders: a prefix exists once an object is under it

    def write_bytes(self, data: bytes) -> None:
        if self.is_local:
            with atomic_path(Path(self.path)) as tmp:
                tmp.write_bytes(data)
            return
        with self.fs.open_output_stream(self.path) as f:  # the object appears when the upload completes
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    @contextlib.contextmanager
    def writer(self) -> Iterator[io.BufferedIOBase]:
        """A binary stream for large writes; the file appears whole when the block exits cleanly."""
        if self.is_local:
            with atomic_path(Path(self.path)) as tmp, open(tmp, "wb") as f:
                yield f
            return
        buf = io.BytesIO()
        yield buf
        self.write_bytes(buf.getvalue())

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self.path)


def redact(uri: str) -> str:
    """A URI fit for logs: secrets in its query (access_key, secret_key, session_token) replaced by ***."""
    if "?" not in uri:
        return uri
    base, query = uri.split("?", 1)
    parts = []
    for kv in query.split("&"):
        k, _, v = kv.partition("=")
        parts.append(f"{k}=***" if k.lower() in {"access_key", "secret_key", "session_token"} else kv)
    return base + "?" + "&".join(parts)


def _s3_credentials_given(loc: Loc) -> bool:
    """Whether any S3 credential source other than an instance profile is visible to this process."""
    if "access_key=" in loc.query or os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"):
        return True
    return (Path.home() / ".aws" / "credentials").is_file() or bool(os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"))


def _probe_hint(low: str, loc: Loc) -> str:
    """What a failed probe of a storage root most likely means, from its lower-cased error text."""
    unreachable = (
        "could not connect",
        "couldn't connect",
        "network_connection",
        "connection refused",
        "could not resolve",
        "couldn't resolve",
        "name or service not known",
        "timed out",
    )
    if "nosuchbucket" in low.replace(" ", "") or "bucket does not exist" in low or "no such bucket" in low:
        hint = f"the bucket does not exist; create it (aws s3 mb {loc.scheme}://{loc.path.split('/')[0]})"
    elif any(w in low for w in unreachable):  # before the credential words: a port number may hold "403"
        hint = "the endpoint does not answer; check endpoint_override/scheme and the network"
    elif any(
        w in low
        for w in (
            "access denied",
            "accessdenied",
            "access_denied",
            "forbidden",
            "credential",
            "signature",
            "invalidaccesskeyid",
            "invalid_access_key",
        )
    ) or re.search(r"(?<![\d:])403(?!\d)", low):
        hint = "the credentials are refused or may not write there; check the instance profile or AWS_* variables"
    elif loc.scheme == "s3" and not _s3_credentials_given(loc):
        hint = (
            "no S3 credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or run on a node with an instance profile"
        )
    elif any(w in low for w in ("connect", "resolve", "curl", "network", "refused", "timed out")):
        hint = "the endpoint does not answer; check endpoint_override/scheme and the network"
    else:
        hint = "check the bucket, the credentials and the endpoint"
    return hint


def check_root(where: str | os.PathLike, what: str = "--out", timeout: float = PROBE_TIMEOUT_S) -> Loc:
    """Parse `where` and prove it writable in seconds: write, read back and delete a probe file.

    Raises UserError naming the location (secrets redacted) and saying what to fix; nothing else
    of the run has started by then.
    """
    loc = Loc.parse(where)
    shown = redact(str(loc))
    if loc.is_local:
        p = Path(loc.path)
        parent = next((q for q in (p, *p.parents) if q.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UserError(f"{what} '{shown}': '{parent}' is a file, not a folder; pick another path")
        try:  # probe the deepest folder that exists: a bad run leaves no folder of its own behind
            import tempfile

            with tempfile.TemporaryFile(dir=parent or Path.cwd(), prefix=".exmap-ray-probe-"):
                pass
        except OSError as e:
            raise UserError(
                f"{what} '{shown}' cannot be written ({e.strerror or e}); pick a folder you can "
                f"write, or a storage URI such as s3://BUCKET/PREFIX"
            ) from None
        return loc
    result: dict = {}

    def attempt():
        try:
            probe = loc / f".exmap-ray-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"ok")
            ok = probe.read_bytes() == b"ok"
            probe.unlink()
            result["ok"] = ok
        except Exception as e:  # noqa: BLE001 - every failure becomes one message below
            result["error"] = e

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise UserError(
            f"{what} '{shown}': no answer from the storage endpoint within {timeout:g} s. Check the "
            f"endpoint (endpoint_override), the network, and that credentials can be found "
            f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an instance profile, or "
            f"GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if "error" in result:
        e = result["error"]
        msg = " ".join(str(e).split())[:300]
        low = msg.lower()
        hint = _probe_hint(low, loc)
        raise UserError(f"{what} '{shown}' cannot be used: {hint} ({type(e).__name__}: {msg})") from None
    if not result.get("ok"):
        raise UserError(f"{what} '{shown}': a probe file written there did not read back; the store is not usable")
    return loc


# ── IO helpers: atomic writes and the json/npy formats, to a local path or a Loc ──────────────────


class DiskFullError(UserError):
    """The filesystem ran out of space (or quota) while an artifact was being written."""


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, else remove it.

    A full disk becomes a `DiskFullError` naming the file; the temp file is removed, so no
    partial artifact is ever left under its final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        free = _free_bytes(path.parent)
        # numpy's tofile reports a short write without an errno ("N requested and M written")
        short_write = e.errno is None and "requested and" in str(e) and free is not None and free < 2**20
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) and not short_write:
            raise
        raise DiskFullError(
            f"disk full while writing '{path}' ({os.strerror(e.errno or errno.ENOSPC)}; "
            f"{'unknown' if free is None else f'{free / 2**20:.1f} MiB'} free on its filesystem). Free some space "
            f"or point --out/--cache at a bigger disk, then run again: the partial file was removed and its "
            f"stage was not marked done, so nothing partial will be reused"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _to_loc(path) -> "Loc":
    return Loc.parse(path)


def write_json(path: "Path | Loc", obj: Any) -> None:
    """Atomically, to a local path or a storage location."""
    _to_loc(path).write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: "Path | Loc") -> Any:
    loc = _to_loc(path)
    text = loc.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{redact(str(loc))} is not valid JSON ({e}); it starts {text[:80]!r}") from e


def save_npy(path: "Path | Loc", arr: np.ndarray) -> None:
    with _to_loc(path).writer() as f:
        np.save(f, arr)


def save_npz(path: "Path | Loc", **arrays: np.ndarray) -> None:
    with _to_loc(path).writer() as f:
        np.savez(f, **arrays)


def load_npy(path: "Path | Loc", mmap: bool = False) -> np.ndarray:
    """A .npy from a local path or the storage root (remote files go through the node-local cache)."""
    return np.load(_to_loc(path).local_copy(), mmap_mode="r" if mmap else None)


def load_npz(path: "Path | Loc") -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(_to_loc(path).read_bytes())) as z:
        return dict(z)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
