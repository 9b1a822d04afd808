"""What a compiled program's HLO says about communication: its collectives, by kind, counted per step.

A collective inside a loop body (a scanned encoder's layers, micro-batches) runs once per iteration: each is
counted as many times as the loops around it run (XLA's ``known_trip_count`` on the ``while``). Bytes are those of
each collective's result on one device: the reduced array of an all-reduce, the gathered one of an all-gather, the
device's shard of a reduce-scatter (the compiled HLO names operands without their shapes).
"""

from __future__ import annotations

import collections
import re

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
          'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_SHAPE = re.compile(r'\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]')
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(' + '|'.join(KINDS) + r')(-start)?\((.*)$')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)')
_WHILE = re.compile(r'\swhile\(.*?body=%?([\w.\-]+)')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CALLS = re.compile(r'(?:calls|body|branch_computations|async_execution_thread)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?')


def _bytes(text: str) -> float:
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        size = 1
        for d in filter(None, dims.split(',')):
            size *= int(d)
        total += size * _BYTES.get(dtype, 1)
    return total


def _top_level(types: str) -> list[str]:
    """The elements of a tuple type '(a, (b, c), d)' at its top level; [types] for an array type."""
    types = types.strip()
    if not types.startswith('('):
        return [types]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(types):
        if ch in '({[':
            depth += 1
        elif ch in ')}]':
            depth -= 1
            if depth == 0:
                parts.append(types[start:i])
        elif ch == ',' and depth == 1:
            parts.append(types[start:i])
            start = i + 1
    return parts


def has_loops(hlo_text: str) -> bool:
    """Whether the program holds a loop of more than one iteration (a scanned encoder, micro-batches): XLA's cost
    analysis counts a loop body once, so its FLOP and byte counts then undercount the step."""
    for line in hlo_text.splitlines():
        if _WHILE.search(line):
            trip = _TRIP.search(line)
            if trip is None or int(trip.group(1)) > 1:
                return True
    return False


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {'count': per step, 'bytes': per device per step}} for every kind in ``KINDS`` (zeros included)."""
    ops = collections.defaultdict(list)     # computation -> [(kind, bytes)]
    edges = collections.defaultdict(list)   # computation -> [(callee, times)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith('{'):  # a computation's header
            header = _COMPUTATION.match(line)
            current = header.group(2)
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        op = _OP.match(line)
        if op:
            result, kind, start, _ = op.groups()
            if start and kind in ('all-gather', 'collective-permute'):
                result = _top_level(result)[1]  # (operands, results, ...) of the asynchronous start
            ops[current].append((kind, _bytes(result)))
        loop = _WHILE.search(line)
        if loop:
            trip = _TRIP.search(line)
            edges[current].append((loop.group(1), int(trip.group(1)) if trip else 1))
            continue
        for match in _CALLS.finditer(line):
            for callee in re.split(r',\s*', match.group(1)):
                edges[current].append((callee.lstrip('%'), 1))
    times = collections.Counter()

    def visit(name: str, factor: int, depth: int = 0):
        if depth > 64:
            return
        times[name] += factor
        for callee, n in edges.get(name, ()):
            visit(callee, factor * n, depth + 1)

    if entry is not None:
        visit(entry, 1)
    out = {kind: {'count': 0, 'bytes': 0.0} for kind in KINDS}
    for name, found in ops.items():
        for kind, size in found:
            out[kind]['count'] += times[name]
            out[kind]['bytes'] += times[name] * size
    return out
