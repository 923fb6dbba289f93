"""Getting a model: the supported checkpoints, `pull` into the Hugging Face cache, what is on disk.

Downloads happen only here, when the user runs `diffusion-lsp pull`; the loader, the server and
the service never download (model/network/loader.py reads local directories and the cache only).

A pull asks the hub for the repository's file list at one commit (`/api/models/{repo}/revision/
{rev}?blobs=true`: every file's size, git blob id and, for LFS files, sha256), keeps only the
files the loader reads, and fetches each one over plain HTTP (`/{repo}/resolve/{commit}/{file}`)
into the standard cache layout that huggingface_hub and transformers share:

    $HF_HUB_CACHE/models--{org}--{name}/blobs/{sha256 or git blob id}
                                        snapshots/{commit}/{file} -> ../../blobs/...
                                        refs/{revision}              (the commit)

A file being downloaded lives at `blobs/{id}.incomplete` until its size and hash match the hub's
metadata (sha256 for LFS files, the git blob sha1 for the others); an interrupted pull leaves it
there and the next pull resumes it with an HTTP Range request. huggingface_hub's own download
deletes partial files and checks sizes only, hence this small downloader on its metadata.
`HF_ENDPOINT`, `HF_HUB_CACHE` / `HF_HOME` and `HF_TOKEN` are honoured, read when called.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

from model.catalog.paths import CONFIG_FILE, TOKENIZER_FILE, hf_hub_dir
from model.catalog.registry import SUPPORTED_MODELS, find_supported

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"

# The files the loader reads (model/network/loader.py), matched against top-level file names.
LOADER_FILES = (
    CONFIG_FILE,
    TOKENIZER_FILE,
    "*.safetensors",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Where a repository ships no tokenizer.json, its byte-level BPE comes as these two files.
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt")
SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")  # model-00001-of-00004.safetensors

CHUNK_BYTES = 1 << 20  # bytes read per network chunk
RETRIES = 5  # transport errors survived per file, each resuming where the last stopped
TIMEOUT_S = 30.0
INCOMPLETE_SUFFIX = ".incomplete"
PULL_LOCK = ".diffusion-lsp-pull.lock"  # one pull per repository at a time (they share partials)


class PullError(RuntimeError):
    """A pull could not be done; the message says why and what to do."""


class CorruptDownloadError(PullError):
    """Downloaded bytes do not match the hub's size or hash; the partial file was discarded."""


def resolve_repo_id(name: str) -> str:
    """A repo id for `name`: a short name from the table, or an `org/name` id as given."""
    model = find_supported(name)
    if model is not None:
        return model.repo_id
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name.strip()):
        return name.strip()
    known = ", ".join(m.name for m in SUPPORTED_MODELS)
    raise PullError(f"unknown model {name!r}: give a Hugging Face repo id (org/name) or one of "
                    f"the supported short names: {known}")


# ---------------------------------------------------------------------------------------------
# Where things are: endpoint, cache folders


def hub_endpoint() -> str:
    """The hub to download from: `HF_ENDPOINT`, read now, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def repo_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    """`models--org--name` in the hub cache (the folder the loader looks in)."""
    return (cache_dir or hf_hub_dir()) / ("models--" + repo_id.replace("/", "--"))


# ---------------------------------------------------------------------------------------------
# What the hub says


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository at one commit, as the hub's metadata describes it."""

    path: str
    size: int
    git_oid: str  # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None = None  # LFS files: sha256 of the content

    @property
    def blob_name(self) -> str:
        """The cache's name for the content: sha256 for LFS files, else the git blob id."""
        return self.sha256 or self.git_oid


@dataclass(frozen=True)
class RemoteRepo:
    repo_id: str
    commit: str
    files: tuple[RemoteFile, ...]


def _is_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def fetch_repo(repo_id: str, revision: str = DEFAULT_REVISION, endpoint: str | None = None,
               token: str | bool | None = None) -> RemoteRepo:
    """The commit and file list (sizes, hashes) of `repo_id` at `revision`, from the hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = endpoint or hub_endpoint()
    if _is_offline():
        raise PullError("HF_HUB_OFFLINE is set: unset it to download (pull is the one command "
                        "that goes online)")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo_id, revision=revision, files_metadata=True)
    except GatedRepoError as exc:
        raise PullError(f"{repo_id} is gated: accept its licence on the model page and set "
                        f"HF_TOKEN (or run `hf auth login`)") from exc
    except RepositoryNotFoundError as exc:
        raise PullError(f"no model {repo_id!r} on {endpoint} (or it is private: set HF_TOKEN)"
                        ) from exc
    except RevisionNotFoundError as exc:
        raise PullError(f"{repo_id} has no revision {revision!r}") from exc
    except HfHubHTTPError as exc:
        raise PullError(f"the hub at {endpoint} answered an error for {repo_id}: {exc}") from exc
    except Exception as exc:  # connection refused, DNS, TLS, timeouts (httpx2's own types)
        raise PullError(f"cannot reach the hub at {endpoint}: {exc}") from exc
    if not info.sha or info.siblings is None:
        raise PullError(f"the hub at {endpoint} sent no commit or file list for {repo_id}")
    files = []
    for sibling in info.siblings:
        if sibling.size is None or sibling.blob_id is None:
            raise PullError(f"the hub sent no size/blob id for {repo_id}/{sibling.rfilename}")
        sha256 = sibling.lfs.sha256 if sibling.lfs is not None else None
        size = sibling.lfs.size if sibling.lfs is not None else sibling.size
        files.append(RemoteFile(sibling.rfilename, int(size), sibling.blob_id, sha256))
    return RemoteRepo(repo_id, info.sha, tuple(files))


def select_loader_files(files: Iterable[RemoteFile], repo_id: str = "") -> list[RemoteFile]:
    """The files the loader reads; raises, before any download, when the repo lacks some."""
    top = {f.path: f for f in files if "/" not in f.path}
    names = list(top)
    wanted = [n for n in names if any(fnmatch.fnmatch(n, p) for p in LOADER_FILES)]
    if TOKENIZER_FILE not in top:
        wanted += [n for n in SLOW_TOKENIZER_FILES if n in top]
    missing = []
    if CONFIG_FILE not in top:
        missing.append(CONFIG_FILE)
    if not any(n.endswith(".safetensors") for n in names):
        missing.append("*.safetensors")
    if TOKENIZER_FILE not in top and not all(n in top for n in SLOW_TOKENIZER_FILES):
        missing.append(f"{TOKENIZER_FILE} (or {' + '.join(SLOW_TOKENIZER_FILES)})")
    if missing:
        raise PullError(f"{repo_id or 'the repository'} lacks what the loader needs: "
                        f"{', '.join(missing)} (it has: {', '.join(sorted(names)) or 'nothing'})")
    return [top[n] for n in sorted(set(wanted))]


# ---------------------------------------------------------------------------------------------
# Hashes: what "verified" means


Progress = Callable[[str, int, int], None]  # (file, bytes done, bytes total), after each chunk


def _hasher(remote: RemoteFile):
    """sha256 for LFS files; git's blob sha1 (`blob {size}\\0` + content) for the others."""
    if remote.sha256:
        return hashlib.sha256()
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % remote.size)
    return digest


def _hash_kind(remote: RemoteFile) -> str:
    return "sha256" if remote.sha256 else "git blob sha1"


def _hash_file(path: Path, digest, limit: int | None = None,
               on_block: Callable[[int], None] | None = None) -> int:
    """Feed `path` (its first `limit` bytes) into `digest`; returns the bytes read.
    `on_block(bytes so far)` after each block (a progress bar over a long re-check)."""
    done = 0
    with path.open("rb") as f:
        while limit is None or done < limit:
            block = f.read(CHUNK_BYTES if limit is None else min(CHUNK_BYTES, limit - done))
            if not block:
                break
            digest.update(block)
            done += len(block)
            if on_block is not None:
                on_block(done)
    return done


def verify_file(path: Path, remote: RemoteFile, progress: Progress | None = None) -> str | None:
    """None when `path` has the hub's size and hash; otherwise what differs."""
    size = path.stat().st_size
    if size != remote.size:
        return f"{remote.path}: {size} bytes on disk, the hub says {remote.size}"
    digest = _hasher(remote)
    _hash_file(path, digest, on_block=None if progress is None else
               lambda done: progress(remote.path, done, remote.size))
    if digest.hexdigest() != remote.blob_name:
        return (f"{remote.path}: {_hash_kind(remote)} {digest.hexdigest()} on disk, the hub says "
                f"{remote.blob_name}")
    return None


# ---------------------------------------------------------------------------------------------
# One file: resumable, verified transfer


def fetch_blob(client: httpx.Client, url: str, remote: RemoteFile, blob: Path,
               progress: Progress | None = None, chunk_bytes: int = CHUNK_BYTES,
               retries: int = RETRIES) -> int:
    """Download `url` into `blob`, resuming `blob.incomplete`; returns the bytes resumed from.

    The bytes are hashed as they arrive (after re-reading the resumed part) and the file only
    takes its final name once size and hash match `remote`. A mismatch deletes the partial file
    and raises CorruptDownloadError; an interruption keeps it for the next pull.
    """
    partial = blob.with_name(blob.name + INCOMPLETE_SUFFIX)
    done = partial.stat().st_size if partial.exists() else 0
    if done > remote.size:
        partial.unlink()
        done = 0
    digest = _hasher(remote)
    if done:
        _hash_file(partial, digest, done)
    resumed_from = done
    failures = 0
    with partial.open("ab") as out:
        while done < remote.size:
            headers = {"Range": f"bytes={done}-"} if done else {}
            try:
                with client.stream("GET", url, headers=headers) as response:
                    if response.status_code == 200 and done:  # the server ignored the Range
                        out.truncate(0)
                        out.seek(0)
                        digest, done = _hasher(remote), 0
                    elif response.status_code not in (200, 206):
                        raise PullError(f"{url}: HTTP {response.status_code}")
                    elif response.status_code == 206 and not _range_starts_at(response, done):
                        raise PullError(f"{url}: the server resumed at the wrong offset "
                                        f"({response.headers.get('Content-Range')}, asked {done})")
                    for chunk in response.iter_bytes(chunk_bytes):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(remote.path, done, remote.size)
                        if done > remote.size:
                            break
            except httpx.TransportError as exc:
                failures += 1
                out.flush()
                if failures > retries:
                    raise PullError(f"download of {remote.path} interrupted at {done} of "
                                    f"{remote.size} bytes ({exc}); run the same pull again to "
                                    f"resume") from exc
                continue
            if done < remote.size:  # the body ended early without a transport error
                failures += 1
                if failures > retries:
                    raise PullError(f"download of {remote.path} stopped at {done} of "
                                    f"{remote.size} bytes; run the same pull again to resume")
    if done != remote.size or digest.hexdigest() != remote.blob_name:
        partial.unlink()
        kind = _hash_kind(remote)
        raise CorruptDownloadError(
            f"{remote.path} failed verification: got {done} bytes, {kind} {digest.hexdigest()}; "
            f"the hub says {remote.size} bytes, {kind} {remote.blob_name}. The partial file was "
            f"deleted; run pull again")
    partial.replace(blob)
    return resumed_from


def _range_starts_at(response: httpx.Response, offset: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return match is not None and int(match.group(1)) == offset


def _link_snapshot(blob: Path, target: Path) -> None:
    """snapshots/{commit}/{file} -> the blob, relative like huggingface_hub (a copy without
    symlink support)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(os.path.relpath(blob, target.parent))
    except OSError:
        shutil.copyfile(blob, target)


# ---------------------------------------------------------------------------------------------
# A whole pull


@dataclass
class PullPlan:
    """What a pull will do: the commit, the files, and which of them are already verified."""

    repo: RemoteRepo
    revision: str
    files: list[RemoteFile]
    folder: Path  # models--org--name
    endpoint: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def blob_path(self, remote: RemoteFile) -> Path:
        return self.folder / "blobs" / remote.blob_name

    def snapshot(self) -> Path:
        return self.folder / "snapshots" / self.repo.commit

    def partial_bytes(self) -> int:
        """Bytes already on disk in partial downloads of this plan's files."""
        total = 0
        for remote in self.files:
            partial = self.blob_path(remote).with_name(remote.blob_name + INCOMPLETE_SUFFIX)
            total += partial.stat().st_size if partial.exists() else 0
        return total


def missing_bytes(plan: PullPlan) -> int:
    """Bytes still to download: the plan's files minus finished blobs and partial downloads."""
    on_disk = plan.partial_bytes()
    for remote in plan.files:
        blob = plan.blob_path(remote)
        on_disk += blob.stat().st_size if blob.exists() else 0
    return max(plan.total_bytes - on_disk, 0)


def check_disk_space(needed: int, free: int, where: Path) -> None:
    """Refuse a pull that cannot fit, before it fills the disk."""
    if needed > free:
        raise PullError(f"not enough disk space in {where}: the download needs "
                        f"{format_bytes(needed)} more, {format_bytes(free)} is free (set "
                        f"HF_HUB_CACHE to a bigger disk)")


@dataclass
class PullResult:
    snapshot: Path
    downloaded: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # of `downloaded`: continued a partial file
    present: list[str] = field(default_factory=list)  # already on disk and verified
    repaired: list[str] = field(default_factory=list)  # on disk but corrupt: downloaded again


def plan_pull(name: str, revision: str = DEFAULT_REVISION, cache_dir: Path | None = None,
              endpoint: str | None = None, token: str | bool | None = None) -> PullPlan:
    """Ask the hub what `name` is at `revision` and which files the loader needs."""
    repo_id = resolve_repo_id(name)
    endpoint = endpoint or hub_endpoint()
    repo = fetch_repo(repo_id, revision, endpoint, token)
    files = select_loader_files(repo.files, repo_id)
    return PullPlan(repo, revision, files, repo_folder(repo_id, cache_dir), endpoint)


def run_pull(plan: PullPlan, progress: Progress | None = None, token: str | bool | None = None,
             chunk_bytes: int = CHUNK_BYTES, retries: int = RETRIES) -> PullResult:
    """Download and verify every file of `plan` into the cache; return what was done.

    Files already in the cache are re-hashed; a corrupt one is downloaded again. The ref
    (`refs/{revision}`) is written last, so an unfinished pull never looks finished. One pull
    per repository at a time: a second one fails at once instead of sharing partial files.
    """
    from filelock import FileLock, Timeout
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(token=token, library_name="diffusion-lsp")
    headers["Accept-Encoding"] = "identity"  # sizes and hashes are of the raw bytes
    (plan.folder / "blobs").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(plan.folder / PULL_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PullError(f"another pull of {plan.repo.repo_id} is running (lock "
                        f"{plan.folder / PULL_LOCK})") from None
    try:
        check_disk_space(missing_bytes(plan), shutil.disk_usage(plan.folder).free, plan.folder)
        with httpx.Client(headers=headers, follow_redirects=True, timeout=TIMEOUT_S) as client:
            result = _pull_files(plan, client, progress, chunk_bytes, retries)
    finally:
        lock.release()
    if plan.revision != plan.repo.commit:
        (plan.folder / "refs").mkdir(exist_ok=True)
        (plan.folder / "refs" / plan.revision).write_text(plan.repo.commit)
    return result


def _pull_files(plan: PullPlan, client: httpx.Client, progress: Progress | None,
                chunk_bytes: int, retries: int) -> PullResult:
    """Each file: verify it if present, else (or if corrupt) fetch it; link it in the snapshot."""
    result = PullResult(plan.snapshot())
    for remote in plan.files:
        blob = plan.blob_path(remote)
        if blob.exists():
            if verify_file(blob, remote, progress) is None:
                result.present.append(remote.path)
                _link_snapshot(blob, plan.snapshot() / remote.path)
                continue
            blob.unlink()
            result.repaired.append(remote.path)
        url = f"{plan.endpoint}/{plan.repo.repo_id}/resolve/{plan.repo.commit}/{quote(remote.path)}"
        resumed_from = fetch_blob(client, url, remote, blob, progress, chunk_bytes, retries)
        result.downloaded.append(remote.path)
        if resumed_from:
            result.resumed.append(remote.path)
        _link_snapshot(blob, plan.snapshot() / remote.path)
    return result


def pull(name: str, revision: str = DEFAULT_REVISION, cache_dir: Path | None = None,
         endpoint: str | None = None, progress: Progress | None = None,
         token: str | bool | None = None) -> PullResult:
    """Plan and run a pull of `name` (short name or repo id): the one download entry point."""
    plan = plan_pull(name, revision, cache_dir, endpoint, token)
    return run_pull(plan, progress, token)


# ---------------------------------------------------------------------------------------------
# What is on disk (no network)


@dataclass
class LocalModel:
    """A repository's state in the local cache, judged from its files alone."""

    repo_id: str
    snapshot: Path | None  # what `--model repo_id` would load (the loader's own lookup)
    size_bytes: int = 0
    partial_bytes: int = 0  # in `.incomplete` downloads: `pull` resumes them
    missing: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.snapshot is None:
            return "partial" if self.partial_bytes else "absent"
        return "incomplete" if self.missing or self.partial_bytes else "ready"


def local_model(repo_id: str, cache_dir: Path | None = None) -> LocalModel:
    """Is `repo_id` on disk, found the way model/network/loader.py finds it, and is it whole?"""
    from model.catalog.paths import hf_cache_snapshot

    folder = repo_folder(repo_id, cache_dir)
    blobs = folder / "blobs"
    partial = sum(p.stat().st_size for p in blobs.glob("*" + INCOMPLETE_SUFFIX)) \
        if blobs.is_dir() else 0
    snapshot = hf_cache_snapshot(repo_id, cache_dir)
    if snapshot is None:
        return LocalModel(repo_id, None, partial_bytes=partial)
    files = {p.name: p for p in snapshot.iterdir() if p.is_file()}
    size = sum(p.stat().st_size for p in files.values())
    return LocalModel(repo_id, snapshot, size, partial, missing_loader_files(list(files)))


def missing_loader_files(names: list[str]) -> list[str]:
    """What a snapshot with these file names lacks: config, tokenizer, or weight shards."""
    missing = [] if CONFIG_FILE in names else [CONFIG_FILE]
    if TOKENIZER_FILE not in names and not all(n in names for n in SLOW_TOKENIZER_FILES):
        missing.append(TOKENIZER_FILE)
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        missing.append("*.safetensors")
    for name in weights:
        match = SHARD_NAME.search(name)
        if match is None:
            continue
        count = int(match.group(2))
        for index in range(1, count + 1):
            shard = SHARD_NAME.sub(f"-{index:0{len(match.group(1))}d}-of-{match.group(2)}"
                                   ".safetensors", name)
            if shard not in names and shard not in missing:
                missing.append(shard)
    return missing


def cached_repo_ids(cache_dir: Path | None = None) -> list[str]:
    """Every model repository in the hub cache (`models--org--name` folders)."""
    root = cache_dir or hf_hub_dir()
    if not root.is_dir():
        return []
    ids = [p.name[len("models--"):].replace("--", "/", 1)
           for p in root.glob("models--*--*") if p.is_dir()]
    return sorted(ids)


@dataclass
class ModelRow:
    """One line of `diffusion-lsp models`."""

    name: str
    repo_id: str
    family: str
    size: str
    hardware: str
    local: LocalModel


def model_rows(cache_dir: Path | None = None) -> list[ModelRow]:
    """The supported models, then any other model in the cache, each with its local state."""
    rows = [ModelRow(m.name, m.repo_id, m.family, f"{m.size_gb:.1f} GB", m.hardware,
                     local_model(m.repo_id, cache_dir)) for m in SUPPORTED_MODELS]
    known = {m.repo_id.lower() for m in SUPPORTED_MODELS}
    for repo_id in cached_repo_ids(cache_dir):
        if repo_id.lower() in known:
            continue
        local = local_model(repo_id, cache_dir)
        if local.snapshot is not None and not local.missing:
            rows.append(ModelRow(repo_id, repo_id, "?", "-", "-", local))
    return rows


def format_bytes(count: int) -> str:
    """`15.2 GB`-style sizes (decimal units, as the hub shows them)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
