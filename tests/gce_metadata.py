"""A stand-in for the GCE metadata server of the workers of a Cloud TPU slice, on 127.0.0.1.

Each worker VM of a slice has its own metadata server; `MetadataServer(worker, ips)` is one
of them, answering `computeMetadata/v1/instance/attributes/{key}` (with the `Metadata-Flavor:
Google` header, 404 otherwise) for the keys JAX's GCE TPU cluster detection reads:
`agent-worker-number`, `worker-network-endpoints` and `tpu-env`. A process finds it through
`GCE_METADATA_IP=127.0.0.1:PORT`, as JAX's `cloud_tpu_cluster.get_metadata` documents.

Run as a script (`python tests/gce_metadata.py -m MODULE ARGS...` or `-c CODE`), it is the
start-up of a process on such a worker: it marks this host as a Cloud TPU VM for JAX's cluster
detection (`running_in_cloud_tpu_vm`, and no `TPU_SKIP_MDS_QUERY`: what `jax._src.cloud_tpu_init`
leaves when it finds TPU chips on the PCI bus; here it finds none and the backend stays CPU), then
runs MODULE or CODE as `python -m` / `python -c` would, with the working directory first on
sys.path.
"""
import http.server
import os
import runpy
import sys
import threading


class MetadataServer:
  """Serves one worker's metadata on 127.0.0.1 (a free port) in a thread; `.address` is
  host:port for GCE_METADATA_IP. Use as a context manager."""

  def __init__(self, worker: int, ips: list[str], accelerator: str = "v4-16"):
    attributes = {  # the endpoints as name:id:ip triples, the form Cloud TPU VMs report.
        "agent-worker-number": str(worker),
        "worker-network-endpoints": ",".join(f"unknown:unknown:{ip}" for ip in ips),
        "tpu-env": f"ACCELERATOR_TYPE: '{accelerator}'\nWORKER_ID: '{worker}'\n",
    }
    prefix = "/computeMetadata/v1/instance/attributes/"
    self.requests: list[str] = []
    log = self.requests

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802  (http.server's name)
        key = self.path[len(prefix):] if self.path.startswith(prefix) else None
        log.append(key)
        ok = self.headers.get("Metadata-Flavor") == "Google" and key in attributes
        body = (attributes[key] if ok else "not found").encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        del args

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.address = f"127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()


def pretend_cloud_tpu_vm() -> None:
  """Makes JAX's cluster detection treat this host as a Cloud TPU VM (see the module docstring)."""
  from jax._src.clusters import cloud_tpu_cluster, cluster
  os.environ.pop("TPU_SKIP_MDS_QUERY", None)
  cloud_tpu_cluster.running_in_cloud_tpu_vm = True
  cluster.running_in_cloud_tpu_vm = True


if __name__ == "__main__":
  if sys.argv[1:2] not in (["-m"], ["-c"]) or len(sys.argv) < 3:
    sys.exit("usage: python tests/gce_metadata.py -m MODULE [ARGS...] | -c CODE [ARGS...]")
  sys.path[0] = os.getcwd()  # as `python -m`: the checkout, not tests/, comes first.
  pretend_cloud_tpu_vm()
  kind, what = sys.argv[1:3]
  sys.argv = [what if kind == "-m" else "-c"] + sys.argv[3:]
  if kind == "-m":
    runpy.run_module(what, run_name="__main__", alter_sys=True)
  else:
    exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102  (python -c)
