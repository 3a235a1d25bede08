"""The archive stream: which files a backup takes, the tar writer, and the chunked AES-256-GCM writer/reader.

Memory stays bounded whatever the file sizes: the tar is produced and sealed chunk by chunk into the upload
sink's part buffers, and a restore authenticates and unpacks chunk by chunk.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from retrain.backup import crypto
from retrain.backup.common import (
    EXCLUDE_DIRS,
    INCLUDE_DIRS,
    INCLUDE_FILES,
    TAG_BYTES,
    BackupError,
    BackupIntegrityError,
)


def _excluded(rel: str) -> bool:
    return any(rel == d or rel.endswith("/" + d) for d in EXCLUDE_DIRS)


def select_files(run_dir: str | Path, include_files: Sequence[str] = INCLUDE_FILES,
                 include_dirs: Sequence[str] = INCLUDE_DIRS) -> list[tuple[str, Path, os.stat_result]]:
    """(relative posix path, absolute path, stat) of the files a backup takes, sorted; symlinks are skipped
    (they could point outside the run directory)."""
    root = Path(run_dir)
    picked: dict[str, tuple[Path, os.stat_result]] = {}
    for name in include_files:
        p = root / name
        if p.is_file() and not p.is_symlink():
            picked[name] = (p, p.stat())
    for d in include_dirs:
        base = root / d
        if not base.is_dir() or base.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            # A crashed training attempt leaves adapter.tmp/ or merged.tmp/ behind: not worth keeping.
            # Exclusions hold at any depth: a tenant's sub-run (tenants/<t>/candidate/checkpoints) like the run's own.
            dirnames[:] = sorted(n for n in dirnames if not _excluded(f"{rel_dir}/{n}")
                                 and not n.endswith((".tmp", ".partial"))
                                 and not (Path(dirpath) / n).is_symlink())
            for n in filenames:
                p = Path(dirpath) / n
                if p.is_symlink() or not p.is_file() or n.endswith((".tmp", ".partial")):
                    continue
                picked[f"{rel_dir}/{n}"] = (p, p.stat())
    return [(rel, p, st) for rel, (p, st) in sorted(picked.items())]


# --- writing -----------------------------------------------------------------------------------------------


class EncryptingWriter:
    """Plaintext sink: stages CHUNK_SIZE bytes at a time in one reused buffer and seals each chunk with
    AES-256-GCM directly into the sink's part buffer (encrypt_into: no per-chunk allocation)."""

    def __init__(self, sink, enc_key: bytes, header: bytes, prefix: bytes, chunk_size: int):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(enc_key)
        self._sink, self._header, self._prefix, self._cs = sink, header, prefix, chunk_size
        self._chunk = bytearray(chunk_size)
        self._view = memoryview(self._chunk)
        self._fill = 0
        self._pos = 0
        self.chunks = 0
        sink.write(header)

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        n, off = len(src), 0
        while off < n:
            # A full chunk is sealed only once more data arrives: only finish() knows which chunk is the last.
            if self._fill == self._cs:
                self._seal(final=False)
            take = min(self._cs - self._fill, n - off)
            self._view[self._fill:self._fill + take] = src[off:off + take]
            self._fill += take
            off += take
        self._pos += n
        return n

    def _seal(self, final: bool) -> None:
        i, n = self.chunks, self._fill
        out = self._sink.reserve(n + TAG_BYTES)
        self._aead.encrypt_into(crypto.nonce(self._prefix, i, final), self._view[:n],
                                crypto.aad(self._header, i, final), out)
        self._sink.commit(out)
        self.chunks += 1
        self._fill = 0

    def tell(self) -> int:
        return self._pos

    def finish(self) -> int:
        self._seal(final=True)
        return self._pos


_BLOCK = 512
_RECORD = 20 * _BLOCK  # what tar(1) pads an archive to


def write_tar(writer: EncryptingWriter, files) -> list[dict]:
    """Stream a POSIX (pax) tar of ``files`` into ``writer``, hashing each file as it is read. Written by hand
    (headers from tarfile) so file data moves through one reused 1 MiB buffer instead of a new bytes per read."""
    import tarfile

    buf = bytearray(1 << 20)
    view = memoryview(buf)
    entries: list[dict] = []
    for rel, path, st in files:
        info = tarfile.TarInfo(rel)
        info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), st.st_mode & 0o777
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        writer.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        sha = hashlib.sha256()
        left = st.st_size
        with open(path, "rb", buffering=0) as fh:
            while left:
                got = fh.readinto(view[:min(left, len(buf))])
                if not got:
                    raise BackupError(f"{path} shrank while it was being backed up: make sure no task still writes "
                                      "to the run directory, then retry")
                sha.update(view[:got])
                writer.write(view[:got])
                left -= got
        if st.st_size % _BLOCK:
            writer.write(bytes(_BLOCK - st.st_size % _BLOCK))
        entries.append({"path": rel, "bytes": st.st_size, "sha256": sha.hexdigest()})
    end = 2 * _BLOCK
    end += (-(writer.tell() + end)) % _RECORD
    writer.write(bytes(end))
    return entries


# --- reading -----------------------------------------------------------------------------------------------


class DecryptingReader(io.RawIOBase):
    """Plaintext of an archive, authenticated chunk by chunk; raises BackupIntegrityError at the first bad chunk."""

    def __init__(self, src, total: int, header: bytes, enc_key: bytes, prefix: bytes, chunk_size: int,
                 backup_id: str):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        super().__init__()
        self._src, self._header, self._prefix, self._cs, self._bid = src, header, prefix, chunk_size, backup_id
        self._aead = AESGCM(enc_key)
        body = total - len(header)
        step = chunk_size + TAG_BYTES
        self.n_chunks = max(1, -(-body // step))
        last = body - (self.n_chunks - 1) * step
        if body < TAG_BYTES or last < TAG_BYTES:
            raise BackupIntegrityError(
                f"archive of backup {backup_id} is truncated ({total} bytes cannot hold whole chunks): restore "
                "another backup (list_backups) and re-run the backup of this run"
            )
        self._last_len = last
        self._index = 0
        self._plain = memoryview(b"")
        self.plain_bytes = 0

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        from cryptography.exceptions import InvalidTag

        if self._index >= self.n_chunks:
            return False
        i = self._index
        final = i == self.n_chunks - 1
        want = self._last_len if final else self._cs + TAG_BYTES
        sealed = self._src.read(want)
        if len(sealed) != want:
            raise BackupIntegrityError(
                f"archive of backup {self._bid} ended early in chunk {i + 1} of {self.n_chunks}: the object is "
                "truncated; restore another backup (list_backups) and re-run the backup of this run"
            )
        try:
            plain = self._aead.decrypt(crypto.nonce(self._prefix, i, final), sealed,
                                       crypto.aad(self._header, i, final))
        except InvalidTag:
            where = "the last chunk" if final else f"chunk {i + 1} of {self.n_chunks}"
            why = ("the archive was truncated or modified" if final else "the archive was modified after upload "
                   "(or chunks were reordered)")
            raise BackupIntegrityError(
                f"{where} of backup {self._bid} failed authentication: {why}. Do not use this backup: restore an "
                "older one (list_backups) and check who can write to the bucket"
            ) from None
        self._index += 1
        self._plain = memoryview(plain)
        self.plain_bytes += len(plain)
        return True

    def readinto(self, b) -> int:
        while not len(self._plain):
            if not self._next_chunk():
                return 0
        n = min(len(b), len(self._plain))
        b[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n

    def drain(self) -> None:
        """Read (and authenticate) everything that is left, e.g. the tar padding after the end marker."""
        self._plain = memoryview(b"")
        while self._next_chunk():
            self._plain = memoryview(b"")


def safe_member(member, backup_id: str) -> str:
    """The member's normalised relative path; refuses links, devices and paths that leave the target."""
    name = member.name
    p = PurePosixPath(name)
    if (not name or "\\" in name or "\x00" in name or p.is_absolute() or ".." in p.parts
            or (p.parts and p.parts[0] in ("", "."))):
        raise BackupIntegrityError(f"archive of backup {backup_id} holds an unsafe path {name!r} (absolute or "
                                   "with '..'): refusing to unpack it")
    if not (member.isreg() or member.isdir()):
        raise BackupIntegrityError(f"archive of backup {backup_id} holds {name!r} of a type a backup never "
                                   "contains (link or device): refusing to unpack it")
    return p.as_posix()


class MemberTree:
    """The paths an archive has unpacked so far: refuses a member that would need a file to be a directory or
    the other way round (``a`` then ``a/b``, ``a/b`` then ``a``), which no backup_run ever writes."""

    def __init__(self, backup_id: str):
        self._bid = backup_id
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def _conflict(self, name: str, other: str) -> BackupIntegrityError:
        return BackupIntegrityError(
            f"archive of backup {self._bid} holds conflicting members {other!r} and {name!r} (one would have to be "
            "both a file and a directory): refusing it; restore another backup (list_backups)")

    def add(self, name: str, is_dir: bool) -> None:
        parents = [p.as_posix() for p in PurePosixPath(name).parents if p.as_posix() != "."]
        for parent in parents:
            if parent in self.files:
                raise self._conflict(name, parent)
        if (name in self.files) if is_dir else (name in self.dirs):
            raise self._conflict(name, name)  # (a file listed twice is the caller's "listed twice" error)
        (self.dirs if is_dir else self.files).add(name)
        self.dirs.update(parents)


def hash_stream(fobj, out=None) -> str:
    """SHA-256 of what ``fobj`` yields, copying it to ``out`` (a binary file) on the way when given."""
    h = hashlib.sha256()
    while block := fobj.read(1 << 20):
        h.update(block)
        if out is not None:
            out.write(block)
    return h.hexdigest()
