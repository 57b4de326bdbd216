"""Released weights by name or `hf://` path: the table of released models and their download.

Owns `PRETRAINED` (the released NPP and LlamaGen GPTs and the VQ-16 tokenizer: where each lives
on the Hugging Face Hub, its size, CFG scale, config and the FID its paper reports), `parse` of
`hf://OWNER/REPO[@REVISION]/PATH/IN/REPO`, and `download`: `huggingface_hub.hf_hub_download`
(cached, resumed with HTTP Range requests when a connection drops mid-file), with HF_ENDPOINT,
HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE read at call time. A fresh download whose hub ETag is a
sha256 (every LFS file, as these weights are) is checked against it; a file that fails the check
or that turns out unreadable is removed from the cache (`evict`), so a rerun downloads it again.
Converting and caching the converted params is `npp_jax.load`'s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

SCHEME = "hf://"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(OSError):
  """A hub file could not be downloaded intact; names the `hf://` path."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A released model: `kind` "gpt" (with its size, config and CFG scale) or "vq"."""
  name: str
  path: str  # hf://OWNER/REPO/FILE
  kind: str
  variant: str | None = None  # model.VARIANTS key (GPT only)
  config: str | None = None  # module under configs/ with its sampling defaults (GPT only)
  cfg_scale: float | None = None  # the CFG scale its FID was reported at
  fid: float | None = None  # FID-50k vs the ADM reference batch, as its paper reports


_NPP = "hf://pytttttt/LlamaGen-NPP"
_LLAMAGEN = "hf://FoundationVision/LlamaGen"
# FIDs: NPP paper Table 1 (LlamaGen's as its README gives them and the NPP paper quotes them).
PRETRAINED = {p.name: p for p in (
    Pretrained("npp-b", f"{_NPP}/c2i_B_256.pt", "gpt", "B", "npp_b", 2.0, 4.47),
    Pretrained("npp-l", f"{_NPP}/c2i_L_256.pt", "gpt", "L", "npp_l", 1.75, 2.76),
    Pretrained("npp-xl", f"{_NPP}/c2i_XL_256.pt", "gpt", "XL", "npp_xl", 1.70, 2.65),
    Pretrained("npp-xxl", f"{_NPP}/c2i_XXL_256.pt", "gpt", "XXL", "npp_xxl", 1.65, 2.55),
    # LlamaGen's own 256-px next-token models (its 384-px ones need a 24x24 grid and a resize
    # to 256 for the ADM evaluator, which the sampler does not do).
    Pretrained("llamagen-b", f"{_LLAMAGEN}/c2i_B_256.pt", "gpt", "B", "llamagen_b", 2.0, 5.46),
    Pretrained("llamagen-l", f"{_LLAMAGEN}/c2i_L_256.pt", "gpt", "L", "llamagen_l", 2.0, 3.80),
    Pretrained("vq-16", f"{_LLAMAGEN}/vq_ds16_c2i.pt", "vq"),
)}
GPT_NAMES = tuple(n for n, p in PRETRAINED.items() if p.kind == "gpt")


@dataclasses.dataclass(frozen=True)
class HubFile:
  repo_id: str
  filename: str
  revision: str | None = None


def is_remote(spec: object) -> bool:
  """True for a released model's name or an `hf://` path."""
  return isinstance(spec, str) and (spec in PRETRAINED or spec.startswith(SCHEME))


def hub_path(spec: str) -> str:
  """The `hf://` path of a released model's name; any other string unchanged."""
  return PRETRAINED[spec].path if spec in PRETRAINED else spec


def parse(spec: str) -> HubFile:
  """`hf://OWNER/REPO[@REVISION]/PATH` (or a released model's name) -> its repo, file, revision.

  Raises:
    ValueError: naming `spec` when it is not of that form.
  """
  path = hub_path(spec)
  parts = path[len(SCHEME):].split("/", 2) if path.startswith(SCHEME) else []
  if len(parts) != 3 or not all(parts):
    raise ValueError(f"{spec!r} is not a hub path: expected hf://OWNER/REPO/FILE (e.g. "
                     f"{PRETRAINED['npp-b'].path}) or one of {list(PRETRAINED)}.")
  owner, repo, filename = parts
  repo, _, revision = repo.partition("@")
  return HubFile(f"{owner}/{repo}", filename, revision or None)


def hf_home() -> str:
  return os.path.expanduser(os.environ.get("HF_HOME") or hf_constants.HF_HOME)


def hub_cache() -> str:
  """The huggingface_hub download cache, as the environment says now (not at import)."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return os.path.join(hf_home(), "hub")
  return hf_constants.HF_HUB_CACHE


def _offline() -> bool:
  value = os.environ.get("HF_HUB_OFFLINE", "")
  return value.upper() in ("1", "ON", "YES", "TRUE") or hf_constants.HF_HUB_OFFLINE


def download(spec: str) -> str:
  """The local path of hub file `spec` (`hf://...` or a released model's name), downloading it
  into the huggingface_hub cache unless it is there.

  Raises:
    FileNotFoundError: the repository, revision or file does not exist (or needs a token).
    HubError: the download failed or its content does not match the hub's sha256; nothing is
      left in the cache.
  """
  f = parse(spec)
  path = hub_path(spec)
  cache = hub_cache()
  kwargs = dict(repo_id=f.repo_id, filename=f.filename, revision=f.revision, cache_dir=cache)
  before = huggingface_hub.try_to_load_from_cache(**kwargs)
  try:
    local = huggingface_hub.hf_hub_download(
        **kwargs, endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=_offline())
  except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError,
          hf_errors.RemoteEntryNotFoundError) as e:
    raise FileNotFoundError(f"{path}: not on the hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]}).") from None
  except hf_errors.LocalEntryNotFoundError as e:  # offline, or the hub unreachable.
    raise HubError(f"{path}: not in the cache {cache} and the hub is unreachable or "
                   f"HF_HUB_OFFLINE is set ({str(e).splitlines()[0]}).") from None
  except Exception as e:  # HfHubHTTPError is an OSError; the HTTP client's own errors are not.
    raise HubError(f"{path}: download failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                   f"nothing was cached, run again to retry.") from e
  if not isinstance(before, str) or os.path.realpath(before) != os.path.realpath(local):
    _check_sha256(local, path)
  return local


def _check_sha256(local: str, path: str) -> None:
  """Compares a fresh download with its blob name, the hub's sha256 for LFS files."""
  expected = os.path.basename(os.path.realpath(local))
  if not _SHA256.fullmatch(expected):
    return  # a small git file: its ETag is a git hash, not the content's sha256.
  digest = hashlib.sha256()
  with open(local, "rb") as fp:
    for block in iter(lambda: fp.read(1 << 24), b""):
      digest.update(block)
  if digest.hexdigest() != expected:
    evict(local)
    raise HubError(f"{path}: the downloaded file's sha256 {digest.hexdigest()} is not the hub's "
                   f"{expected}; removed from the cache, run again to download it again.")


def evict(local: str) -> None:
  """Removes a downloaded file (its snapshot link and its blob) from the hub cache."""
  blob = os.path.realpath(local)
  for p in {local, blob}:
    if os.path.lexists(p):
      os.unlink(p)
