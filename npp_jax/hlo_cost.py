"""A roofline cost model read from a compiled program's optimised HLO text (per device).

XLA's own `cost_analysis()` counts the body of a `while` loop once, whatever its trip count, so a
rolled layer scan reports the FLOPs and bytes of one layer. This module re-counts the compiled
HLO with every computation weighted by how often it runs:

  * loops: a `while` whose condition compares its counter with a constant (`counter < N`, the
    form `lax.scan` / `fori_loop` lower to) runs its body N times; other loops count once and are
    reported in `unknown_loops`;
  * FLOPs: 2 per multiply-add of every `dot` and `convolution` (TPU lowers dots to
    convolutions), elementwise work ignored;
  * HBM bytes: operands + results of every top-level op (fusions, copies, convolutions,
    collectives, ...), not of the ops inside a fusion (they stay on chip); values the compiler
    placed in on-chip memory (layout memory space S(1)) are not counted; a fusion operand read
    only through (dynamic-)slices counts the slices, an in-place dynamic-update-slice counts the
    update;
  * collective bytes: what each device sends for all-gather, reduce-scatter, all-reduce,
    all-to-all and collective-permute (ring algorithms: (n-1)/n of the gathered size, twice for
    an all-reduce).

`roofline` turns these into an ESTIMATE of the step time: the largest of FLOPs / peak, bytes /
HBM bandwidth and collective bytes / interconnect bandwidth, i.e. perfect overlap of compute,
memory and communication; it is a lower bound on the real step time, not a measurement.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5, "token": 0}
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e4m3fn|f8e5m2|token)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)="
                      r"%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Ops that move no HBM bytes of their own (bookkeeping, control flow, the second half of an
# async pair whose first half is counted).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "copy-done", "iota",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
         "send-done", "recv-done", "opt-barrier", "add-dependency"}


def _array_bytes(type_str: str, hbm_only: bool = False) -> float:
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(type_str):
    if hbm_only and layout and "S(1)" in layout:
      continue
    total += _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _dims(type_str: str) -> list[int]:
  m = _ARRAY.search(type_str)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclasses.dataclass
class _Instr:
  name: str
  type_str: str
  op: str
  rest: str  # operands and attributes

  @property
  def operands(self) -> list[str]:
    depth, end = 0, len(self.rest)
    for i, ch in enumerate(self.rest):
      if ch in "({[":
        depth += 1
      elif ch in ")}]":
        if depth == 0:
          end = i
          break
        depth -= 1
    return re.findall(r"%([\w.\-]+)", self.rest[:end])


@dataclasses.dataclass
class HloCost:
  flops: float = 0.0
  bytes_accessed: float = 0.0
  collective_bytes: float = 0.0
  collective_counts: dict = dataclasses.field(default_factory=dict)
  unknown_loops: int = 0


def _parse(text: str) -> tuple[dict[str, list[_Instr]], str | None]:
  comps: dict[str, list[_Instr]] = {}
  entry, current = None, None
  for line in text.splitlines():
    h = _HEADER.match(line)
    if h:
      current = h.group(2)
      comps[current] = []
      if h.group(1):
        entry = current
      continue
    if current is None:
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append(_Instr(*m.groups()))
  return comps, entry


def _const(instrs_by_name: dict[str, _Instr], name: str) -> int | None:
  ins = instrs_by_name.get(name)
  if ins is None or ins.op != "constant":
    return None
  m = re.match(r"\s*(-?\d+)\)", ins.rest)
  return int(m.group(1)) if m else None


def _tuple_index(ins: _Instr | None) -> int | None:
  if ins is None or ins.op != "get-tuple-element":
    return None
  m = re.search(r"index=(\d+)", ins.rest)
  return int(m.group(1)) if m else None


def _trip_count(loop: _Instr, caller: list[_Instr], comps) -> int | None:
  """Iterations of a `while` whose condition is `counter < N` and whose body adds a constant
  step to the counter (scan, fori_loop and XLA's windowed collective matmuls lower to this);
  the counter's start is the constant the loop's input tuple holds (0 if not a constant)."""
  callees = dict(_CALLEES.findall(loop.rest))
  cond, body = comps.get(callees.get("condition"), []), comps.get(callees.get("body"), [])
  cond_by = {i.name: i for i in cond}
  limit = index = None
  for i in cond:
    if i.op == "compare" and "direction=LT" in i.rest and len(i.operands) == 2:
      index, limit = _tuple_index(cond_by.get(i.operands[0])), _const(cond_by, i.operands[1])
  if limit is None or index is None:
    return None
  body_by = {i.name: i for i in body}
  root = next((i for i in reversed(body) if i.op == "tuple"), None)
  step = 1
  if root is not None and index < len(root.operands):
    nxt = body_by.get(root.operands[index])
    if nxt is not None and nxt.op == "add" and len(nxt.operands) == 2:
      a, b = nxt.operands
      if _tuple_index(body_by.get(a)) != index:
        a, b = b, a
      c = _const(body_by, b)
      if _tuple_index(body_by.get(a)) == index and c:
        step = c
  start = 0
  caller_by = {i.name: i for i in caller}
  init = caller_by.get(loop.operands[0]) if loop.operands else None
  if init is not None and init.op == "tuple" and index < len(init.operands):
    start = _const(caller_by, init.operands[index]) or 0
  return max(0, -(-(limit - start) // step))


def _multipliers(comps, entry) -> tuple[dict[str, float], set[str], int]:
  """How often each computation runs per program execution; the fusion bodies; unknown loops."""
  edges: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  fused: set[str] = set()
  unknown = 0
  for name, instrs in comps.items():
    for ins in instrs:
      callees = list(_CALLEES.findall(ins.rest))
      for b in _BRANCHES.findall(ins.rest):
        callees += [("branch", c) for c in re.findall(r"%([\w.\-]+)", b)]
      trips = 1
      if ins.op == "while":
        n = _trip_count(ins, instrs, comps)
        unknown += n is None
        trips = n or 1
      for kind, callee in callees:
        if kind == "to_apply":  # scalar reducers: negligible, and not kernels of their own.
          continue
        if ins.op != "call" and kind == "calls":
          fused.add(callee)
        edges[name].append((callee, trips if kind in ("body", "condition") else 1))
  order, state = [], {}

  def visit(node):  # depth-first post-order: every callee before its callers.
    stack = [(node, iter(edges.get(node, ())))]
    state[node] = 1
    while stack:
      cur, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        stack.pop()
        order.append(cur)
        continue
      if nxt[0] not in state:
        state[nxt[0]] = 1
        stack.append((nxt[0], iter(edges.get(nxt[0], ()))))

  visit(entry)
  mult: dict[str, float] = collections.defaultdict(float)
  mult[entry] = 1.0
  for name in reversed(order):  # callers first.
    for callee, trips in edges.get(name, ()):
      mult[callee] += mult[name] * trips
  return mult, fused, unknown


def _group_size(rest: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if m:
    sizes = dict((k.strip("' "), int(v)) for k, v in re.findall(r"'?([\w]+)'?=(\d+)", m.group(1)))
    return math.prod(sizes.get(a.strip("' "), 1) for a in m.group(2).split(",") if a.strip())
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", rest)
  if m:
    return len(m.group(1).split(","))
  return num_devices


def _collective_bytes(ins: _Instr, num_devices: int) -> float:
  n = _group_size(ins.rest, num_devices)
  out = max((_array_bytes(t) for t in re.findall(r"\w+\[[\d,]*\]", ins.type_str)), default=0.0)
  if n <= 1:
    return 0.0
  op = ins.op.removesuffix("-start")
  if op == "all-gather" or op == "all-to-all":
    return out * (n - 1) / n
  if op == "reduce-scatter":
    return out * (n - 1)
  if op == "all-reduce":
    return 2 * out * (n - 1) / n
  return out  # collective-permute


def _window(rest: str, key: str, n: int, default: int) -> list[int]:
  m = re.search(r"window=\{[^}]*\b" + key + r"=([\dx_]+)", rest)
  if not m:
    return [default] * n
  return [int(v.split("_")[0]) for v in m.group(1).split("x")]


def _conv_flops(ins: _Instr, shapes: dict[str, str]) -> float:
  """2 x multiply-adds of a dot or convolution. A convolution counts, per spatial dimension, the
  (output position, kernel tap) pairs that land on real input (not padding, not the holes of an
  lhs dilation): TPU lowers batched matmuls to dilated convolutions whose windows are mostly
  holes."""
  ops = ins.operands
  out = _dims(ins.type_str)
  if ins.op == "dot":
    lhs = _dims(shapes.get(ops[0], ""))
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
    k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
    return 2.0 * math.prod(out) * k
  m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.rest)
  if not m or len(ops) < 2:
    return 0.0
  lhs_lab, rhs_lab, out_lab = m.groups()
  lhs, rhs = _dims(shapes.get(ops[0], "")), _dims(shapes.get(ops[1], ""))
  if len(lhs) != len(lhs_lab) or len(rhs) != len(rhs_lab) or len(out) != len(out_lab):
    return 0.0
  spatial = sorted(c for c in lhs_lab if c.isdigit())
  n = len(spatial)
  stride, lhs_dil, rhs_dil = (_window(ins.rest, k, n, 1) for k in ("stride", "lhs_dilate",
                                                                    "rhs_dilate"))
  pad_lo = _window(ins.rest, "pad", n, 0)
  taps, out_spatial = 1, 1
  for s, c in enumerate(spatial):
    size_in, k, size_out = lhs[lhs_lab.index(c)], rhs[rhs_lab.index(c)], out[out_lab.index(c)]
    x = (np.arange(size_out)[:, None] * stride[s] + np.arange(k)[None, :] * rhs_dil[s]
         - pad_lo[s])
    valid = (x >= 0) & (x <= (size_in - 1) * lhs_dil[s]) & (x % lhs_dil[s] == 0)
    taps *= int(valid.sum())
    out_spatial *= size_out
  return 2.0 * math.prod(out) / out_spatial * taps * rhs[rhs_lab.index("i")]


def _params(body: list[_Instr]) -> dict[str, int]:
  out = {}
  for i in body:
    if i.op == "parameter":
      m = re.match(r"\s*(\d+)\)", i.rest)
      if m:
        out[i.name] = int(m.group(1))
  return out


def _param_read_bytes(comps, body: list[_Instr], index: int, full: float, depth: int = 0) -> float:
  """Bytes a fused computation reads of its parameter `index` (of `full` bytes): the slices it
  takes if it only slices it (looking into nested fusions), nothing if it only updates it in
  place, else all of it."""
  name = next((n for n, k in _params(body).items() if k == index), None)
  uses = [i for i in body if name in i.operands] if name else []
  if not uses or depth > 8:
    return full
  total = 0.0
  for u in uses:
    if u.op in ("dynamic-slice", "slice", "gather"):
      total += _array_bytes(u.type_str, hbm_only=True)
    elif u.op == "dynamic-update-slice" and u.operands[0] == name:
      continue  # the buffer updated in place: only the update moves.
    elif u.op == "fusion":
      inner = comps.get(dict(_CALLEES.findall(u.rest)).get("calls"), [])
      for pos, o in enumerate(u.operands):
        if o == name:
          total += _param_read_bytes(comps, inner, pos, full, depth + 1)
    else:
      return full
  return min(total, full)


def _fusion_bytes(ins: _Instr, comps, shapes: dict[str, str]) -> float:
  """HBM bytes of one fusion: what it reads of each operand plus what it writes (an in-place
  dynamic-update-slice writes only its update)."""
  body = comps.get(dict(_CALLEES.findall(ins.rest)).get("calls"), [])
  by = {i.name: i for i in body}
  total = sum(_param_read_bytes(comps, body, k, _array_bytes(shapes.get(o, ""), hbm_only=True))
              for k, o in enumerate(ins.operands))
  root = body[-1] if body else None
  outs = [by.get(o) for o in root.operands] if root is not None and root.op == "tuple" else [root]
  if root is None or any(o is None for o in outs):
    return total + _array_bytes(ins.type_str, hbm_only=True)
  for o in outs:
    if o.op == "dynamic-update-slice" and len(o.operands) > 1:
      total += _array_bytes(by[o.operands[1]].type_str if o.operands[1] in by else "",
                            hbm_only=True)
    else:
      total += _array_bytes(o.type_str, hbm_only=True)
  return total


def analyse(text: str, num_devices: int = 1) -> HloCost:
  """Per-device FLOPs, HBM bytes and collective bytes of one execution of an HLO module."""
  comps, entry = _parse(text)
  cost = HloCost()
  if entry is None:
    return cost
  mult, fused, cost.unknown_loops = _multipliers(comps, entry)
  counts = collections.Counter()
  for name, instrs in comps.items():
    w = mult.get(name, 0.0)
    if not w:
      continue
    shapes = {i.name: i.type_str for i in instrs}
    for ins in instrs:
      op = ins.op
      if op in ("convolution", "dot"):
        cost.flops += w * _conv_flops(ins, shapes)
      base = op.removesuffix("-start")
      if base in _COLLECTIVES:
        cost.collective_bytes += w * _collective_bytes(ins, num_devices)
        counts[base] += w
      if name in fused or op in _FREE:
        continue
      if op == "fusion":
        cost.bytes_accessed += w * _fusion_bytes(ins, comps, shapes)
      elif op == "dynamic-update-slice":
        upd = _array_bytes(shapes.get(ins.operands[1], ""), hbm_only=True)
        cost.bytes_accessed += w * 2 * upd
      else:
        out = _array_bytes(ins.type_str, hbm_only=True)
        cost.bytes_accessed += w * (out + sum(_array_bytes(shapes.get(o, ""), hbm_only=True)
                                              for o in ins.operands))
  cost.collective_counts = {k: int(v) for k, v in sorted(counts.items())}
  return cost


def roofline(*, flops: float, bytes_accessed: float, collective_bytes: float, peak_flops: float,
             hbm_bytes_per_s: float, ici_bytes_per_s: float) -> dict:
  """ESTIMATED seconds: the largest of the compute, memory and interconnect times."""
  terms = {"compute": flops / peak_flops, "memory": bytes_accessed / hbm_bytes_per_s,
           "collectives": collective_bytes / ici_bytes_per_s if ici_bytes_per_s else 0.0}
  bound = max(terms, key=terms.get)
  return {"seconds": terms[bound], "bound": bound, "terms": terms}
