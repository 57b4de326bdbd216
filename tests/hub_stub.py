"""A stand-in for the Hugging Face Hub on 127.0.0.1, for `HF_ENDPOINT`: serves files in the hub's
URL layout with the headers `huggingface_hub.hf_hub_download` reads, and records each request.

What the installed huggingface_hub (2.x) asks for, and what this answers:
  HEAD {endpoint}/{owner}/{repo}/resolve/{revision}/{path}
      -> 200 with X-Repo-Commit (40 hex), ETag and X-Linked-Etag (the content's sha256, as the hub
         gives LFS files), Content-Length / X-Linked-Size; or 404 with X-Error-Code EntryNotFound
         / RepoNotFound.
  GET  the same URL, with `Range: bytes=K-` when it resumes after a dropped connection
      -> 200 with the whole file, or 206 with Content-Range and the bytes from K.
Faults, set per file: `truncate` (the next N GETs declare the full length but stop after half the
body and close the connection), `corrupt` (serve other bytes than the sha256 says).
Also `tiny_vq_state_dict` (the small reference VQ with its codebook tiled to 512 codes, so that it
decodes the tiny reference GPT's vocabulary).
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import threading

import numpy as np

from torch_files import load_npz

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclasses.dataclass
class Served:
  data: bytes
  truncate: int = 0  # the next `truncate` GETs stop halfway
  corrupt: bool = False  # serve bytes that do not match the sha256 the headers give


class HubStub:
  """`with HubStub() as hub: hub.add("owner/repo", "file.pt", data)`; `hub.url` is HF_ENDPOINT."""

  def __init__(self):
    self.files: dict[tuple[str, str], Served] = {}
    self.requests: list[tuple[str, str, dict]] = []
    stub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def do_HEAD(self):  # noqa: N802 (http.server's naming)
        stub._answer(self, body=False)

      def do_GET(self):  # noqa: N802
        stub._answer(self, body=True)

      def log_message(self, *args):
        del args

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_port}"

  def add(self, repo: str, path: str, data: bytes, **faults) -> Served:
    self.files[(repo, path)] = Served(data, **faults)
    return self.files[(repo, path)]

  def gets(self, path: str) -> list[dict]:
    """The headers of every GET of a file whose URL ends with `path`."""
    return [h for m, p, h in self.requests if m == "GET" and p.endswith(path)]

  def __enter__(self) -> "HubStub":
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()

  def _answer(self, h: http.server.BaseHTTPRequestHandler, *, body: bool) -> None:
    self.requests.append((h.command, h.path, dict(h.headers)))
    m = _RESOLVE.match(h.path)
    served = self.files.get((m["repo"], m["path"])) if m else None
    if served is None:
      repo_known = m is not None and any(r == m["repo"] for r, _ in self.files)
      h.send_response(404)
      h.send_header("X-Error-Code", "EntryNotFound" if repo_known else "RepoNotFound")
      h.send_header("X-Error-Message", "stub: no such file")
      h.send_header("X-Repo-Commit", COMMIT)
      h.send_header("Content-Length", "0")
      h.end_headers()
      return
    data, sha = served.data, hashlib.sha256(served.data).hexdigest()
    if served.corrupt:
      data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
    start = 0
    rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
    if body and rng:
      start = int(rng.group(1))
    h.send_response(206 if start else 200)
    h.send_header("X-Repo-Commit", COMMIT)
    h.send_header("ETag", f'"{sha}"')
    h.send_header("X-Linked-Etag", f'"{sha}"')
    h.send_header("X-Linked-Size", str(len(data)))
    h.send_header("Accept-Ranges", "bytes")
    if start:
      h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    h.send_header("Content-Length", str(len(data) - start))
    h.end_headers()
    if not body:
      return
    if served.truncate:
      served.truncate -= 1
      h.wfile.write(data[start:start + (len(data) - start) // 2])
      h.wfile.flush()
      h.close_connection = True
      return
    h.wfile.write(data[start:])


def tiny_vq_state_dict(codebook_size: int = 512) -> dict[str, np.ndarray]:
  """The small reference VQ's state dict with its codebook tiled to `codebook_size` codes."""
  sd, _ = load_npz("llamagen_vq_small.npz")
  emb = sd["quantize.embedding.weight"]
  sd["quantize.embedding.weight"] = np.tile(emb, (-(-codebook_size // len(emb)), 1))[:codebook_size]
  return sd
