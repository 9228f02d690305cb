"""The ADD search space and its cell (Sec. III-A, III-B): OP_df, Eq. 2's mixed edge, Eq. 1's cell.

- OPS / PRIMITIVES: OP_df of Sec. III-B, its 11 operations, as data (name -> constructor).
- MixedOp: Eq. 2, an edge of the search cell: the softmax(alpha)-weighted sum of every operation.
- Cell: Eq. 1, four nodes, each the sum of its incoming edges: one wiring for the search cell
  (every edge a MixedOp: search.py) and the derived cell (two chosen edges a node: add.py).
- Genotype: the architecture found, two cells of (operation, input) pairs.
Below the divider: PC-DARTS's partial channels, random genotypes, g.json. Conventions are DARTS's
[32]: ReLU-Conv-BN, a separable convolution twice, dilation 2.
"""
import contextlib
import json
import random
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from masks import InputError, write_text

STEPS = 4  # intermediate nodes per cell (Sec. III-A calls them blocks)


# ----------------------------------------------------------------------------------------------
# OP_df, the deepfake search space (Sec. III-B)

class ReLUConvBN(nn.Sequential):
    def __init__(self, C_in, C_out, kernel, stride, affine):
        super().__init__(nn.ReLU(), nn.Conv2d(C_in, C_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(C_out, affine=affine))


class DilConv(nn.Sequential):
    """ReLU, depthwise conv (optionally dilated), pointwise conv, BN."""
    def __init__(self, C, kernel, stride, dilation, affine):
        padding = dilation * (kernel - 1) // 2
        super().__init__(nn.ReLU(),
                         nn.Conv2d(C, C, kernel, stride, padding, dilation, groups=C, bias=False),
                         nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=affine))


class SepConv(nn.Sequential):
    """Depthwise separable convolution applied twice; only the first one strides. One flat sequence
    (ReLU, dw, pw, BN, ReLU, dw, pw, BN) so that, like every convolution here, it starts with a
    ReLU."""
    def __init__(self, C, kernel, stride, affine):
        super().__init__(*DilConv(C, kernel, stride, 1, affine), *DilConv(C, kernel, 1, 1, affine))


class FactorizedReduce(nn.Module):
    """Halves H, W with two 1x1 convs on pixel grids offset by one: DARTS's 1x1 stride-2 convs,
    written as subsampling, then a stride-1 conv (torch 2.14's strided 1x1 backward on channels_last
    inputs of 2-4 channels corrupts the heap on AVX2-only processors)."""
    def __init__(self, C_in, C_out, affine):
        super().__init__()
        self.conv1 = nn.Conv2d(C_in, C_out // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(C_in, C_out - C_out // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))
        x = F.relu(x)
        even = x[:, :, ::2, ::2]
        odd = x[:, :, 1::2, 1::2]  # the grid a stride-2 conv reads, and the one offset by one
        # odd H, W: a zero row/column
        odd = F.pad(odd, (0, even.shape[3] - odd.shape[3], 0, even.shape[2] - odd.shape[2]))
        return self.bn(torch.cat([self.conv1(even), self.conv2(odd)], dim=1))


class Zero(nn.Module):
    """The zero operation: an edge that contributes nothing (still the right shape)."""
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


# OP_df, the deepfake search space of Sec. III-B, in the paper's order: name -> constructor(C,
# stride, affine)
OPS = {
    "none": lambda C, stride, affine: Zero(stride),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1
    else FactorizedReduce(C, C, affine),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride, 1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride, 1),
    "conv_3x3": lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, affine),
    "conv_5x5": lambda C, stride, affine: ReLUConvBN(C, C, 5, stride, affine),
    "conv_7x7": lambda C, stride, affine: ReLUConvBN(C, C, 7, stride, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, 3, stride, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, 5, stride, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, 3, stride, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, 5, stride, 2, affine),
}
PRIMITIVES = list(OPS)  # the 11 operations; a column of alpha per name, in this order
assert PRIMITIVES[0] == "none"  # MixedOp skips it by position


class MixedOp(nn.Module):
    """An edge of the search cell (Eq. 2): every operation of OP_df on the edge's input, weighted by
    the softmax of the edge's row of alpha. Not in Eq. 2's line: zero (PRIMITIVES[0]) adds nothing,
    so it is not built; pooling gets a non-affine BN (DARTS) to match the convolutions' scale; the
    seven convolutions share one ReLU(x) (a search step 1.25x faster); the sum is in fp32 (bf16
    loses bits). partial = K > 1: PC-DARTS's partial channels (not in the paper): the first C/K
    channels go through the operations, the rest bypass the edge (max-pooled where it strides), then
    a channel shuffle."""
    def __init__(self, C, stride, partial=1):
        super().__init__()
        self.partial = partial
        built = [self._op(name, C // partial, stride) for name in PRIMITIVES[1:]]  # all but zero
        self.after_relu = ["conv" in name for name in PRIMITIVES[1:]]  # the seven start with a ReLU
        self.ops = nn.ModuleList(nn.Sequential(*list(op)[1:]) if r else op
                                 for op, r in zip(built, self.after_relu))
        if partial > 1:
            self.bypass = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()

    @staticmethod
    def _op(name, C, stride):
        op = OPS[name](C, stride, False)
        return nn.Sequential(op, nn.BatchNorm2d(C, affine=False)) if "pool" in name else op

    # x (B, C, H, W); weights (n_ops,): the softmax of this edge's row of alpha
    def forward(self, x, weights):
        if self.partial > 1:
            # (B, C/K, ..), (B, C - C/K, ..)
            x, rest = x.tensor_split([x.shape[1] // self.partial], dim=1)
        # (weights[0], zero's, adds nothing)
        out = sum(w * y for w, y in zip(weights[1:], self.outputs(x)))  # Eq. 2
        if self.partial == 1:
            return out
        return channel_shuffle(torch.cat([out, self.bypass(rest).to(out.dtype)], dim=1),
                               self.partial)

    def outputs(self, x):
        """op(x) for every operation but zero, in PRIMITIVES' order, in fp32, one at a time."""
        inputs = (x, F.relu(x))
        return (op(inputs[r]).float() for op, r in zip(self.ops, self.after_relu))


# ----------------------------------------------------------------------------------------------
# The cell (Eq. 1): one wiring for the search cell and the derived cell

def search_edges():
    """Every edge of a search cell: node i (0-based) takes inputs 0..i+1 (0, 1: the two previous
    cells; k >= 2: node k-2). Returns [(node, input, None)], None meaning "a MixedOp"; the k-th edge
    uses row k of alpha (14 rows for 4 nodes)."""
    return [(node, inp, None) for node in range(STEPS) for inp in range(node + 2)]


class Cell(nn.Module):
    """A cell: node i = the sum of its incoming edges; output = the concat of the nodes, so 4*C
    channels. In a derived cell a node has two edges: Eq. 1. In the search cell it has one from each
    earlier output (i + 2): the sum over them is Eq. 2's outer sum over H, each edge a MixedOp (the
    inner sum). Inputs are the two previous cells' outputs (s0 = c_{k-2}, s1 = c_{k-1}); in a
    reduction cell the edges from them have stride 2.

    edges: [(node, input, op name or None)]; None builds a MixedOp (search; partial: its K), a name
    builds that op.
    """
    def __init__(self, edges, C_pp, C_p, C, reduction, reduction_prev, affine, partial=1):
        super().__init__()
        self.reduction = reduction
        # s0 is twice the size of s1 after a reduction cell: bring both to (B, C, H, W)
        self.pre0 = (FactorizedReduce(C_pp, C, affine) if reduction_prev
                     else ReLUConvBN(C_pp, C, 1, 1, affine))
        self.pre1 = ReLUConvBN(C_p, C, 1, 1, affine)
        self.edges = [(node, inp) for node, inp, _ in edges]
        self.ops = nn.ModuleList()
        for _, inp, name in edges:
            stride = 2 if reduction and inp < 2 else 1
            self.ops.append(MixedOp(C, stride, partial) if name is None
                            else OPS[name](C, stride, affine))

    def forward(self, s0, s1, weights=None):
        """weights: None (a derived cell), or (op weights (n_edges, n_ops): the softmax of alpha,
        edge weights (n_edges,): PC-DARTS's normalised beta, or None)."""
        states = [self.pre0(s0), self.pre1(s1)]  # each (B, C, H, W)
        for node in range(STEPS):
            # (search cell: Eq. 2's sum over H)
            states.append(sum(self._edge(k, states[inp], weights)
                              for k, (n, inp) in enumerate(self.edges) if n == node))  # Eq. 1
        return torch.cat(states[2:], dim=1)  # (B, steps*C, H', W')

    def _edge(self, k, h, weights):
        if weights is None:
            return self.ops[k](h)
        op_weights, edge_weights = weights
        out = self.ops[k](h, op_weights[k])
        return out if edge_weights is None else edge_weights[k] * out


# ----------------------------------------------------------------------------------------------
# The genotype: the architecture found

class Genotype(NamedTuple):
    """Two cells, each 2*STEPS (op, input) pairs: pair k feeds node k // 2 from input `input`
    (0, 1 = the two previous cells, j >= 2 = node j - 2). Example (g.json):
        {"normal": [["sep_conv_3x3", 0], ["dil_conv_3x3", 1], ...8 pairs],
         "reduce": [["max_pool_3x3", 0], ["sep_conv_5x5", 1], ...8 pairs]}"""
    normal: tuple
    reduce: tuple


def genotype_edges(cell):
    """The chosen edges of a derived cell: [(op, input), ...] two per node -> [(node, input,
    op)]."""
    return [(k // 2, inp, op) for k, (op, inp) in enumerate(cell)]


# ==============================================================================================
# Below: not the paper's method.

def channel_shuffle(x, groups):
    """(B, C, H, W) -> channel g * C/groups + i moved to i * groups + g (PC-DARTS), in one strided
    copy that keeps x's memory format (a reshape would turn channels_last into NCHW)."""
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    grouped = x.view(B, groups, C // groups, H, W)  # channel g * C/groups + i at [g, i]
    out.view(B, C // groups, groups, H, W).copy_(grouped.transpose(1, 2))
    return out


def node_softmax(beta):
    """PC-DARTS's edge normalisation: beta (n_edges,), one weight per search edge -> a softmax over
    each node's incoming edges (node i has i + 2 of them, consecutive in search_edges' order)."""
    return torch.cat([b.softmax(0) for b in beta.split([node + 2 for node in range(STEPS)])])


def random_genotype(seed):
    """NAS's random baseline (Li & Talwalkar 2019): per node two distinct inputs among its
    predecessors, each edge one of the ten non-zero operations, uniformly; the two cells drawn
    independently."""
    rng = random.Random(seed)
    cell = lambda: tuple((rng.choice(PRIMITIVES[1:]), inp) for node in range(STEPS)
                         for inp in sorted(rng.sample(range(node + 2), 2)))
    return Genotype(cell(), cell())


def genotype_to_json(genotype, origin=None):
    """A node (two pairs) a line, to read the cell off the file; origin ("search", "random") for
    --compare."""
    def cell(pairs):
        rows = [f"    {json.dumps(list(a))}, {json.dumps(list(b))}"
                for a, b in zip(pairs[::2], pairs[1::2])]
        return "[\n" + ",\n".join(rows) + "\n  ]"
    tail = f',\n  "origin": {json.dumps(origin)}' if origin else ""
    return (f'{{\n  "normal": {cell(genotype.normal)},\n  "reduce": {cell(genotype.reduce)}'
            f'{tail}\n}}\n')


def save_genotype(genotype, path, origin=None):
    write_text(path, genotype_to_json(genotype, origin))


def genotype_origin(path):
    """The "origin" a genotype file records, or None (load_genotype says why a file is
    unreadable)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(path) as f:
            return json.load(f).get("origin")


def load_genotype(path):
    """Read and validate g.json; every mistake is an InputError naming the file and the field."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such genotype file (write one with: python search.py --out "
                         f"{path})")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); expected "
                         f"{{\"normal\": [...], \"reduce\": [...]}}")
    return genotype_from_dict(obj, path)


def genotype_from_dict(obj, source):
    """A genotype from its JSON form (g.json, or the copy a training checkpoint carries)."""
    if not isinstance(obj, dict):
        raise InputError(f"{source}: expected a JSON object with keys \"normal\" and \"reduce\"")
    return Genotype(*(_parse_cell(obj.get(key), source, key) for key in ("normal", "reduce")))


def _parse_cell(cell, path, key):
    if not isinstance(cell, list) or len(cell) != 2 * STEPS:
        got = "missing" if cell is None else type(cell).__name__
        if isinstance(cell, list):
            got = f"{len(cell)} entries"
        raise InputError(f"{path}: \"{key}\": expected a list of {2 * STEPS} [op, input] pairs "
                         f"(2 per node, {STEPS} nodes), got {got}")
    pairs = []
    for k, pair in enumerate(cell):
        node, field = k // 2, f'"{key}"[{k}]'
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and type(pair[1]) is int):  # not a bool
            raise InputError(f"{path}: {field}: expected [op name, input index], got "
                             f"{json.dumps(pair)}")
        op, inp = pair
        if op not in OPS:
            raise InputError(f"{path}: {field}: unknown op {op!r}; expected one of "
                             f"{', '.join(PRIMITIVES)}")
        if not 0 <= inp < node + 2:
            raise InputError(f"{path}: {field}: input {inp} does not precede node {node} "
                             f"(expected 0..{node + 1}: the two cell inputs, then earlier nodes)")
        pairs.append((op, inp))
    unread = {0, 1} - {inp for _, inp in pairs}
    if unread:  # its 1x1 pre-processing would get no gradient: DDP refuses to train it
        raise InputError(f"{path}: \"{key}\": no pair reads input {min(unread)}; a cell reads both "
                         "of its inputs, 0 and 1")
    return tuple(pairs)
