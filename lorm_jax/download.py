"""Downloads that happen once: streamed, resumed, verified, cached, atomic.

  path = download.fetch(download.Remote(url, sha256=..., size=...), dest)

`fetch` returns `dest` at once when it exists (the cache: no network). Else
it streams the file into `dest + '.part'` with a progress bar, resumes a
partial file with an HTTP Range request (also after a cut connection within
the same call, `retries` times), checks the size and the sha256, runs the
caller's own `verify(path)` (e.g. "is this an npz of a ViT"), and only then
renames the part file to `dest`. A file that fails a check is removed and
refused in one line; an unreachable server fails in one line within
`timeout` seconds, naming the URL and where to place the file by hand.

Mirrors: `$LORM_JAX_MIRROR` (a base URL, e.g. http://127.0.0.1:8000/ or
file:///srv/mirror/) replaces every remote's URL by `<mirror>/<file name>`.
A mirror may publish `SHA256SUMS` (the `sha256sum` format) beside its files;
its line for a file, when present, replaces the pinned checksum (a mirror you
name is trusted to say what it serves, e.g. small test fixtures). Without a
mirror, only the pins count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from lorm_jax.errors import UserError

MIRROR_ENV = 'LORM_JAX_MIRROR'
CACHE_ENV = 'LORM_JAX_CACHE'
CHUNK = 1 << 20


def cache_dir(path: str | os.PathLike | None = None) -> Path:
  """The cache folder of weights and compiled programs: `path`, else
  $LORM_JAX_CACHE, else ~/.cache/lorm_jax."""
  if path is None:
    path = os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'lorm_jax'
  return Path(path).expanduser()


class DownloadError(UserError):
  """A file could not be fetched, or what arrived is not the expected file."""


@dataclasses.dataclass(frozen=True)
class Remote:
  """A file on the network and what it must be.

  Attributes:
    url: where it lives.
    sha256: hex digest it must have, or None (then `size` and the caller's
      verify function are the checks).
    size: bytes it must have, or None.
    name: the file's name (in a mirror and in the cache); default: the last
      path component of the URL.
  """
  url: str
  sha256: str | None = None
  size: int | None = None
  name: str = ''

  @property
  def filename(self) -> str:
    return self.name or os.path.basename(urllib.parse.urlparse(self.url).path)


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(CHUNK), b''):
      h.update(chunk)
  return h.hexdigest()


def mirror() -> str | None:
  """The mirror base URL ($LORM_JAX_MIRROR), without a trailing slash, or None."""
  base = os.environ.get(MIRROR_ENV, '').strip()
  return base.rstrip('/') if base else None


def source(remote: Remote, timeout: float = 10.0) -> tuple[str, str | None, int | None]:
  """(url, sha256, size) to fetch `remote` from: the mirror's copy (and its
  SHA256SUMS line, if it lists the file) when a mirror is set, else the original."""
  base = mirror()
  if base is None:
    return remote.url, remote.sha256, remote.size
  url = f'{base}/{urllib.parse.quote(remote.filename)}'
  listed = _mirror_sums(base, timeout).get(remote.filename)
  if listed is not None:
    return url, listed, None
  return url, remote.sha256, remote.size


def _mirror_sums(base: str, timeout: float) -> dict[str, str]:
  """{file name: sha256} from <base>/SHA256SUMS; {} when the mirror has none."""
  try:
    with urllib.request.urlopen(f'{base}/SHA256SUMS', timeout=timeout) as resp:
      text = resp.read(1 << 20).decode('utf-8', 'replace')
  except (urllib.error.URLError, OSError, ValueError):
    return {}
  sums = {}
  for line in text.splitlines():
    parts = line.split()
    if len(parts) == 2 and len(parts[0]) == 64:
      sums[parts[1].lstrip('*')] = parts[0].lower()
  return sums


@contextlib.contextmanager
def _locked_part(dest: Path) -> Iterator[Path]:
  """dest's part file, exclusively locked: two runs never write one file. An
  empty part file (nothing arrived) is removed when the work fails."""
  part = dest.with_name(dest.name + '.part')
  with open(part, 'ab') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield part
    except BaseException:
      if part.exists() and part.stat().st_size == 0:
        part.unlink()
      raise
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def fetch(remote: Remote, dest: str | os.PathLike, *, verify: Callable[[Path], None] | None = None,
          progress: bool = True, timeout: float = 10.0, retries: int = 3,
          what: str = '') -> Path:
  """`dest`, downloading `remote` there first if it is not there yet.

  Args:
    remote: what to fetch (URL, pinned sha256 and size).
    dest: the cache path of the file.
    verify: called with the complete part file before it is renamed; raises
      (any exception) when the file is not what it must be.
    progress: show a tqdm bar (bytes).
    timeout: seconds to connect and per read.
    retries: resumed attempts after a connection breaks mid-file.
    what: a few words for messages and the bar (default: the file name).

  Returns:
    dest, complete and verified.

  Raises:
    DownloadError: one line: unreachable server, HTTP error, a checksum,
      size or verify mismatch (the file is removed), an unwritable cache.
  """
  dest = Path(dest).expanduser()
  if dest.is_file():
    return dest
  what = what or remote.filename
  try:
    dest.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DownloadError(f'cannot create {dest.parent} for {what}: {e}') from None
  url, sha256, size = source(remote, timeout)
  with _locked_part(dest) as part:
    if dest.is_file():  # another process finished it while we waited
      return dest
    _download(url, part, dest, size, progress, timeout, retries, what)
    _check(part, url, sha256, size, verify, what)
    os.chmod(part, 0o644)
    os.replace(part, dest)
  return dest


def _check(part: Path, url: str, sha256: str | None, size: int | None,
           verify: Callable[[Path], None] | None, what: str) -> None:
  """Refuses (removing it) a complete part file of the wrong size, sha256 or content."""
  def refuse(reason: str):
    part.unlink(missing_ok=True)
    raise DownloadError(f'{what} from {url}: {reason}; the download was removed, run again '
                        f'(or place a good copy at {part.with_suffix("")})')
  got = part.stat().st_size
  if size is not None and got != size:
    refuse(f'{got} bytes, expected {size}')
  if sha256 is not None:
    digest = sha256_file(part)
    if digest != sha256.lower():
      refuse(f'sha256 {digest}, expected {sha256}')
  if verify is not None:
    try:
      verify(part)
    except Exception as e:  # pylint: disable=broad-except
      refuse(f'not the expected file ({" ".join(str(e).split())})')


def _download(url: str, part: Path, dest: Path, size: int | None, progress: bool,
              timeout: float, retries: int, what: str) -> None:
  """Streams url into part, appending to what part already holds."""
  attempt = 0
  while True:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have == size:
      return
    try:
      _stream(url, part, have, progress, timeout, what)
      return
    except _Broken as e:
      attempt += 1
      if attempt > retries:
        raise DownloadError(f'{what}: the connection to {url} broke {attempt} times '
                            f'({e}); {part.stat().st_size if part.exists() else 0} bytes are '
                            f'kept in {part}, run again to resume') from None
      time.sleep(min(0.2 * 2 ** attempt, 5.0))
    except urllib.error.HTTPError as e:
      raise DownloadError(f'cannot download {what} from {url} (HTTP {e.code} {e.reason}); '
                          f'without a network, place the file at {dest}') from None
    except (urllib.error.URLError, OSError, ValueError) as e:
      reason = getattr(e, 'reason', e)
      raise DownloadError(f'cannot download {what} from {url} ({type(e).__name__}: {reason}); '
                          f'without a network, place the file at {dest} (or set '
                          f'${MIRROR_ENV} to a mirror)') from None


class _Broken(Exception):
  """The connection broke after the response started: resume with a Range."""


def _stream(url: str, part: Path, have: int, progress: bool, timeout: float, what: str) -> None:
  headers = {'User-Agent': 'lorm_jax'}
  if have:
    headers['Range'] = f'bytes={have}-'
  try:
    resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # nothing left to send: the part file is whole
      return
    raise
  with resp:
    status = getattr(resp, 'status', 200)
    if have and status != 206:  # the server ignored the range: start again
      have = 0
    length = resp.headers.get('Content-Length')
    total = have + int(length) if length is not None else None
    bar = tqdm(total=total, initial=have, unit='B', unit_scale=True, unit_divisor=1024,
               desc=what[:40], disable=not progress, leave=False, dynamic_ncols=True)
    received = 0
    with bar, open(part, 'ab' if have else 'wb') as f:
      while True:
        try:
          chunk = resp.read(CHUNK)
        except (OSError, ValueError, http.client.HTTPException) as e:  # a reset or timeout mid-file
          raise _Broken(f'{type(e).__name__}: {e}') from None
        if not chunk:
          break
        f.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))
    if length is not None and received < int(length):
      raise _Broken(f'{received} of {length} bytes arrived')
