"""Tests of ADD on tiny synthetic data, tiny video trees in the datasets' layouts and a real face
photo: the paper's equations against independent computations, each guarantee of a run once, as a
process.
python -m pytest -q"""
import argparse
import collections
import contextlib
import csv
import glob
import hashlib
import inspect
import io
import json
import math
import os
import re
import resource
import socket
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
import wave
import zlib

import av
import numpy as np
import pytest
import scipy.interpolate
import scipy.optimize
import scipy.stats
import sklearn.metrics
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_dilation
from skimage.data import astronaut

import add
import masks
import ops
import search
import train

HERE = os.path.dirname(os.path.abspath(__file__))
# A genotype in the style of the paper's Fig. 8 (separable and dilated convolutions)
GENOTYPE = ops.Genotype(
    normal=(("sep_conv_3x3", 0), ("dil_conv_5x5", 1), ("sep_conv_5x5", 0), ("dil_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("dil_conv_3x3", 2), ("sep_conv_5x5", 0), ("dil_conv_5x5", 3)),
    reduce=(("sep_conv_5x5", 0), ("dil_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_3x3", 2),
            ("max_pool_3x3", 0), ("sep_conv_5x5", 2), ("dil_conv_5x5", 1), ("skip_connect", 3)))
TINY_SEARCH = ["--videos", "4", "--frames", "1", "--image-size", "32", "--channels", "4", "--cells",
               "3", "--batch-size", "4", "--warmup", "0"]
TINY_TRAIN = ["--videos", "6", "--frames", "1", "--image-size", "32", "--channels", "4",
              "--batch-size", "8"]
CPU = torch.device("cpu")
# The AVX2 kernels, one thread: where torch 2.14's strided 1x1 conv backward corrupted the heap on
# 2-4 channels
AVX2 = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", OMP_NUM_THREADS="1")


def run_cli(*args, env=None, timeout=240):
    """A script as a user runs it -> (return code, stdout, stderr); a hang: TimeoutExpired."""
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=HERE,
                       timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def genotype_file(tmp_path):
    path = f"{tmp_path}/g.json"
    ops.save_genotype(GENOTYPE, path)
    return path


def tiny_batch(n=8, size=32, videos=4):
    ds = add.SyntheticFaces("train", list(masks.SYNTHETIC_METHODS), videos, 1, size, seed=0)
    idx = torch.arange(n) % len(ds)
    return ds.images[idx], ds.masks[idx], torch.tensor(ds.labels)[idx], None


def random_batchnorm(model, seed=0):
    """BatchNorm statistics and parameters far from their defaults: a fold that dropped one
    changes the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            if m.affine:
                m.weight.data.copy_(1 + 0.5 * torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(0.5 * torch.randn(m.num_features, generator=g))
    return model


def test_the_search_space_is_the_papers_eleven_operations_and_a_mixed_edge_is_eq2():
    # Sec. III-B's list, in its order
    assert ops.PRIMITIVES == ["none", "skip_connect", "avg_pool_3x3", "max_pool_3x3", "conv_3x3",
                              "conv_5x5", "conv_7x7",
                              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    convs = lambda name: [(m.kernel_size[0], m.dilation[0], m.groups > 1)
                          for m in ops.OPS[name](6, 1, True).modules()
                          if isinstance(m, torch.nn.Conv2d)]
    assert isinstance(ops.OPS["none"](6, 1, True), ops.Zero)
    assert isinstance(ops.OPS["skip_connect"](6, 1, True), torch.nn.Identity)
    assert isinstance(ops.OPS["avg_pool_3x3"](6, 1, True), torch.nn.AvgPool2d)
    assert isinstance(ops.OPS["max_pool_3x3"](6, 1, True), torch.nn.MaxPool2d)
    for k in (3, 5, 7):
        assert convs(f"conv_{k}x{k}") == [(k, 1, False)]  # one dense k x k convolution
    for k in (3, 5):
        # depthwise + pointwise, twice
        assert convs(f"sep_conv_{k}x{k}") == [(k, 1, True), (1, 1, False)] * 2
        # dilated depthwise + pointwise
        assert convs(f"dil_conv_{k}x{k}") == [(k, 2, True), (1, 1, False)]
    # each keeps the shape, or halves it at stride 2 (odd sizes rounded up)
    for name in ops.PRIMITIVES:
        for s in (1, 2):
            out = ops.OPS[name](6, s, True)(torch.randn(2, 6, 7, 8))
            assert out.shape == (2, 6, 7 // s + s - 1, 8 // s)
    torch.manual_seed(0)
    # eval: BN uses running statistics, so every call is the same function
    mixed = ops.MixedOp(4, 2).eval()
    x, alpha = torch.randn(2, 4, 8, 8), torch.randn(len(ops.PRIMITIVES))
    w = torch.exp(alpha) / torch.exp(alpha).sum()
    # zero adds nothing
    by_hand = sum(w[i] * full_op(mixed, i, 4, 2)(x) for i in range(1, len(ops.PRIMITIVES)))
    assert torch.allclose(mixed(x, alpha.softmax(0)), by_hand, atol=1e-6)
    for i, name in enumerate(ops.PRIMITIVES):  # one-hot weights: that operation alone, bit for bit
        out = mixed(x, F.one_hot(torch.tensor(i), len(ops.PRIMITIVES)).float())
        if name == "none":
            assert out.shape == (2, 4, 4, 4) and (out == 0).all()
        else:
            assert torch.equal(out, full_op(mixed, i, 4, 2)(x))
    assert not any(isinstance(op, ops.Zero) for op in mixed.ops)  # the zero op costs nothing


def full_op(mixed, i, C, stride):
    """Operation i as OPS builds it (its own leading ReLU), holding the mixed op's weights."""
    full = ops.MixedOp._op(ops.PRIMITIVES[i], C, stride).eval()
    stored = mixed.ops[i - 1].state_dict().values()  # the zero operation (i = 0) is not built
    full.load_state_dict(dict(zip(full.state_dict().keys(), stored)))
    return full


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channels_route_a_kth_of_the_channels_through_eq2_and_shuffle_the_rest(stride):
    torch.manual_seed(0)
    K, C = 4, 8
    mixed = ops.MixedOp(C, stride, partial=K).eval()
    assert all(m.in_channels == C // K for m in mixed.modules() if isinstance(m, torch.nn.Conv2d))
    x, w = torch.randn(2, C, 8, 8), torch.softmax(torch.randn(len(ops.PRIMITIVES)), 0)
    out = mixed(x, w)
    # by hand, on C/K channels
    eq2 = sum(w[i] * full_op(mixed, i, C // K, stride)(x[:, :C // K]) for i in range(1, 11))
    rest = x[:, C // K:] if stride == 1 else F.max_pool2d(x[:, C // K:], 2)
    unshuffled = torch.empty_like(out)
    for g in range(K):  # the shuffle puts channel g * C/K + i at i * K + g
        for i in range(C // K):
            unshuffled[:, g * (C // K) + i] = out[:, i * K + g]
    assert torch.allclose(unshuffled[:, :C // K], eq2, atol=1e-6)
    assert torch.equal(unshuffled[:, C // K:], rest)
    # the search network's format stays (no silent NCHW)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert ops.channel_shuffle(cl, K).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("reduction", [False, True])
def test_the_search_cell_is_eq1_over_eq2_edges_and_shares_its_wiring_with_the_derived_cell(
        reduction):
    torch.manual_seed(0)
    cell = ops.Cell(ops.search_edges(), 8, 8, 4, reduction, reduction_prev=True,
                    affine=False).eval()
    # K = 1: no partial-channel machinery
    assert all(not hasattr(m, "bypass") for m in cell.modules())
    s0 = torch.randn(2, 8, 16, 16)
    s1 = torch.randn(2, 8, 8, 8)
    weights = torch.softmax(torch.randn(14, 11), -1)
    # DARTS's cell by hand: node i takes states 0..i+1 (its edges, numbered node by node: node i's
    # first is edge i(i+3)/2), each edge Eq. 2's sum over the operations
    states = [cell.pre0(s0), cell.pre1(s1)]
    for node in range(4):
        node_sum = 0
        for inp in range(node + 2):
            k = node * (node + 3) // 2 + inp
            stride = 2 if reduction and inp < 2 else 1
            node_sum += sum(weights[k, i] * full_op(cell.ops[k], i, 4, stride)(states[inp])
                            for i in range(1, 11))
        states.append(node_sum)
    assert torch.allclose(cell(s0, s1, (weights, None)), torch.cat(states[2:], 1), atol=1e-5)
    # alpha one-hot on the genotype's (operation, input) pairs: the derived cell holding the same
    # weights
    genotype_cell = GENOTYPE.reduce if reduction else GENOTYPE.normal
    derived = ops.Cell(ops.genotype_edges(genotype_cell), 8, 8, 4, reduction, reduction_prev=True,
                       affine=True).eval()
    one_hot = torch.zeros(14, 11)
    convs = lambda m: [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    for j, (op, inp) in enumerate(genotype_cell):
        k, o = ops.search_edges().index((j // 2, inp, None)), ops.PRIMITIVES.index(op)
        one_hot[k, o] = 1.0
        for a, b in zip(convs(cell.ops[k].ops[o - 1]), convs(derived.ops[j])):
            b.weight.data.copy_(a.weight)
    for a, b in zip(convs(cell.pre0) + convs(cell.pre1), convs(derived.pre0) + convs(derived.pre1)):
        b.weight.data.copy_(a.weight)
    out = derived(s0, s1)
    assert out.shape == (2, 16, 4 if reduction else 8, 4 if reduction else 8)
    # pooling's BN: 1/sqrt(1 + eps)
    assert torch.allclose(cell(s0, s1, (one_hot, None)), out, rtol=1e-4, atol=1e-5)


def test_factorized_reduce_is_darts_two_stride_2_convs_and_the_same_with_the_avx2_kernels():
    torch.manual_seed(0)
    op = random_batchnorm(ops.FactorizedReduce(6, 8, True)).eval()
    x = torch.randn(2, 6, 8, 8)
    # DARTS, written here on its own: conv_1(x), conv_2(x[:, :, 1:, 1:]), both 1x1 at stride 2
    r = F.relu(x)
    darts = torch.cat([F.conv2d(r, op.conv1.weight, stride=2),
                       F.conv2d(r[:, :, 1:, 1:], op.conv2.weight, stride=2)], 1)
    assert torch.equal(op(x), op.bn(darts))
    # odd sizes (DARTS's shapes would not match): the offset grid, x[1:, 1:], zero-padded to the
    # first's by a zero row and column at its end
    x = torch.randn(2, 6, 7, 9)
    r = F.pad(F.relu(x), (0, 1, 0, 1))  # (2, 6, 8, 10)
    odd = torch.cat([F.conv2d(r[:, :, :7, :9], op.conv1.weight, stride=2),
                     F.conv2d(r[:, :, 1:, 1:], op.conv2.weight, stride=2)], 1)
    assert odd.shape == (2, 8, 4, 5)
    assert torch.allclose(op(x), op.bn(odd), atol=1e-6)
    # where the AVX2 kernel corrupted the heap, forward and backward, with the default kernels and
    # the AVX2 ones: the same
    drive = ("import torch, ops\n"
             "torch.manual_seed(0)\n"
             "out, last = [], torch.channels_last\n"
             "for C_in, C_out in ((2, 2), (2, 4), (4, 2), (4, 4)):\n"
             "    op = ops.FactorizedReduce(C_in, C_out, True).to(memory_format=last)\n"
             "    for _ in range(10):\n"
             "        x = torch.randn(4, C_in, 8, 8).contiguous(memory_format=last)\n"
             "        loss = op(x.requires_grad_()).square().sum()\n"
             "        loss.backward()\n"
             "        out += [loss.item(), x.grad.abs().sum().item()]\n"
             "print(repr(out))\n")
    code, out, err = run_cli("-c", drive, env=AVX2)
    assert code == 0, err[-2000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the other process; this process's kernels
    try:
        with contextlib.redirect_stdout(io.StringIO()) as here:
            exec(drive, {})
    finally:
        torch.set_num_threads(threads)
    results = eval(out), eval(here.getvalue())
    assert len(results[0]) == 80 and np.allclose(*results, rtol=1e-5, atol=1e-5)


def test_derivation_follows_the_darts_rule_on_a_hand_worked_alpha():
    P = ops.PRIMITIVES.index
    w = torch.full((14, 11), 0.01)
    w[0, P("none")] = 0.9
    w[0, P("sep_conv_3x3")] = 0.05  # node 0: 'none' never wins; sep_conv_3x3 does
    w[1, P("conv_7x7")] = 0.3
    w[2, P("skip_connect")] = 0.2
    w[3, P("max_pool_3x3")] = 0.6
    w[4, P("dil_conv_3x3")] = 0.4  # node 1
    w[5, P("conv_3x3")] = 0.3
    w[6, P("none")] = 0.9
    w[7, P("dil_conv_5x5")] = 0.5
    w[8, P("avg_pool_3x3")] = 0.4
    w[9, P("sep_conv_5x5")] = 0.7
    w[13, P("conv_5x5")] = 0.2  # node 3: edges from input 0 and node 2
    assert search.derive_cell(w) == (("sep_conv_3x3", 0), ("conv_7x7", 1),  # a node a line
        ("max_pool_3x3", 1), ("dil_conv_3x3", 2),
        ("dil_conv_5x5", 2), ("avg_pool_3x3", 3),
        ("sep_conv_5x5", 0), ("conv_5x5", 4))
    # with partial channels the cell is chosen on alpha x beta, beta normalised over each node's
    # inputs
    beta = ops.node_softmax(torch.randn(14))
    # node i's i + 2 inputs
    assert [round(float(b.sum()), 6) for b in beta.split([2, 3, 4, 5])] == [1.0] * 4
    pc = search.SearchNetwork(4, 3, 2, partial=2)
    # node 1 (edges 2, 3, 4 from inputs 0, 1, node 0): alpha prefers edges 2 and 3 ...
    with torch.no_grad():
        pc.alpha_normal.zero_()
        pc.alpha_normal[2, P("sep_conv_3x3")], pc.alpha_normal[3, P("dil_conv_3x3")] = 3.0, 3.2
        pc.alpha_normal[4, P("max_pool_3x3")] = 2.5
        pc.beta_normal.zero_()
        # ... but beta makes edge 4 (node 0 -> node 1) the strongest with it
        pc.beta_normal[4] = 2.0
    pairs = (("sep_conv_3x3", 0), ("dil_conv_3x3", 1))
    assert search.derive_cell(pc.alpha_normal.softmax(-1))[2:4] == pairs
    # alpha x beta by hand, the strongest op of each edge: edge 2: e^3 / (e^3 + 10) = 0.667, times
    # beta's
    # 1 / (2 + e^2) = 0.107: 0.071; edge 3: 0.710 x 0.107 = 0.076; edge 4: 0.549 x e^2 / (2 + e^2) =
    # 0.432
    assert pc.genotype().normal[2:4] == (("dil_conv_3x3", 1), ("max_pool_3x3", 2))


@pytest.mark.parametrize("content, expected", [
    (None, "no such genotype file"),
    ('{"normal": [["sep_conv_3x3", 0]', "not valid JSON"),
    ('{"normal": [["sep_conv_3x3", 0]], "reduce": []}', '"normal": expected a list of 8 [op, '
                                                        'input] pairs'),
    ([("normal", 3, ["sep_conv_9x9", 1])], "\"normal\"[3]: unknown op 'sep_conv_9x9'"),
    ([("reduce", 2, ["conv_3x3", 3])], '"reduce"[2]: input 3 does not precede node 1'),
    ([("normal", 0, ["sep_conv_3x3", "0"])],
     '"normal"[0]: expected [op name, input index], got ["sep_conv_3x3", "0"]'),
    # no edge from the previous cell: its 1x1 pre-processing would get no gradient (DDP fails)
    ([("reduce", 1, ["conv_3x3", 0]), ("reduce", 6, ["conv_3x3", 0])],
     '"reduce": no pair reads input 1; a cell reads both of its inputs, 0 and 1'),
])
def test_bad_genotype_files_give_one_line_errors(tmp_path, content, expected):
    if isinstance(content, list):  # a good file with pairs spoilt
        good = json.loads(ops.genotype_to_json(GENOTYPE))
        for cell, k, pair in content:
            good[cell][k] = pair
        content = json.dumps(good)
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ops.InputError) as e:
        ops.load_genotype(str(path))
    assert str(e.value).startswith(str(path))
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


class HostReads(torch.overrides.TorchFunctionMode):
    """Every read of a tensor's values by the host (item, tolist, bool, float, int, numpy, cpu)
    and every copy to a device that waits (to or tensor with a device, not non_blocking) that the
    code of ADD makes (the calling frame in one of its scripts; torch's Adam reads its step count,
    kept on the host) while `counting`."""
    READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.numpy, torch.Tensor.cpu)

    def __init__(self):
        super().__init__()
        self.counting = False
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counting and (func in self.READS or func in (torch.Tensor.to, torch.tensor)):
            frame = sys._getframe(1)
            device = "device" in kwargs or any(isinstance(a, torch.device) for a in args[1:])
            waits = func not in self.READS and device and not kwargs.get("non_blocking")
            if frame.f_code.co_filename in SCRIPTS and (func in self.READS or waits):
                self.found.append(f"{func.__name__} at {frame.f_code.co_filename}:{frame.f_lineno}")
        return func(*args, **kwargs)


SCRIPTS = [os.path.join(HERE, f"{m}.py") for m in ("ops", "add", "search", "train", "masks")]


@contextlib.contextmanager
def counting_host_reads():
    """HostReads counting while a step runs between two checks (every CHECK_EVERY steps and an
    epoch's last): -> (its reads, whether each step ran between two checks)."""
    mode, real_step, windows = HostReads(), add.Run.step, []

    def step(self, loss, images, epoch, step, steps, cost=1):
        mode.counting = False
        stop = real_step(self, loss, images, epoch, step, steps, cost)
        mode.counting = (step + 1) % add.CHECK_EVERY != 0 and step + 1 < steps
        windows.append(mode.counting)
        return stop
    add.Run.step = step
    try:
        with mode:
            yield mode.found, windows
    finally:
        add.Run.step = real_step


# 22 steps an epoch of 2 samples at 32 px: the 21 after each epoch's first run between two checks
STEPS_22 = ["--image-size", "32", "--channels", "4", "--videos", "11", "--frames", "2",
            "--batch-size", "2"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One tiny search in this process, its host reads counted: partial channels K = 2, an epoch
    of 22 steps, w alone in the first 11 (the warm-up), then alpha with its parameter term too."""
    tmp, out = tmp_path_factory.mktemp("search"), io.StringIO()
    with contextlib.redirect_stdout(out), counting_host_reads() as (reads, windows):
        model = search.main(STEPS_22 + ["--cells", "3", "--epochs", "1", "--warmup", "0.5",
                                        "--partial-channels", "2", "--out", f"{tmp}/g.json",
                                        "--run-dir", f"{tmp}/run"])
    return dict(model=model, g=f"{tmp}/g.json", run=f"{tmp}/run", out=out.getvalue(),
                reads=reads, windows=windows)


def test_the_search_writes_its_genotype_log_and_checkpoint_and_random_genotypes_are_uniform(
        searched, tmp_path, capsys):
    model, run = searched["model"], searched["run"]
    assert ops.load_genotype(searched["g"]) == model.genotype()
    assert Image.open(searched["g"][:-5] + ".png").size == (1240, 380)
    log = [json.loads(line) for line in open(f"{run}/log.jsonl")]
    assert [(e["epoch"], e["alpha_steps"]) for e in log] == [(1, 11)]  # after the warm-up's 11
    assert log[0]["val_ce"] > 0
    torch.manual_seed(0)  # alpha as initialised: the same draws as the run's
    initial = search.SearchNetwork(4, 3, 2, partial=2).alpha_normal.softmax(-1)
    assert not torch.allclose(model.alpha_normal.softmax(-1), initial, atol=1e-4)  # it moved
    assert torch.allclose(torch.tensor(log[0]["softmax_alpha"]["normal"]),
                          model.alpha_normal.softmax(-1), atol=1e-6)
    beta = torch.tensor(log[-1]["edge_weights"]["reduce"])  # with K > 1 beta is logged
    assert torch.allclose(beta, ops.node_softmax(model.beta_reduce.detach()))
    assert ("1 epochs x 22 steps (one pass) = 22 steps of 2 training + 2 validation images, alpha "
            "still for the first 11") in searched["out"]
    assert re.search(r"M parameters at the paper's size \(C 48, N 4\), .* at the demo's",
                     searched["out"].splitlines()[-1])
    # its format, pinned: a rename needs a conversion
    state = torch.load(f"{run}/search.pt")
    assert set(state) == {"model", "w_opt", "a_opt", "w_sched", "a_sched", "epoch", "step", "means",
                          "rng", "config"}
    assert (state["epoch"], state["step"], state["means"]) == (1, 0, None)
    assert torch.equal(state["model"]["alpha_normal"], model.alpha_normal)
    # the effective configuration
    assert json.load(open(f"{run}/config.json"))["image_size"] == 32
    g = ops.random_genotype(3)
    assert g == ops.random_genotype(3) and g != ops.random_genotype(4) and g.normal != g.reduce
    cells = [cell for seed in range(500) for cell in ops.random_genotype(seed)]
    assert all(0 <= a < b < k // 2 + 2 for cell in cells for k in range(0, 8, 2)
               for a, b in [(cell[k][1], cell[k + 1][1])])
    # each of the ten non-zero ops: 10% of 8000 edges
    seen = [op for cell in cells for op, _ in cell]
    assert {op: round(seen.count(op) / 8000, 1)
            for op in set(seen)} == {op: 0.1 for op in ops.PRIMITIVES[1:]}
    last = [(cell[6][1], cell[7][1]) for cell in cells]  # node 3: its 10 input pairs alike
    assert len(set(last)) == 10
    assert all(abs(last.count(pair) / 1000 - 0.1) < 0.03 for pair in set(last))
    search.main(["--random-genotype", "3", "--out", f"{tmp_path}/r.json"])
    assert ops.load_genotype(f"{tmp_path}/r.json") == g
    assert Image.open(tmp_path / "r.png").size[0] > 500
    assert ops.genotype_origin(f"{tmp_path}/r.json") == "random"
    assert "M parameters at the paper's size" in capsys.readouterr().out


def equal(a, b):
    """Two checkpoints' (or any nested) values the same: tensors bit for bit, the rest by ==."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def log_lines(run):
    """A run's log.jsonl without its times."""
    lines = [json.loads(line) for line in open(f"{run}/log.jsonl")]
    return [{k: v for k, v in line.items() if "seconds" not in k} for line in lines]


def test_a_checkpoint_of_the_previous_version_resumes_to_the_same_search(tmp_path, monkeypatch):
    # a search stopped after step 2 of 3 (its checkpoint holds the epoch's means), as the previous
    # version wrote it (its options built in here, at these values), resumes to the uninterrupted
    # search: the same log, the same checkpoint in every tensor and value
    argv = TINY_SEARCH + ["--epochs", "1", "--videos", "6", "--partial-channels", "2"]
    whole, run = f"{tmp_path}/whole", f"{tmp_path}/run"
    search.main(argv + ["--out", whole + ".json", "--run-dir", whole])
    real_step = add.Run.step
    monkeypatch.setattr(add.Run, "step", lambda self, loss, images, epoch, step, steps, cost=1:
                        real_step(self, loss, images, epoch, step, steps, cost)
                        or step == 1)
    with pytest.raises(add.Stopped, match="at epoch 1, step 2; its checkpoint is written"):
        search.main(argv + ["--out", run + ".json", "--run-dir", run])
    monkeypatch.undo()
    path = f"{run}/search.pt"
    state = torch.load(path)
    means = state["means"]
    assert (state["epoch"], state["step"], means["w_steps"], means["alpha_steps"]) == (0, 2, 2, 2)
    old = dict(state["config"], w_optimizer="sgd", momentum=0.9, alpha_lr=0.02, weight_decay=5e-4,
               w_lr_batch=64, w_lr_min=0.01, mask_weight=1.0, param_target=5.6e6, grad_clip=5.0,
               warmup_epochs=None, no_flips=False, no_mask_branch=False, compile=False,
               deterministic=False, select="alpha", pt_batches=2, pt_tune_steps=5, log_every=0,
               check_every=50, checkpoint_every=100, profile=False)
    torch.save(dict(state, config=old), path)
    open(f"{run}/log.jsonl", "a").write('{"epoch": 2, "train_ce": 0.69')  # a kill's
    search.main(["--resume", "--run-dir", run])
    assert log_lines(run) == log_lines(whole)  # every line, every loss, alpha's softmax
    ends = [torch.load(f"{r}/search.pt") for r in (run, whole)]
    assert equal(*[{k: v for k, v in end.items() if k != "config"} for end in ends])
    assert open(run + ".json").read() == open(whole + ".json").read()
    # one line each: an option that is built in here (or gone, as DARTS-PT's selection) at another
    # value; a change to what the optimizers hold; options that do not fit together, once merged;
    # a state without the epoch's means (an older format)
    for change, why in ((dict(momentum=0.5), r"--momentum 0.5 \(built in here: 0.9\)"),
                        (dict(select="pt"), r"--select pt \(built in here: alpha\)")):
        torch.save(dict(state, config=dict(old, **change)), path)
        with pytest.raises(ops.InputError, match=r"search.pt: written by another version of this "
                           rf"script \(it ran with {why}\); start a new run"):
            search.main(["--resume", "--run-dir", run])
    torch.save(dict(state, config=old), path)
    with pytest.raises(ops.InputError, match=r"search.pt: its optimizer and schedule hold --epochs "
                       "1, and a resumed run keeps them"):
        search.main(["--resume", "--run-dir", run, "--epochs", "3"])
    with pytest.raises(ops.InputError, match="--partial-channels 2: must divide --channels 5"):
        search.main(["--resume", "--run-dir", run, "--channels", "5"])
    # checked once merged: 8 px fit the checkpoint's 1 halving (the demo's 2 need 16 px)
    torch.save(dict(state, config=dict(old, stem_reductions=1)), path)
    with pytest.raises(ops.InputError, match="search.pt: the checkpoint's model does not match"):
        search.main(["--resume", "--run-dir", run, "--image-size", "8"])
    del state["means"]
    torch.save(state, path)
    with pytest.raises(ops.InputError, match=r"search.pt: not a checkpoint this script can resume "
                       r"\(its state has no means: written by another version"):
        search.main(["--resume", "--run-dir", run])
    # given now, False and 0 win over the checkpoint's True and 2; what is not given is its own
    torch.save(dict(state, config=dict(old, small_input=True, workers=2)), path)
    given = argparse.Namespace(small_input=False, workers=0, out=None)
    merged, _ = add.resume(path, given, ["small_input", "workers", "out"], (), {}, (), trim=False)
    assert (merged.small_input, merged.workers, merged.out) == (False, 0, run + ".json")


def test_no_file_is_left_half_written_and_no_checkpoint_holds_a_non_finite_value(
        tmp_path, genotype_file, monkeypatch, capsys):
    path = f"{tmp_path}/f.txt"
    masks.atomic_write(path, lambda f: f.write(b"old"))

    def cut_short(f):  # a write interrupted: the old file stays, no temporary file is left
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        masks.atomic_write(path, cut_short)
    assert open(path).read() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt", "g.json"]
    path = f"{tmp_path}/c.pt"
    add.save_checkpoint(dict(model={"w": torch.ones(2)}), path)
    bad = dict(model={"w": torch.ones(2)},
               opt=dict(state={0: dict(exp_avg=torch.tensor([1.0, float("inf")]))}))
    with pytest.raises(add.Diverged, match=r"opt.state.0.exp_avg holds a non-finite value: .*c.pt "
                                           r"was not written"):
        add.save_checkpoint(bad, path)
    # the one on disk is intact
    assert torch.equal(add.load_checkpoint(path)["model"]["w"], torch.ones(2))
    # w turns NaN in epoch 2's first step: read at the epoch's last step, the run ends; epoch 1's
    # checkpoint stays
    real, calls = add.gradient_step, []

    # the 3rd step: epoch 2's first w step (epoch 1: 2 warm-up steps, w alone)
    def poisoned(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            model.net.stem[0].weight.data.fill_(float("nan"))
        return real(model, *args, **kwargs)
    monkeypatch.setattr(search, "gradient_step", poisoned)
    with pytest.raises(add.Diverged, match=r"non-finite loss at epoch 2, within steps 1-2; the "
                                           r"last checkpoint is intact"):
        search.main(TINY_SEARCH[:-1]
                    + ["0.5", "--epochs", "2", "--out", f"{tmp_path}/g.json", "--run-dir",
                       f"{tmp_path}/r"])
    state = torch.load(f"{tmp_path}/r/search.pt")
    assert (state["epoch"], state["step"]) == (1, 0)
    calls.clear()

    # w made NaN by epoch 1's last update (1 step: w, then alpha), its loss finite: one line,
    # before a genotype is derived
    def overflowed(model, *args, **kwargs):
        terms = real(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            model.net.stem[0].weight.data.fill_(float("nan"))
        return terms
    monkeypatch.setattr(search, "gradient_step", overflowed)
    with pytest.raises(add.Diverged, match="^non-finite weights after epoch 1's last update; the "
                                           "last checkpoint is intact: lower --w-lr$"):
        search.main(TINY_SEARCH + ["--epochs", "1", "--steps-per-epoch", "1", "--out",
                                   f"{tmp_path}/nan.json", "--run-dir", f"{tmp_path}/nan"])
    assert not os.path.exists(f"{tmp_path}/nan.json")
    # weights finite but so large that the scores overflow (lr 3e37): one line, not sklearn's
    # (weights made non-finite: the test across two processes)
    with pytest.raises(add.Diverged, match="the network's scores are not finite"):
        train.main(TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "1", "--lr", "3e37",
                                 "--out", f"{tmp_path}/overflow"])
    # a full disk, anywhere: one line
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^1$"):
        add.run_main(lambda: exec("raise OSError(28, 'No space left on device', 'x')"))
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device: 'x'\n"
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_expected_parameters_are_the_networks_when_one_hot_the_mean_when_uniform_and_the_term_cuts(
        tmp_path):
    costs, P = search.parameter_costs(), ops.PRIMITIVES.index
    alpha = torch.full((14, 11), -30.0)
    # every edge sep_conv_3x3: then every genotype the cells can make has one size
    alpha[:, P("sep_conv_3x3")] = 30.0
    cell = tuple(("sep_conv_3x3", i) for node in range(4) for i in (0, 1))
    network = add.count_parameters(add.ADD(ops.Genotype(cell, cell), 48, add.d2_layout(3, 4), 3))
    expected = search.expected_parameters(((alpha.softmax(-1), None),) * 2, costs)
    assert expected.item() == pytest.approx(network, rel=1e-6)
    # uniform alpha: the mean size over the space, counted by hand: per node two edges of a mean
    # operation,
    # plus, in a reduction cell, FactorizedReduce for skip_connect on the 2 x 2 / (i + 2) stride-2
    # edges a node expects
    size = lambda name, C, stride: add.count_parameters(ops.OPS[name](C, stride, True))
    nonzero = [p for p in ops.PRIMITIVES if p != "none"]
    empty = ops.Genotype(*[(("none", 0), ("none", 1)) * 4] * 2)
    by_hand, C = add.count_parameters(add.ADD(empty, 48, add.d2_layout(3, 4), 3)), 48
    for reduction in add.d2_layout(3, 4):
        C *= 2 if reduction else 1
        by_hand += 4 * 2 * np.mean([size(p, C, 1) for p in nonzero])
        if reduction:
            reduce = size("skip_connect", C, 2) - size("skip_connect", C, 1)
            by_hand += sum(2 * 2 / (i + 2) for i in range(4)) * reduce / 10
    uniform = ((torch.full((14, 11), 1 / 11), None),) * 2
    assert search.expected_parameters(uniform, costs).item() == pytest.approx(by_hand, rel=1e-6)
    ends = {}  # the parameter term moves alpha toward smaller networks, parameter-free operations
    free = [P("skip_connect"), P("avg_pool_3x3"), P("max_pool_3x3")]  # no parameters
    for weight in ("0", "20"):
        model = search.main(TINY_SEARCH + ["--epochs", "1", "--param-weight", weight, "--out",
                                           f"{tmp_path}/{weight}.json", "--run-dir",
                                           f"{tmp_path}/{weight}"])
        ends[weight] = (search.expected_parameters(model.cell_weights(), costs).item(),
                        model.alpha_normal.softmax(-1)[:, free].sum().item())
    assert ends["20"][0] < ends["0"][0] - 1e5 and ends["20"][1] > ends["0"][1]


def test_the_step_budget_draws_a_fresh_seeded_subset_each_epoch_and_paper_sets_what_its_help_names(
        monkeypatch):
    # 16 samples
    args = search.configure(search.parse_args(TINY_SEARCH
                                              + ["--videos", "8", "--steps-per-epoch", "3"]))
    (train_loader, val_loader), steps, one_pass = search.loaders(args, CPU)
    assert (steps, one_pass) == (3, 4) and len(train_loader) == len(val_loader) == 3
    orders = []
    for epoch in (0, 1, 0):
        train_loader.sampler.set_epoch(epoch)
        orders.append(list(train_loader.sampler))
    assert len(orders[0]) == 12 == len(set(orders[0]))
    assert orders[0] != orders[1]
    assert orders[0] == orders[2]
    train_loader.sampler.set_epoch(0, start=4)  # a resumed epoch: from its second batch on
    assert list(train_loader.sampler) == orders[0][4:] and len(train_loader) == 2
    # real data
    assert search.configure(search.parse_args(["--data", "ff++"])).steps_per_epoch * 300 == 60_000
    args.steps_per_epoch = 200  # the real-data budget on a small split: at most one pass an epoch
    assert search.loaders(args, CPU)[1:] == (4, 4)
    real, paper = (search.configure(search.parse_args(["--data", "ff++", *a]))
                   for a in ([], ["--paper"]))
    changed = {k for k in vars(real) if getattr(real, k) != getattr(paper, k)} - {"paper"}
    assert changed == set(search.DEPARTURES)
    # Sec. IV-B, as the paper states it: w's lr 0.1 at its batch of 8, alpha moving from the first
    # step by Adam (default betas), every channel of every edge, every face each epoch, no term
    assert {k: getattr(paper, k) for k in changed} == dict(
        w_lr=0.8, warmup=0.0, alpha_betas=[0.9, 0.999], partial_channels=1, steps_per_epoch=0,
        param_weight=0.0)
    assert 0.8 * (paper.batch_size / search.W_LR_BATCH) == 0.1
    assert (paper.batch_size, paper.epochs, paper.alpha_milestones) == (8, 300, [60, 150])
    help_text = io.StringIO()
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside a flag
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        search.parse_args(["--help"])
    said = re.search(r"--paper\s+the paper's own values: (.*?) \(README",
                     " ".join(help_text.getvalue().split())).group(1)
    assert sorted(re.findall(r"--([\w-]+)", said)) == sorted(k.replace("_", "-") for k in changed)
    # the demo's sizes, the paper's rule
    demo = search.configure(search.parse_args(["--paper", "--partial-channels", "4"]))
    assert (demo.image_size, demo.w_lr, demo.warmup, demo.partial_channels) == (64, 0.8, 0.0, 4)


@pytest.mark.parametrize("script, argv, expected", [
    ("search", ["--steps-per-epoch", "-1"], "argument --steps-per-epoch: expected a whole number "
                                            ">= 0, got '-1'"),
    ("search", ["--channels", "6", "--partial-channels", "4"], "--partial-channels 4: must divide "
                                                               "--channels 6"),
    ("search", ["--image-size", "8"], "--image-size 8: the stem (2 halvings) and the two reduction "
                                      "cells need at least 16 px"),
    ("train", ["--eval-only"], "--eval-only needs --checkpoint PATH"),
    ("masks", ["--data", "ff++", "--src", "x", "--frames", "0"], "argument --frames: expected a "
                                                                 "whole number >= 1, got '0'"),
])
def test_bad_flag_values_are_one_line_errors(script, argv, expected):
    with pytest.raises(ops.InputError) as e:
        {"search": lambda a: search.configure(search.parse_args(a)),
         "train": lambda a: train.configure(train.parse_args(["--genotype", "g.json"] + a)),
         "masks": masks.main}[script](argv)
    assert str(e.value).startswith(expected)


def test_the_hull_mask_is_the_polygon_and_a_real_photo_gives_one_face_and_a_mask_covering_it():
    corners = np.array([(100 + 80 * math.cos(2 * math.pi * k / 12), 100
                         + 80 * math.sin(2 * math.pi * k / 12)) for k in range(12)])
    # interior points do not change the hull
    inside = 100 + np.random.default_rng(0).uniform(-40, 40, (56, 2))
    mask = masks.hull_mask(np.concatenate([inside, corners]).astype(np.float32), 200)
    area = 6 * 80 ** 2 * math.sin(math.pi / 6)
    assert abs(mask.sum() - area) / area < 0.01
    assert set(np.unique(mask)) == {0, 1}  # a regular 12-gon's area
    image = astronaut()
    faces = masks.FaceFinder().faces(image)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    mask = masks.hull_mask(faces[0].landmarks, image.shape[0])  # a square photo
    assert mask[int(y0):int(y1), int(x0):int(x1)].mean() > 0.5
    assert mask.sum() < 2 * (x1 - x0) * (y1 - y0)  # the face
    crop, points = masks.crop_face(image, faces[0], size=128)
    assert crop.shape == (128, 128, 3) and 0.25 < masks.hull_mask(points, 128).mean() < 0.75


def write_video(path, frames, rotation=0, keyframes=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"g": str(keyframes)} if keyframes
                                      else {})
        stream.width = frames[0].shape[1]
        stream.height = frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def face_video(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("video") / "face.mp4")
    write_video(path, [np.roll(astronaut(), 2 * t, axis=1) for t in range(6)])
    return path


@pytest.fixture(scope="module")
def ffpp(tmp_path_factory, face_video):
    """FF++ as downloaded: 6 real videos, two methods, one corrupt and one faceless fake, splits;
    prepared by 2 workers."""
    src = tmp_path_factory.mktemp("ffpp")
    real = src / "original_sequences" / "youtube" / "c23" / "videos"
    for name in ("000", "001", "002", "003", "004", "005"):
        os.makedirs(real, exist_ok=True)
        shutil.copy(face_video, real / f"{name}.mp4")
    for method in ("Deepfakes", "FaceSwap"):
        fakes = src / "manipulated_sequences" / method / "c23" / "videos"
        os.makedirs(fakes)
        for name in ("000_001", "001_000", "002_003", "003_002", "004_005", "005_004"):
            shutil.copy(face_video, fakes / f"{name}.mp4")
    (src / "manipulated_sequences/Deepfakes/c23/videos/001_000.mp4").write_bytes(bytes(4000))
    with wave.open(f"{src}/manipulated_sequences/FaceSwap/c23/videos/005_004.mp4",
                   "wb") as audio_only:
        audio_only.setparams((1, 2, 8000, 0, "NONE", ""))  # a media file without a video stream
        audio_only.writeframes(bytes(1600))
    write_video(f"{src}/manipulated_sequences/FaceSwap/c23/videos/003_002.mp4",
                [np.full((256, 256, 3), 90, np.uint8)] * 4)
    os.remove(real / "003.mp4")  # 003 as a folder of extracted frames instead of an mp4
    os.makedirs(real / "003")
    for t in range(4):
        Image.fromarray(np.roll(astronaut(), t, axis=1)).save(real / "003" / f"{t:04d}.png")
    os.makedirs(src / "splits")
    for split, pairs in (("train", [["000", "001"]]), ("val", [["002", "003"]]),
                         ("test", [["004", "005"]])):
        (src / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    root = f"{src}/prepared"
    masks.main(["--data", "ff++", "--src", str(src), "--root", root, "--methods",
                "Deepfakes,FaceSwap",
                "--frames", "2", "--workers", "2"])
    return str(src), root


def manifest_counts(root):
    rows = csv.DictReader(open(f"{root}/manifest.csv"))
    return dict(collections.Counter((r["split"], int(r["label"])) for r in rows))


def test_ffpp_prepares_to_the_right_counts_a_restart_skips_finished_videos_frames_read_back(
        ffpp, capsys, monkeypatch):
    src, root = ffpp
    # train: reals 000, 001; fakes Deepfakes 000_001 (001_000 corrupt), FaceSwap 000_001, 001_000; 2
    # frames each
    # val: reals 002, 003 (003 a folder); fakes Deepfakes 002_003, 003_002, FaceSwap 002_003
    # (003_002 faceless)
    # test: reals 004, 005; fakes 004_005, 005_004 of both methods (FaceSwap 005_004 has no video
    # stream)
    counts = {("train", 0): 4, ("train", 1): 6, ("val", 0): 4, ("val", 1): 6, ("test", 0): 4,
              ("test", 1): 6}
    assert manifest_counts(root) == counts
    report = open(f"{root}/report.txt").read()
    assert "Deepfakes/001_000\tvideo\tunreadable video" in report
    assert "FaceSwap/003_002\tvideo\tno face in any of its 2 frames" in report
    assert "FaceSwap/003_002\tframe 1\tno face" in report
    assert "FaceSwap/005_004\tvideo\tfailed (ValueError: no video stream)" in report
    mask = np.asarray(Image.open(f"{root}/masks/original/000/0001.png"))
    assert mask.shape == (256, 256)
    assert set(np.unique(mask)) == {0, 255}
    assert 0.2 < (mask > 0).mean() < 0.8
    # killed after its frames, before its record
    os.remove(f"{root}/records/original/000.json")
    open(f"{root}/faces/original/000/0001.png.tmp999", "w").close()
    capsys.readouterr()
    masks.main(["--data", "ff++", "--src", src, "--root", root, "--methods", "Deepfakes,FaceSwap",
                "--frames", "2",
                "--workers", "1"])
    out = capsys.readouterr().out
    assert "16 already prepared, 2 to do (1 of them again)" in out
    assert "prepared 2 frames" in out  # + the corrupt one
    assert manifest_counts(root) == counts
    assert not os.path.exists(f"{root}/faces/original/000/0001.png.tmp999")
    _, root = ffpp
    train_set = add.FaceCrops(root, "train", ["Deepfakes", "FaceSwap"], train=True, image_size=64)
    assert len(train_set) == 4 * 2 + 6  # 4 real frames repeated round(6/4) = 2 times
    image, mask, label, video = train_set[0]
    assert image.shape == (3, 64, 64)
    assert mask.shape == (1, 64, 64)
    assert set(mask.unique().tolist()) <= {0, 1}
    assert image.dtype == mask.dtype == torch.uint8 and label in (0, 1) and "/" in video
    batch = torch.utils.data.default_collate([train_set[i] for i in range(8)])
    # uint8 through the loader, normalised on the device == the image read directly
    x, M, y = add.to_device(batch, CPU)
    for i in range(4):
        r = train_set.rows[i]
        face = Image.open(f"{root}/{r['image']}").convert("RGB")
        face = np.asarray(face.resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
        hull = Image.open(f"{root}/{r['mask']}").resize((64, 64), Image.NEAREST)
        assert torch.equal(x[i], torch.from_numpy(face).permute(2, 0, 1))
        assert torch.equal(M[i, 0], torch.from_numpy(np.asarray(hull) > 127).float())
    assert x.is_contiguous(memory_format=torch.channels_last) and y.tolist() == train_set.labels[:8]
    # the training augmentation: random flips
    fx, fM, _ = add.to_device(batch, CPU, add.epoch_generator(0, 3))
    mirrored = [torch.equal(fx[i], x[i].flip(-1)) and torch.equal(fM[i], M[i].flip(-1))
                for i in range(8)]
    assert 0 < sum(mirrored) < 8
    assert all(m or torch.equal(fx[i], x[i]) for i, m in enumerate(mirrored))
    # the same key: the same flips
    assert torch.equal(add.to_device(batch, CPU, add.epoch_generator(0, 3))[0], fx)
    with pytest.raises(ops.InputError, match="run masks.py first"):
        add.FaceCrops("/no/such/root", "train", ["Deepfakes"], True, 64)
    # pinned to one core of many: one loader worker
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert masks.usable_cpus() == 1
    assert add.loader_workers("ff++") == 1
    assert add.loader_workers("synthetic") == 0


@pytest.mark.parametrize("argv, expected", [
    (["--src", "/no/such/dir"], "/no/such/dir: not found; expected the FaceForensics++ download "
                                "root"),
    (["--methods", "Deepfake"], "--methods: unknown ff++ method 'Deepfake'"),
    (["--splits", "/tmp/no-splits"], "/tmp/no-splits/train.json: not found; expected "
                                     "FaceForensics++'s official split file"),
])
def test_bad_preparation_input_is_a_one_line_error(ffpp, argv, expected):
    src, root = ffpp
    flags = {"--src": src, "--methods": "Deepfakes", "--root": root,
             **dict(zip(argv[::2], argv[1::2]))}
    argv = ["--data", "ff++", *[v for kv in flags.items() for v in kv]]
    with pytest.raises(ops.InputError, match=re.escape(expected)):
        masks.main(argv)


def small_ffpp(tmp_path, face_video):
    """FF++ as downloaded, 4 real and 4 Deepfakes videos (copies of the face video), splits
    train/val."""
    src = tmp_path / "ffpp"
    real = src / "original_sequences/youtube/c23/videos"
    fake = src / "manipulated_sequences/Deepfakes/c23/videos"
    for folder, names in ((real, ("000", "001", "002", "003")),
                          (fake, ("000_001", "001_000", "002_003", "003_002"))):
        os.makedirs(folder, exist_ok=True)
        for name in names:
            shutil.copy(face_video, folder / f"{name}.mp4")
    os.makedirs(src / "splits")
    for split, pairs in (("train", [["000", "001"]]), ("val", [["002", "003"]]), ("test", [])):
        (src / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    return src, real, fake


def test_preparation_survives_any_error_and_odd_inputs_give_faces(tmp_path, face_video, capsys):
    src, real, fake = small_ffpp(tmp_path, face_video)
    root = f"{tmp_path}/prepared"
    # 001_000 is a folder of frames, one of which is a decompression bomb
    os.remove(fake / "001_000.mp4")
    os.makedirs(fake / "001_000")
    Image.fromarray(astronaut()).save(fake / "001_000" / "0.png")
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 20000 x 20000 px
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    open(fake / "001_000" / "1.png", "wb").write(b"\x89PNG\r\n\x1a\n" + png)
    # 002 missing for now (a download still running)
    os.rename(real / "002.mp4", f"{tmp_path}/002.mp4")
    argv = ["--data", "ff++", "--src", str(src), "--root", root, "--methods", "Deepfakes",
            "--frames", "2", "--workers", "1"]
    masks.main(argv)
    out = capsys.readouterr().out
    # recorded; the others went on
    assert "skipped Deepfakes/001_000: failed (DecompressionBombError" in out
    assert "skipped original/002: unreadable video (FileNotFoundError" in out
    assert "tried again on the next run" in out
    # the bomb's video keeps the frame read before it: train fakes 000_001 (2) + 001_000 (1)
    assert manifest_counts(root) == {("train", 0): 4, ("train", 1): 3, ("val", 0): 2, ("val", 1): 4}
    os.rename(f"{tmp_path}/002.mp4", real / "002.mp4")  # the download finished
    # a record without the settings (an older version's)
    record = json.load(open(f"{root}/records/original/003.json"))
    del record["settings"]
    json.dump(record, open(f"{root}/records/original/003.json", "w"))
    open(f"{root}/records/Deepfakes/002_003.json", "w").write('{"split": "val", "lab')  # cut short
    masks.main(argv)
    out = capsys.readouterr().out
    assert out.count(".json: not a readable record") == 2
    assert "5 already prepared, 3 to do (1 of them again)" in out
    assert manifest_counts(root)[("val", 0)] == 4
    # other --frames into the same root, as a process: one line
    code, _, err = run_cli("masks.py", *argv[:-3], "3")
    assert err.strip().splitlines() == [f"error: {root}: prepared with --frames 2 (now 3); prepare "
                                        "into another --root, or add --redo to prepare every "
                                        "video again"]
    record = f"{root}/records/original/003.json"  # a setting that is not a flag
    kept = open(record).read()
    open(record, "w").write(kept.replace('"size": 256', '"size": 224'))
    with pytest.raises(ops.InputError, match=r"prepared with size 224 \(now 256\);"):
        masks.main(argv)
    open(record, "w").write(kept)
    masks.main(argv[:-3] + ["3", "--workers", "1", "--redo"])
    assert manifest_counts(root)[("train", 0)] == 6
    assert "8 to do" in capsys.readouterr().out  # 3 of 6 frames each
    face = astronaut()[:, 56:456]  # (512, 400, 3): not square, so a turn shows in the shape
    gray = np.asarray(Image.fromarray(face).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(f"{tmp_path}/gray16.png")  # opens as mode I;16
    read = masks.load_rgb(f"{tmp_path}/gray16.png")[..., 0].astype(int)
    assert np.abs(read - gray // 257).max() <= 1
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.ascontiguousarray(np.rot90(face))).save(f"{tmp_path}/turned.jpg", exif=exif)
    # frames stored sideways, with a display rotation of 90 degrees
    path = f"{tmp_path}/phone.mp4"
    write_video(path, [np.ascontiguousarray(np.rot90(face, -1))] * 2, rotation=90)
    for source in (f"{tmp_path}/gray16.png", f"{tmp_path}/turned.jpg", path):
        found = list(masks.read_faces(source, 2, 128))
        assert found and all(crop is not None for _, crop, _, _ in found), source
        assert next(masks.iter_frames(source, 1))[1].shape[:2] == (512, 400), source
    folder = tmp_path / "frames"
    os.makedirs(folder)
    for t in (1, 2, 10):
        Image.new("RGB", (10 * t, 10)).save(folder / f"{t}.png")
    # 1, 10 (not 1, 2)
    assert [rgb.shape[1] for _, rgb, _, _ in masks.iter_frames(str(folder), 2)] == [10, 100]
    path = f"{tmp_path}/long.mp4"  # a keyframe every 8 frames
    write_video(path, [np.full((64, 64, 3), 6 * t, np.uint8) for t in range(40)], keyframes=8)
    through = list(masks._video_frames(path, 4, seek_gap=10**9))
    seeking = list(masks._video_frames(path, 4, seek_gap=2))
    assert [f[0] for f in through] == [f[0] for f in seeking] == [5, 15, 25, 35]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(through, seeking))
    assert [round(f[1].mean() / 6) for f in seeking] == [5, 15, 25, 35]  # the frames' own content


def test_preparation_never_spins_a_video_that_cannot_be_written_fails_alone_a_full_disk_ends_it(
        tmp_path, face_video, monkeypatch):
    src, _, _ = small_ffpp(tmp_path, face_video)
    argv = ["--data", "ff++", "--src", str(src), "--methods", "Deepfakes", "--frames", "2",
            "--workers", "2"]
    full = {("train", 0): 4, ("train", 1): 4, ("val", 0): 4, ("val", 1): 4}
    # a file where a video's folder of faces goes: that video fails alone, tried again later
    root = f"{tmp_path}/blocked"
    os.makedirs(f"{root}/faces/Deepfakes")
    open(f"{root}/faces/Deepfakes/000_001", "w").close()
    code, out, err = run_cli("masks.py", *argv, "--root", root, timeout=60)
    assert code == 0, err[-2000:]
    assert ("skipped Deepfakes/000_001: its files could not be written (FileExistsError" in out
            and "(tried again on the next run)" in out)
    os.remove(f"{root}/faces/Deepfakes/000_001")
    masks.main(argv[:-1] + ["1", "--root", root])  # the rerun, in this process
    assert manifest_counts(root) == full
    # a full disk while a worker writes a PNG of 001_000 (ENOSPC, injected in every process): one
    # line naming the disk and the video; the videos finished are kept, the rerun does the rest
    root = f"{tmp_path}/full"
    os.makedirs(f"{tmp_path}/site")
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import errno, os\nreal = os.replace\ndef replace(a, b):\n    if '001_000/' in b:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', a)\n    return real(a, b)\n"
        "os.replace = replace\n")
    code, _, err = run_cli("masks.py", *argv, "--root", root, timeout=60,
                           env=dict(os.environ, PYTHONPATH=f"{tmp_path}/site"))
    assert code == 1 and err.strip().splitlines() == [
        f"error: {root}: no space left on its disk (preparing Deepfakes/001_000); the videos "
        "finished are kept: free space and run again"], err[-2000:]
    kept = glob.glob(f"{root}/records/*/*.json")
    assert kept and not os.path.exists(f"{root}/records/Deepfakes/001_000.json")
    masks.main(argv[:-1] + ["1", "--root", root])
    assert manifest_counts(root) == full

    # no landmark model (an install without it): not a video's failure, the run ends at once
    def missing():
        raise ops.InputError("the 68-point landmark model is missing")
    monkeypatch.setattr(masks, "face_finder", missing)
    with pytest.raises(ops.InputError, match="landmark model is missing"):
        masks.main(argv[:-1] + ["1", "--root", f"{tmp_path}/no_model"])
    assert not glob.glob(f"{tmp_path}/no_model/records/*/*.json")


def test_a_worker_killed_by_a_signal_is_that_videos_failure_and_the_rest_goes_on(
        tmp_path, face_video):
    src, _, fake = small_ffpp(tmp_path, face_video)
    # a folder of 5000 x 5000 frames: ~2.3 s of CPU each (no face: full-size HOG)
    os.remove(fake / "001_000.mp4")
    os.makedirs(fake / "001_000")
    Image.new("RGB", (5000, 5000), (90, 90, 90)).save(fake / "001_000" / "0.png")
    for k in (1, 2):
        shutil.copy(fake / "001_000" / "0.png", fake / "001_000" / f"{k}.png")
    root = f"{tmp_path}/prepared"
    # SIGXCPU kills a process after 4 s of CPU
    cpu_limit = lambda: resource.setrlimit(resource.RLIMIT_CPU, (4, 120))
    p = subprocess.run([sys.executable, "masks.py", "--data", "ff++", "--src", str(src), "--root",
                        root, "--methods", "Deepfakes", "--frames", "3", "--workers", "2"],
                       capture_output=True, text=True, cwd=HERE, timeout=240, preexec_fn=cpu_limit)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped Deepfakes/001_000: failed (the process preparing it died" in p.stdout
    # 3 frames each
    assert manifest_counts(root) == {("train", 0): 6, ("train", 1): 3, ("val", 0): 6, ("val", 1): 6}
    report = open(f"{root}/report.txt").read()
    assert "Deepfakes/001_000\tvideo\tfailed (the process preparing it died" in report


def test_celebdf_split_follows_the_test_list_and_keeps_identities_apart(tmp_path, face_video):
    src = tmp_path / "celebdf"
    names = {"Celeb-real": ["id0_0000", "id1_0000", "id2_0000", "id3_0000"],
             "YouTube-real": ["00000", "00001"],
             "Celeb-synthesis": ["id0_id2_0000", "id1_id3_0000", "id0_id1_0000", "id2_id0_0001",
                                 "id3_id1_0001"]}
    for folder, files in names.items():
        os.makedirs(src / folder)
        for name in files:
            shutil.copy(face_video, src / folder / f"{name}.mp4")
    (src / "List_of_testing_videos.txt").write_text("1 YouTube-real/00001.mp4\n0 "
                                                    "Celeb-synthesis/id2_id0_0001.mp4\n")
    root = f"{src}/prepared"
    masks.main(["--data", "celeb-df", "--src", str(src), "--root", root, "--frames", "1",
                "--workers", "1"])
    split = {f"{v.method}/{v.name}": v.split for v in masks.celebdf_videos(str(src))}
    # swaps outside the test list: id0-id2, id1-id3 (twice), id0-id1; validation grows from id2,
    # then id0 (id0_id2)
    assert split == {"YouTube-real/00001": "test", "Celeb-synthesis/id2_id0_0001": "test",
                     "Celeb-real/id0_0000": "val", "Celeb-real/id2_0000": "val",
                     "Celeb-synthesis/id0_id2_0000": "val",
                     "YouTube-real/00000": "train", "Celeb-real/id1_0000": "train",
                     "Celeb-real/id3_0000": "train",
                     "Celeb-synthesis/id1_id3_0000": "train",
                     "Celeb-synthesis/id3_id1_0001": "train"}
    # id0_id1_0000 mixes both sides: left out of both
    assert manifest_counts(root) == {("test", 0): 1, ("test", 1): 1, ("val", 0): 2, ("val", 1): 1,
                                     ("train", 0): 3,
                                     ("train", 1): 2}


@pytest.mark.parametrize("family", masks.SYNTHETIC_METHODS)
def test_synthetic_fakes_differ_from_their_source_only_in_and_near_the_face(family):
    for video in range(3):
        s = masks.synthetic_frame(0, video, 0, 64, family)
        diff = np.abs(s["fake"] - s["real"]).max(-1)
        # visibly changed inside the manipulated region
        assert diff[s["weight"] > 0.5].mean() > 0.01
        near_face = binary_dilation(masks.hull_mask(s["fake_points"], 64), iterations=4)
        # untouched beyond 4 px (the feathering) of the face hull
        assert diff[~near_face].max() == 0


@pytest.mark.parametrize("preset, digest",
                         [("easy", "37e5a03ddda5d445"), ("hard", "dec8522aa3af3de5")])
def test_the_built_in_data_are_the_same_bits_and_the_data_seed_draws_others(preset, digest):
    # every experiment in README ran on these data: a change to the generator would void its numbers
    ds = add.SyntheticFaces("train", list(masks.SYNTHETIC_METHODS), 3, 2, 64, 0, preset)
    assert hashlib.sha256(ds.images.numpy().tobytes() + ds.masks.numpy().tobytes()
                          + bytes(ds.labels)).hexdigest()[:16] == digest
    args = train.configure(train.parse_args(["--genotype", "g.json", "--videos", "3", "--frames",
                                             "2", "--synthetic", preset,
                                             "--data-seed", "3"]))
    other = train.datasets(args)[0]
    assert other.images.shape == ds.images.shape and not torch.equal(other.images, ds.images)


def test_add_outputs_and_eq4_to_eq7_the_classifier_sees_f_times_m_the_loss_weighs_m_two_readings():
    torch.manual_seed(0)
    model, x = add.ADD(GENOTYPE, 8, add.d2_layout(2, 1), 2).eval(), torch.rand(3, 3, 32, 32)
    logits, m = model(x)
    assert logits.shape == (3, 2) and m.shape == (3, 1, 32, 32) and 0 <= m.min() and m.max() <= 1
    cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(logits, cl[0], atol=1e-5) and torch.allclose(m, cl[1], atol=1e-6)
    heads, f = add.Heads(16, 32, mask=True).eval(), torch.randn(3, 16, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on CUDA: the body in bf16, the heads not
        logits, m = heads(f, (32, 32))
        mixed = ops.MixedOp(4, 1)(torch.randn(2, 4, 8, 8), torch.full((11,), 1 / 11))
    # 's sum and the heads in fp32
    assert logits.dtype == m.dtype == mixed.dtype == torch.float32  # Eq. 2
    assert torch.equal(logits, heads(f.float(), (32, 32))[0])
    paper = train.build_model(dict(train.REAL_DATA, arch="add"), GENOTYPE)
    assert 4.5e6 < add.count_parameters(paper) < 6.5e6  # 5.6 M
    torch.manual_seed(0)
    heads = random_batchnorm(add.Heads(16, 32, mask=True)).eval()
    f = torch.randn(2, 16, 4, 4)
    other = torch.randn(2, 16, 4, 4)  # the last features of two batches of images
    with torch.no_grad():
        logits, m = heads(f, (32, 32))
        assert not torch.allclose(logits, heads(other, (32, 32))[0], atol=1e-3)
        assert m.shape == (2, 1, 32, 32)
        small = torch.sigmoid(heads.mask(f))  # m at f's resolution
        # FC(f * m)
        assert torch.allclose(logits, heads.fc(heads.conv(f * small).mean((2, 3))),
                              atol=1e-6)  # Eq. 6
        # m at the input's size
        assert torch.allclose(m, F.interpolate(small, size=(32, 32), mode="bilinear"), atol=1e-6)
        heads.mask.weight.zero_()
        heads.mask.bias.fill_(-1e4)  # m = 0 everywhere: the classifier sees f * 0
        # the logits ignore the image
        assert torch.equal(heads(f, (32, 32))[0], heads(other, (32, 32))[0])
        heads.mask.bias.fill_(1e4)  # m = 1: Eq. 4's FC(f)
        assert torch.allclose(heads(f, (32, 32))[0], heads.fc(heads.conv(f).mean((2, 3))),
                              atol=1e-6)
    logits, labels = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    m, M = torch.rand(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    ce = -torch.log_softmax(logits, -1)[torch.arange(4), labels].mean()
    assert torch.allclose(add.add_loss(*add.loss_terms(logits, m, labels, M), 10.0), ce
                          + 10 * ((M - m) ** 2).mean())  # Eq. 7
    assert add.loss_terms(logits, None, labels, M)[1] is None
    assert torch.allclose(add.add_loss(ce, None, 10.0), ce)
    args = train.configure(train.parse_args(["--genotype", "unused.json", "--mask-weight", "0"]))
    # with an unsupervised m, Eq. 7 with alpha = 0
    model = train.build_model(vars(args), GENOTYPE)  # Eq. 6
    logits, m = model(torch.rand(2, 3, 64, 64))
    y = torch.tensor([0, 1])
    loss = add.add_loss(*add.loss_terms(logits, m, y, torch.ones(2, 1, 64, 64)), args.mask_weight)
    # with alpha = 0: the cross-entropy alone
    assert torch.equal(loss, F.cross_entropy(logits, y))  # Eq. 7
    loss.backward()
    # m unsupervised, still trained through Eq. 6's f * m
    assert model.heads.mask.weight.grad.abs().sum() > 0
    # alone
    args = train.configure(train.parse_args(["--genotype", "unused.json",
                                             "--no-mask-branch"]))  # Eq. 4
    model = train.build_model(vars(args), GENOTYPE)
    assert args.mask_weight == 0
    assert model.heads.mask is None
    assert model(torch.rand(2, 3, 64, 64))[1] is None


@pytest.mark.parametrize("arch", ["add", "resnet18"])
def test_folded_batchnorm_gives_the_same_logits_with_no_batchnorm_left_after_a_conv(arch):
    torch.manual_seed(0)
    model = add.ADD(GENOTYPE, 8, add.d2_layout(2, 1), 2) if arch == "add" else add.Baseline(arch)
    x = torch.rand(3, 3, 32, 32)
    plain = random_batchnorm(model).eval()(x)
    folded = add.fold_batchnorm(model)
    left = [name for name, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # only FactorizedReduce's BatchNorm is left: it follows a concatenation, not a convolution
    if arch == "add":
        assert left and all(name.endswith(".bn") for name in left)
    # resnet18's conv1/bn1 and its blocks' bn1, bn2 are attributes: found by tracing
    assert left == [] or arch == "add"
    assert torch.allclose(folded(x)[0], plain[0], rtol=1e-4, atol=1e-4)
    if arch == "add":
        assert torch.allclose(folded(x)[1], plain[1], atol=1e-5)


def test_thirty_training_steps_lower_the_loss_and_acc_auc_ap_eer_match_independent_computations():
    torch.manual_seed(0)
    model = add.ADD(GENOTYPE, 8, add.d2_layout(3, 1), stem_reductions=2)
    args = train.configure(train.parse_args(["--genotype", "unused.json", "--lr", "2e-3"]))
    optimizer, _ = train.make_optimizer(model, args)
    batch = tiny_batch(8, 32)
    losses = [add.gradient_step(model, optimizer, batch, CPU, 1.0) for _ in range(30)]
    first, last = torch.stack(losses[:5]).mean(0), torch.stack(losses[-5:]).mean(0)
    assert last[2] < 0.6 * first[2]
    assert last[0] < 0.6 * first[0]  # Eq. 7, and its cross-entropy alone
    probs = np.array([0.9, 0.7, 0.2, 0.4, 0.6, 0.1, 0.55, 0.3])
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    pos, neg = probs[labels == 1], probs[labels == 0]
    # Mann-Whitney
    auc = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    got = train.scores(labels, probs)
    assert (got["acc"], got["auc"]) == pytest.approx((np.mean((probs > 0.5) == labels), auc))
    video_probs, video_labels = train.video_level(probs, labels,
                                                  ["b", "b", "a", "a", "c", "a", "d", "c"])
    assert video_probs == pytest.approx([(0.2 + 0.4 + 0.1) / 3, 0.8, (0.6 + 0.3) / 2, 0.55])
    assert video_labels.tolist() == [0, 1, 1, 0]
    assert train.scores(np.array([1, 1]), np.array([0.7, 0.2]))["auc"] is None  # one class: no AUC
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(0.25 * labels + rng.normal(0.4, 0.2, 200), 0, 1).round(2)  # ties included
    got = train.scores(labels, probs)
    ap = 0.0
    last_recall = 0.0  # AP by its definition: sum over thresholds of (recall step) x precision
    for t in np.unique(probs)[::-1]:
        tp, fp = (labels[probs >= t] == 1).sum(), (labels[probs >= t] == 0).sum()
        ap += (tp / labels.sum() - last_recall) * tp / (tp + fp)
        last_recall = tp / labels.sum()
    assert got["ap"] == pytest.approx(ap)
    assert ap == pytest.approx(sklearn.metrics.average_precision_score(labels, probs))
    # EER: FPR = FNR on the ROC, by root finding
    fpr, tpr, _ = sklearn.metrics.roc_curve(labels, probs)
    eer = scipy.optimize.brentq(lambda x: 1.0 - x - scipy.interpolate.interp1d(fpr, tpr)(x), 0.0,
                                1.0)
    assert got["eer"] == pytest.approx(eer, abs=1e-9) and 0.1 < eer < 0.5
    assert train.scores([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["eer"] == 0.0  # perfectly separated
    balanced = train.scores([0, 1, 1, 1, 1], [0.6, 0.7, 0.8, 0.9, 0.1])["bacc"]
    assert balanced == pytest.approx((0 + 3 / 4) / 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny trained runs: ADD on the swap family (tested on mouth and gan) and resnet18; all
    they print."""
    tmp, out = tmp_path_factory.mktemp("trained"), io.StringIO()
    ops.save_genotype(GENOTYPE, f"{tmp}/g.json")
    with contextlib.redirect_stdout(out):
        with counting_host_reads() as (reads, windows):
            metrics = train.main(ADD_RUN + ["--genotype", f"{tmp}/g.json", "--out",
                                            f"{tmp}/add"])
        base = train.main(TINY_TRAIN + ["--arch", "resnet18", "--epochs", "1", "--out",
                                        f"{tmp}/r18", "--synthetic", "hard"])
    return dict(add=f"{tmp}/add", add_metrics=metrics, r18=f"{tmp}/r18", r18_metrics=base,
                tmp=tmp, out=out.getvalue(), reads=reads, windows=windows)


# The trained ADD run: 2 epochs of 22 steps on the swap family, tested on mouth and gan
ADD_RUN = STEPS_22 + ["--epochs", "2", "--methods", "swap", "--test-methods", "mouth,gan"]


def test_no_step_between_two_checks_reads_from_the_device_or_waits_to_copy(searched, trained):
    # the search's epoch: w alone, then w and alpha (with the parameter term); the training's two
    assert searched["windows"] == [True] * 21 + [False]
    assert trained["windows"] == ([True] * 21 + [False]) * 2
    assert searched["reads"] == trained["reads"] == []
    mode = HostReads()  # what they would find: a check's one read
    mode.counting = True
    with mode:
        add.nonfinite({"w": torch.ones(2)})
    assert len(mode.found) == 1 and re.fullmatch(r"tolist at .*add\.py:\d+", mode.found[0])


def test_a_training_writes_its_reports_and_checkpoints_and_eval_only_takes_its_data(
        trained, ffpp, tmp_path, monkeypatch, capsys):
    metrics, base = trained["add_metrics"], trained["r18_metrics"]
    assert metrics["test"]["data"] == "synthetic:mouth,gan"
    assert metrics["val"]["data"] == "synthetic:swap"  # Table II
    assert base["parameters"] > 11e6 and base["mask_weight"] == 0.0
    # every run folder: metrics, per-frame predictions, pictures
    for run in (trained["add"], trained["r18"]):
        assert Image.open(f"{run}/masks.png").size[0] > 100
    log = [json.loads(line) for line in open(f'{trained["add"]}/log.jsonl')]
    assert [e["epoch"] for e in log] == [1, 2]
    assert all(e["train_mse"] > 0 and e["val_mse"] > 0 for e in log)
    assert all(e["train_mse"] is None and e["val_mse"] is None
               for e in map(json.loads, open(f'{trained["r18"]}/log.jsonl')))
    # it reproduces the metrics
    rows = list(csv.DictReader(open(f'{trained["add"]}/predictions.csv')))
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["p_fake"]) for r in rows])
    assert len(rows) == 20 and {r["method"] for r in rows} <= {"real", "mouth", "gan"}
    assert sklearn.metrics.roc_auc_score(labels, probs) == metrics["test"]["frame_auc"]
    assert np.mean((probs > 0.5) == labels) == metrics["test"]["frame_acc"]
    # its format, pinned
    last = torch.load(f'{trained["add"]}/last.pt')
    assert set(last) == {"model", "optimizer", "scheduler", "epoch", "rng", "config", "genotype",
                         "best_auc"}
    monkeypatch.chdir(tmp_path)
    best = f'{trained["r18"]}/best.pt'
    before = os.path.getmtime(best), sorted(os.listdir(trained["r18"]))
    p_fake = lambda run: [float(r["p_fake"])
                          for r in csv.DictReader(open(f"{run}/predictions.csv"))]
    train.main(["--eval-only", "--checkpoint", best])  # no data flags
    # the run's own data (the hard preset, 32 px, 6 videos of 1 frame: no defaults) and network: its
    # scores (folded)
    assert p_fake("runs/eval") == pytest.approx(p_fake(trained["r18"]), abs=1e-5)
    assert len(set(p_fake("runs/eval"))) == 6
    config = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("config: "))
    # what is used is what it prints
    assert all(f" {kv} " in config
               for kv in ("synthetic=hard", "image_size=32", "videos=6", "frames=1",
                          "arch=resnet18",
                                              "batch_size=8", "epochs=1"))
    train.main(["--eval-only", "--checkpoint", best, "--synthetic", "easy"])
    # a flag overrides the checkpoint's
    assert p_fake("runs/eval-2") != pytest.approx(p_fake(trained["r18"]), abs=1e-5)
    own = train.main(["--eval-only", "--checkpoint", f'{trained["add"]}/best.pt'])
    assert own["test"]["data"] == "synthetic:swap"
    assert os.path.exists("runs/eval-3/eval.json")  # its methods, not its test's
    # Table III: a detector trained on one dataset, tested on another's prepared folder
    other = train.main(["--eval-only", "--checkpoint", best, "--test-data", "ff++", "--test-root",
                        ffpp[1], "--test-methods", "Deepfakes"])
    assert other["test"]["data"] == "ff++:Deepfakes" and other["test"]["frames"] == 8
    # the training run untouched
    assert (os.path.getmtime(best), sorted(os.listdir(trained["r18"]))) == before


def signalled(real, when):
    """`real`, which sends this process SIGINT (Ctrl-C) at its `when`-th call."""
    calls = []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    return call


def test_a_checkpoint_of_the_previous_version_resumes_and_others_are_one_line_errors(
        trained, searched, tmp_path, monkeypatch):
    with pytest.raises(ops.InputError, match="search.pt: a search checkpoint .search.py's "
                       "search.pt., not a trained"):
        train.main(["--predict", searched["g"], "--checkpoint",
                    f'{searched["run"]}/search.pt'])
    # trained["add"]'s run stopped after epoch 1, its checkpoint as the previous version wrote it
    # (its options that are built in now, at the values built in): it resumes to the same end
    run = f"{tmp_path}/old"
    monkeypatch.setattr(train, "end_epoch", signalled(train.end_epoch, 1))
    with pytest.raises(add.Stopped, match="at the end of epoch 1"):
        train.main(ADD_RUN + ["--genotype", str(trained["tmp"] / "g.json"), "--out", run])
    monkeypatch.undo()
    path = f"{run}/last.pt"
    last = torch.load(path)
    old = dict(last["config"], blocks=3, momentum=0.9, weight_decay=5e-4, grad_clip=5.0,
               no_flips=False, sync_bn=False, compile=False, deterministic=False, threshold=0.5,
               detect_size=640, log_every=50, check_every=50, visualize=8, benchmark_against=None)
    torch.save(dict(last, config=old), path)
    assert train.main(["--resume", "--out", run])["test"] == trained["add_metrics"]["test"]
    assert log_lines(run) == log_lines(trained["add"])
    ends = [torch.load(f"{r}/last.pt") for r in (run, trained["add"])]
    assert equal(*[{k: v for k, v in end.items() if k != "config"} for end in ends])
    # an option built in here (or gone) at another value: one line that names it
    for change, why in ((dict(weight_decay=0.0), r"--weight-decay 0.0 \(built in here: 0.0005\)"),
                        (dict(threshold=0.3), r"--threshold 0.3 \(built in here: 0.5\)"),
                        (dict(compile=True), r"--compile True \(built in here: False\)")):
        torch.save(dict(last, config=dict(old, **change)), path)
        with pytest.raises(ops.InputError, match=r"last.pt: written by another version of this "
                           rf"script \(it ran with {why}\); start a new run"):
            train.main(["--resume", "--out", run])
    del old["cells_per_block"]
    torch.save(dict(last, config=old), path)
    with pytest.raises(ops.InputError, match="last.pt: written by another version of train.py .its "
                       "configuration has no --cells-per-block.; train it again"):
        train.main(["--eval-only", "--checkpoint", path])
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ops.InputError, match="corrupt.pt: not a readable checkpoint"):
        train.main(["--eval-only", "--checkpoint", f"{tmp_path}/corrupt.pt"])


def test_predict_scores_videos_and_photos_and_reports_the_rest(
        trained, face_video, tmp_path, capsys):
    photo, faceless, corrupt = (str(tmp_path / n) for n in ("astronaut.jpg", "grey.mp4", "bad.mp4"))
    Image.fromarray(astronaut()).save(photo)
    write_video(faceless, [np.full((128, 128, 3), 90, np.uint8)] * 3)
    open(corrupt, "wb").write(bytes(3000))
    folder = tmp_path / "frames"  # a folder of extracted frames
    os.makedirs(folder)
    for t in range(3):
        Image.fromarray(np.roll(astronaut(), 3 * t, axis=1)).save(folder / f"{t:04d}.png")
    out = f"{tmp_path}/predicted"
    report = train.main(["--predict", face_video, photo, faceless, corrupt, str(folder),
                         "--checkpoint", f'{trained["add"]}/best.pt', "--frames", "4",
                         "--out", out])
    lines = capsys.readouterr().out.splitlines()
    video = report[face_video]
    assert video["frames_scored"] == 4
    assert [f["frame"] for f in video["frames"]] == [0, 2, 3, 5]  # 4 of 6 frames
    assert video["p_fake"] == pytest.approx(np.mean([f["p_fake"] for f in video["frames"]]))
    assert video["verdict"] == ("fake" if video["p_fake"] > 0.5 else "real")
    assert report[photo]["frames_scored"] == 1
    assert [f["frame"] for f in report[str(folder)]["frames"]] == [0, 1, 2]  # all 3 of 3
    assert report[faceless]["reason"].startswith("no face found in 3 frame(s)")
    assert report[corrupt]["reason"].startswith("unreadable")
    assert f"{faceless}: no face found in 3 frame(s)" in lines and any(
        line.startswith(f"{face_video}: p(fake) ") and "(4 of 4 frames scored)" in line
        for line in lines)
    assert json.load(open(f"{out}/predictions.json"))[photo]["frames"][0]["frame"] == 0
    pictures = [name for name in os.listdir(out) if name.endswith(".png")]
    assert len(pictures) == 3
    assert all(Image.open(f"{out}/{p}").size[0] > 200 for p in pictures)
    baseline = train.main(["--predict", photo, "--checkpoint",
                           f'{trained["r18"]}/best.pt', "--out", out])
    assert 0 <= baseline[photo]["p_fake"] <= 1
    assert os.path.exists(out + "-2/predictions.json")  # no m: crops and scores
    with pytest.raises(ops.InputError, match="missing.mp4: no such file or folder .expected a "
                                             "video, a folder of frames"):
        train.main(["--predict", f"{tmp_path}/missing.mp4", "--checkpoint",
                    f'{trained["add"]}/best.pt'])


def test_xception_is_chollets_network():
    assert add.count_parameters(add.Xception(1000)) == 22_855_952  # Keras's count of Chollet's


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small",
                                  "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "mnasnet0_5",
                                  "resnet18", "vgg16", "xception"])
def test_the_hand_designed_networks_train_in_the_harness_of_add(arch):
    torch.manual_seed(0)
    args = train.configure(train.parse_args(["--arch", arch, "--lr", "1e-3"]))
    assert args.mask_weight == 0.0
    assert args.genotype_origin is None
    assert args.small_input  # Eq. 4 alone; 64 px: small
    model = train.build_model(vars(args), None)
    assert last_map(model) == 4
    assert arch == "vgg16" or last_map(add.Baseline(arch)) == 2  # 64 px: 4x4 as ADD, not 2x2
    # follows the size
    small = lambda *argv: train.configure(train.parse_args(["--arch", arch, *argv])).small_input
    assert not small("--image-size", "256")
    assert not small("--data", "ff++")
    assert small("--data", "ff++", "--image-size", "64")
    if arch in ("resnet18", "vgg16"):
        return
    # mnasnet's: 0.0003
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(getattr(m, "p", 0) for m in model.modules() if isinstance(m, torch.nn.Dropout)
                   or "Stochastic" in type(m).__name__)
    # initialised to its inputs, as ADD's
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert classifier.weight.abs().max() <= 1 / math.sqrt(classifier.in_features)
    assert classifier.out_features == 2
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, _ = train.make_optimizer(model, args)
    ce, mse, _ = add.gradient_step(model.train(), optimizer, tiny_batch(4, 32), CPU, 0.0).tolist()
    assert math.isfinite(ce)
    assert mse == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def last_map(net):
    """The size of the last convolution's, pool's or BatchNorm's output on a 64 px face: the map
    the classifier pools."""
    sizes = []
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.BatchNorm2d)):
            m.register_forward_hook(lambda m, inputs, out: sizes.append(min(out.shape[-2:])))
    return sizes[-1] if net.eval()(torch.rand(1, 3, 64, 64))[1] is None else None


def fake_run(folder, cfg, test, val, train_ce=0.3):
    """A finished train.py run folder as --compare reads it: config.json, metrics.json,
    log.jsonl."""
    os.makedirs(folder)
    genotype = None
    if cfg["arch"] == "add":
        genotype = train.genotype_dict(ops.load_genotype(cfg["genotype"]))
    json.dump(cfg, open(f"{folder}/config.json", "w"))
    metrics = dict(parameters=1000 * len(cfg["arch"]) + cfg["channels"], genotype=genotype,
                   val=dict(frame_auc=val), test=dict(frame_auc=test, video_auc=test))
    json.dump(metrics, open(f"{folder}/metrics.json", "w"))
    line = dict(epoch=1, train_ce=train_ce, train_images=64, train_seconds=2.0)
    open(f"{folder}/log.jsonl", "w").write(json.dumps(line) + "\n")


def test_compare_takes_the_architecture_as_the_unit(tmp_path, capsys):
    rng, runs, auc = np.random.default_rng(0), [], {}
    genotypes = {"s1": (GENOTYPE, "search"),
                 "s2": (ops.Genotype(GENOTYPE.reduce, GENOTYPE.normal), "search"),
                 **{f"r{k}": (ops.random_genotype(k), "random") for k in range(3)}}
    for name, (genotype, origin) in genotypes.items():
        ops.save_genotype(genotype, str(tmp_path / f"{name}.json"), origin)
    archs = [["--genotype", str(tmp_path / f"{n}.json")] for n in genotypes]
    archs += [["--arch", "mobilenet_v3_small"], ["--arch", "shufflenet_v2_x0_5"]]
    for a, arch in enumerate(archs):
        for seed in (0, 1, 2):
            seeds = ["--seed", str(seed), "--data-seed", str(seed)]
            cfg = vars(train.configure(train.parse_args(arch + seeds)))
            auc[a, seed] = round(float(rng.uniform(0.6, 0.95)), 4)
            runs.append(str(tmp_path / f"{a}-{seed}"))
            fake_run(runs[-1], cfg, auc[a, seed], auc[a, seed] - 0.01)
    # a run of the previous version (its configuration had options built in now): the same group
    cfg["momentum"] = 0.9
    # a fourth shufflenet run at chance
    fake_run(f"{tmp_path}/chance", dict(cfg, seed=3), 0.5, 0.5, train_ce=0.69)
    rows = train.main(["--compare", *runs, f"{tmp_path}/chance", "--out",
                       f"{tmp_path}/cmp"])
    out = capsys.readouterr().out
    means = [statistics.mean(auc[a, s] for s in range(3)) for a in range(len(archs))]
    assert sorted(r["frame_auc"] for r in rows) == pytest.approx(sorted(means)) and len(rows) == 7
    shuffle = next(r for r in rows if r["name"] == "shufflenet_v2_x0_5")
    assert (shuffle["n"], shuffle["at_chance"]) == (3, 1) and "1 at chance, left out" in out

    def welch(a, b):  # by hand: Welch's t interval
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
        d = statistics.mean(a) - statistics.mean(b)
        half = scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb)
        return d, d - half, d + half
    for other, b in (("random", means[2:5]), ("hand-designed", means[5:])):
        # n = architectures (2 searched, 3 random, 2 hand-designed), not runs
        d, low, high = welch(means[:2], b)
        assert (f"searched - {other}: {d:+.3f} [{low:+.3f}, {high:+.3f}] test frame AUC (Welch's "
                f"95% interval over architectures: 2 and {len(b)})") in out
    # the first searched cell against mobilenet_v3_small, seed by seed
    diffs = [auc[0, s] - auc[5, s] for s in range(3)]
    d = statistics.mean(diffs)
    half = scipy.stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert (f"  s1 C16 N1 - mobilenet_v3_small: {d:+.3f} [{d - half:+.3f}, {d + half:+.3f}] "
            "(paired by seed, 3 seeds)") in out
    assert Image.open(tmp_path / "cmp" / "pareto.png").size[0] > 500
    # an lr sweep of one network on two selection seeds: the pick by mean validation AUC; 1e-2's
    # first run at chance counts in the pick (mean 0.70), or 1e-2 would win by its other run
    sweep = []
    for lr, val in (("1e-3", (0.80, 0.84)), ("3e-3", (0.86, 0.85)), ("1e-2", (0.50, 0.90))):
        for seed, v in zip((100, 101), val):
            sweep.append(str(tmp_path / f"lr{lr}-{seed}"))
            argv = ["--arch", "mnasnet0_5", "--lr", lr, "--seed", str(seed)]
            fake_run(sweep[-1], vars(train.configure(train.parse_args(argv))), 0.9, v,
                     train_ce=0.69 if v == 0.5 else 0.3)
    train.main(["--compare", *sweep, "--out", f"{tmp_path}/cmp-lr"])
    out = capsys.readouterr().out
    assert ("lr pick, mnasnet0_5 -: 0.003 of 0.001, 0.003, 0.01 (mean validation frame AUC "
            "0.855)") in out
    assert "edge" not in out
    train.main(["--compare", *sweep[:4], "--out", f"{tmp_path}/cmp-lr2"])
    assert ("0.003 of 0.001, 0.003 (mean validation frame AUC 0.855); at the grid's edge: extend "
            "it") in capsys.readouterr().out
    with pytest.raises(ops.InputError, match="nothing: not a finished train.py run folder"):
        train.main(["--compare", f"{tmp_path}/nothing"])


def test_subnormals_flushed_steps_timed_batches_checked_and_no_run_overwritten(
        tmp_path, genotype_file, capsys, monkeypatch):
    # weights that decay towards zero (a run at chance, under weight decay) go subnormal, which x86
    # computes slowly
    subnormal = torch.finfo(torch.float32).tiny / 4
    try:
        for main, argv in ((search.main,
                            ["--random-genotype", "1", "--out", f"{tmp_path}/r.json"]),
                           (train.main, ["--compare", f"{tmp_path}/nothing"])):
            torch.set_flush_denormal(False)
            assert (torch.tensor([subnormal]) * 1).item() > 0
            with contextlib.suppress(ops.InputError):
                main(argv)
            assert (torch.tensor([subnormal]) * 1).item() == 0
    finally:
        torch.set_flush_denormal(False)
    args = train.configure(train.parse_args(["--genotype", genotype_file, "--benchmark",
                                             "--image-size", "32",
                                             "--channels", "4", "--batch-size", "4"]))
    result = train.benchmark(args, CPU, calls=2, rounds=2)
    search.benchmark(search.configure(search.parse_args(TINY_SEARCH + ["--benchmark"])), CPU,
                     calls=2)
    out = capsys.readouterr().out
    assert set(result) == {"add", "resnet18"}
    assert all(v["training"] > 0 and v["inference"] > 0 for v in result.values())
    assert "add / resnet18: training " in out
    assert re.search(r"search step .* ms, .* peak memory .* \d+ operator calls", out)
    with pytest.raises(ops.InputError,
                       match="--batch-size 64: the train split has only 12 samples"):
        train.main(TINY_TRAIN
                   + ["--genotype", genotype_file, "--batch-size", "64", "--out",
                      f"{tmp_path}/x"])
    monkeypatch.setenv("RANK", "0")  # under torchrun
    for main, flag in ((train.main, "--compare"), (search.main, "--benchmark")):
        with pytest.raises(ops.InputError,
                           match=f"^{flag} runs in one process: run it with python, not torchrun$"):
            main([flag, "x"] if flag == "--compare" else [flag])
    monkeypatch.undo()
    # on a GPU machine (CUDA's own calls replaced): cuda, as auto, the current GPU; cuda:1 GPU 1
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", calls.append, raising=False)
    devices = [add.init_distributed(name)[2] for name in ("auto", "cuda", "cuda:1")]
    assert devices == [torch.device("cuda")] * 2 + [torch.device("cuda", 1)] and calls == [1]
    monkeypatch.undo()
    with pytest.raises(ops.InputError, match=r"--batch-size 7: the global batch must divide by the "
                                             r"2 processes \(e.g. --batch-size 6\)"):
        add.split_batch(7, 2)
    out = f"{tmp_path}/run"
    first = train.main(TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "1", "--out", out])
    best = open(f"{out}/best.pt", "rb").read()
    capsys.readouterr()
    train.main(TINY_TRAIN
               + ["--genotype", genotype_file, "--epochs", "1", "--out", out, "--seed", "1"])
    assert capsys.readouterr().out.splitlines()[0] == f"run folder: {out}-2"
    assert open(f"{out}/best.pt", "rb").read() == best
    assert len(open(f"{out}/log.jsonl").readlines()) == 1
    assert json.load(open(f"{out}/metrics.json")) == first


def wait_for(p, path, reached, limit=120):
    """Until the checkpoint at path, written by process p, is `reached` (-> True) or p ends (->
    False), for at most `limit` seconds; loaded when it changed only (replaced atomically)."""
    seen, deadline = None, time.time() + limit
    while p.poll() is None and time.time() < deadline:
        stamp = None
        if os.path.exists(path):
            stat = os.stat(path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp not in (seen, None) and reached(torch.load(path)):
            return True
        seen = stamp
        time.sleep(0.02)
    return False


def in_own_group(*argv, env=None):
    """A script started as a scheduler starts a job: in a process group of its own, signalled as
    a whole."""
    return subprocess.Popen([sys.executable, *argv], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)


def stop_message(err, pattern):
    """The one line a stopped run ends with -> the numbers the pattern captures."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), err[-3000:]
    return [int(v) for v in re.fullmatch(pattern, lines[0]).groups()]


def finishes(*argv, cwd):
    """A script run to its end as a process that must then exit, the cyclic garbage collector off
    (what a library keeps until the exit stays: matplotlib keeps a frame of the loop, and its
    loaders with it)."""
    as_run = (f"import gc, runpy, sys; gc.disable(); sys.path.insert(0, {HERE!r}); "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", as_run, f"{HERE}/{argv[0]}", *argv[1:]],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (argv, p.stderr[-2000:])
    assert p.stdout.rstrip().splitlines()[-1].startswith("wrote"), (argv, p.stderr[-2000:])
    return p.stdout


def driver(tmp_path, patch, script):
    """A script run as a process after `patch` (Python; add, os and errno imported): how a test
    makes one rank fail as a disk or the numbers would."""
    path = tmp_path / f"patched_{script}"
    path.write_text(f"import errno, os, runpy, sys\nsys.path.insert(0, {HERE!r})\nimport add\n"
                    f"{patch}\nrunpy.run_path({os.path.join(HERE, script)!r}, "
                    "run_name='__main__')\n")
    return str(path)


def ffpp_flags(root):
    return ["--data", "ff++", "--root", root, "--methods", "Deepfakes,FaceSwap", "--image-size",
            "32", "--channels", "4", "--batch-size", "4", "--workers", "2"]


TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]


def ours(err):
    """The lines of a job's stderr that its ranks wrote (torchrun adds its own failure summary)."""
    assert 'search.py", line' not in err and 'train.py", line' not in err, err[-3000:]
    return [line for line in err.splitlines()
            if line.startswith(("stopped by", "error: ", "process 1: "))]


def each_rank(lines):
    """A 2-process job's lines -> its one line, once process 1 ended in it too."""
    line, = [line for line in lines if not line.startswith("process 1: ")]
    assert sorted(lines) == sorted([line, f"process 1: {line}"]), lines
    return line


def two_ranks(*argv, env=None):
    """A script as the 2 processes of one job, started without torchrun's agent, which would kill
    the others when one fails (as srun starts them) -> (their return code, their lines in rank
    order), once both ended by themselves within a minute."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, *argv], cwd=HERE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env or os.environ, RANK=rank, LOCAL_RANK=rank,
                                       WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       OMP_NUM_THREADS="1"))  # torchrun's default
             for rank in ("0", "1")]
    try:
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == procs[0].returncode, errs
    return procs[0].returncode, ours(errs[0]) + ours(errs[1])


def test_a_search_across_two_processes_agrees_stops_and_resumes_as_if_never_stopped(tmp_path, ffpp):
    # torchrun, 2 processes (gloo) on prepared FF++, each with 2 loader workers and half of each
    # global batch of 4; K = 4 (1-channel edges, AVX2 kernels); 2 steps an epoch, w alone in 3 of 6
    argv = ["search.py", *ffpp_flags(ffpp[1]), "--cells", "3", "--epochs", "3", "--steps-per-epoch",
            "2", "--warmup", "0.5", "--partial-channels", "4", "--device", "cpu"]
    whole, run = f"{tmp_path}/whole", f"{tmp_path}/run"
    # alpha and beta of each process at its end
    keep = driver(tmp_path, f"import atexit, torch\nreal, model = add.gradient_step, []\n"
                  "def step(net, *a, **k):\n    model[:] = [net]\n    return real(net, *a, **k)\n"
                  "add.gradient_step = step\natexit.register(lambda: torch.save(model[0]."
                  f"arch_parameters(), {str(tmp_path)!r} + '/arch' + os.environ['RANK']))",
                  "search.py")
    assert two_ranks(keep, *argv[1:], "--out", whole + ".json", "--run-dir", whole,
                     env=AVX2) == (0, [])
    ranks = [torch.load(tmp_path / f"arch{rank}") for rank in (0, 1)]
    assert len(ranks[0]) == 4 and all(torch.equal(a, b) for a, b in zip(*ranks))
    p = in_own_group(*TORCHRUN, *argv, "--out", run + ".json", "--run-dir", run, env=AVX2)
    assert wait_for(p, f"{run}/search.pt", lambda state: state["epoch"] >= 1)
    os.killpg(p.pid, signal.SIGTERM)  # the whole group: torchrun, both processes, their workers
    line = each_rank(ours(p.communicate(timeout=120)[1]))
    epoch, step = stop_message(line, r"stopped by SIGTERM at epoch (\d), step (\d); "
                               r"its checkpoint is written: python search.py --resume --run-dir "
                               + re.escape(run) + " continues there")
    state = torch.load(f"{run}/search.pt")
    assert (state["epoch"], state["step"]) == (epoch - 1, step)  # at the step the stop came
    # the checkpoint's options (its global batch of 4 among them), split across 2 processes again
    code, out, err = run_cli(*TORCHRUN, "search.py", "--resume", "--run-dir", run, env=AVX2)
    assert code == 0 and "resumed" in out, err[-2000:]
    assert open(run + ".json").read() == open(whole + ".json").read()  # the same genotype
    end, ref = (torch.load(f"{r}/search.pt") for r in (run, whole))
    assert all(torch.equal(end["model"][k], ref["model"][k]) for k in ref["model"]
               if k.startswith(("alpha", "beta")))
    logs = [[json.loads(line) for line in open(f"{r}/log.jsonl")] for r in (whole, run)]
    for line in logs[0] + logs[1]:
        del line["seconds"]
    assert logs[0] == logs[1]  # no line lost or repeated: the means over both processes
    assert [line["alpha_steps"] for line in logs[0]] == [0, 1, 2]
    # a NaN in rank 1's loss at its 3rd call (step 2's w step: 2 steps an epoch): both end, one line
    nan = driver(tmp_path, "real, calls = add.loss_terms, []\ndef terms(*a):\n"
                 "    ce, mse = real(*a)\n    calls.append(1)\n"
                 "    bad = os.environ['RANK'] == '1' and len(calls) == 3\n"
                 "    return ce * float('nan') if bad else ce, mse\nadd.loss_terms = terms",
                 "search.py")
    code, lines = two_ranks(nan, *TINY_SEARCH, "--epochs", "2", "--device", "cpu", "--run-dir",
                            f"{tmp_path}/nan", "--out", f"{tmp_path}/nan.json")
    assert code != 0 and each_rank(lines) == (
        "error: non-finite loss at epoch 1, within steps 1-2; the last checkpoint is intact: "
        "lower --w-lr")


def test_a_stop_in_the_last_epoch_or_the_final_test_ends_in_one_line_and_resume_runs_the_test(
        tmp_path, genotype_file, face_video, monkeypatch):
    argv = TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "2"]
    whole = train.main(argv + ["--out", f"{tmp_path}/whole"])
    for name, when, where in (("end_epoch", 2, "at the end of epoch 2"),
                              ("report", 1, "during the final test")):
        out = str(tmp_path / name)
        monkeypatch.setattr(train, name, signalled(getattr(train, name), when))
        with pytest.raises(add.Stopped) as stop:
            train.main(argv + ["--out", out])
        assert str(stop.value) == (f"stopped by SIGINT {where}; the last checkpoint, "
                                   f"{out}/last.pt, holds epoch 2: python train.py --resume --out "
                                   f"{out} runs the test")
        assert not os.path.exists(f"{out}/metrics.json")
        monkeypatch.undo()
        with pytest.raises(ops.InputError, match=r"last\.pt: its optimizer and schedule hold --lr "
                           r"0\.001, and a resumed run keeps"):
            train.main(["--resume", "--out", out, "--lr", "1e-4"])
        with pytest.raises(ops.InputError, match=r"last\.pt: the checkpoint's model does not match "
                           "this configuration"):  # given now, a 0 wins too
            train.main(["--resume", "--out", out, "--stem-reductions", "0"])
        assert train.main(["--resume", "--out", out])["test"] == whole["test"]
    best = f"{tmp_path}/whole/best.pt"
    monkeypatch.setattr(train, "report", signalled(train.report, 1))
    with pytest.raises(add.Stopped, match="^stopped by SIGINT during the evaluation; nothing is "
                       "lost: run it again$"):
        train.main(["--eval-only", "--checkpoint", best, "--out", f"{tmp_path}/eval"])
    monkeypatch.setattr(train, "score_input", signalled(train.score_input, 2))
    with pytest.raises(add.Stopped, match="^stopped by SIGINT: the inputs above were scored, "
                       "predictions.json was not written$"):
        train.main(["--predict", face_video, face_video, "--checkpoint", best, "--frames", "1",
                    "--out", f"{tmp_path}/predicted"])
    assert not os.path.exists(f"{tmp_path}/predicted/predictions.json")
    # the handlers are put back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_training_across_two_processes_stops_survives_a_kill_evaluates_as_one_ends_on_failures(
        tmp_path, ffpp, genotype_file):
    # torchrun, 2 processes (gloo) on prepared FF++, each with 2 loader workers and half of each
    # global batch of 4: 3 steps an epoch
    out = f"{tmp_path}/ddp"
    argv = ["train.py", "--genotype", genotype_file, *ffpp_flags(ffpp[1]), "--cells-per-block",
            "1", "--stem-reductions", "2", "--epochs", "3", "--device", "cpu", "--out", out]
    last = f"{out}/last.pt"
    # torchrun's group signalled once epoch 1 is saved: every rank stops after the same step (the
    # vote), in one line; then a kill -9 of the resumed run once epoch 2 is saved
    held = 0
    resume = ["train.py", "--resume", "--out", out]
    for sig, run in ((signal.SIGTERM, argv), (signal.SIGKILL, resume)):
        p = in_own_group(*TORCHRUN, *run)
        assert wait_for(p, last, lambda state: state["epoch"] > held)
        os.killpg(p.pid, sig)
        err = p.communicate(timeout=120)[1]
        if sig == signal.SIGTERM:
            held, = stop_message(each_rank(ours(err)), r"stopped by SIGTERM (?:in epoch \d, after "
                                 r"step \d of 3|at the end of epoch \d); the last checkpoint, "
                                 rf"{re.escape(last)}, holds epoch (\d): python train.py --resume "
                                 rf"--out {re.escape(out)} trains epochs \d-3 and runs the test")
            assert held == torch.load(last)["epoch"] >= 1
    # two processes again, to the end, with the checkpoint's options (its global batch among them)
    code, stdout, err = run_cli(*TORCHRUN, "train.py", "--resume", "--out", out)
    assert code == 0, err[-2000:]
    assert "2 process(es) on cpu" in stdout and stdout.count("run folder") == 1  # rank 0 prints
    assert [json.loads(line)["epoch"] for line in open(f"{out}/log.jsonl")] == [1, 2, 3]
    assert json.load(open(f"{out}/metrics.json"))["test"]["frames"] == 10
    # its evaluation by 2 processes: one run folder, the scores and metrics of one process
    best = f"{out}/best.pt"
    assert two_ranks("train.py", "--eval-only", "--checkpoint", best, "--out",
                     f"{tmp_path}/two") == (0, [])
    assert not os.path.exists(f"{tmp_path}/two-2")
    one = train.main(["--eval-only", "--checkpoint", best, "--out", f"{tmp_path}/one"])
    two = json.load(open(f"{tmp_path}/two/eval.json"))
    assert two.keys() == one.keys() and two["test"].keys() == one["test"].keys()
    for key, value in one["test"].items():  # frames, videos, data; the scores
        assert two["test"][key] == (value if key in ("frames", "videos", "data")
                                    else pytest.approx(value, abs=1e-6)), key
    rows = [list(csv.reader(open(tmp_path / run / "predictions.csv"))) for run in ("one", "two")]
    assert len(rows[0]) == 11 and [r[:4] for r in rows[0]] == [r[:4] for r in rows[1]]
    assert all(abs(float(a[4]) - float(b[4])) <= 1e-6 for a, b in zip(rows[0][1:], rows[1][1:]))
    # an end of epoch 1 (one step an epoch) made to fail: rank 0's weights made non-finite by its
    # last update (before the validation could read them), or its optimizer's state, so that its
    # checkpoint is refused; or a frame of rank 1's part of the validation unreadable. Every
    # process ends by itself in its line; and in one process
    step = ("import torch\nreal = torch.optim.Adam.step\ndef step(self, *a, **k):\n"
            "    out = real(self, *a, **k)\n    first = self.param_groups[0]['params'][0]\n"
            "    if os.environ.get('RANK', '0') == '0':\n        {}.fill_(float('inf'))\n"
            "    return out\ntorch.optim.Adam.step = step")
    unreadable = ("import torch\nreal = add.to_device\ndef to_device(*a):\n"
                  "    if os.environ['RANK'] == '1' and not torch.is_grad_enabled():\n"
                  "        raise OSError(errno.EIO, 'Input/output error', 'x.png')\n"
                  "    return real(*a)\nadd.to_device = to_device")
    weights = ("non-finite weights after epoch 1's last update; the last good checkpoint is "
               "intact: lower --lr, or --resume from it")
    state = (f"optimizer.state.0.exp_avg holds a non-finite value: {tmp_path}/state/best.pt was "
             "not written (the one on disk is intact)")
    io_error = "[Errno 5] Input/output error: 'x.png'"
    for name, patch, first, other in (
            ("weights", step.format("first.data"), weights, weights),
            ("state", step.format("self.state[first]['exp_avg']"), state, f"{state} (process 0)"),
            ("scores", unreadable, f"{io_error} (process 1)", io_error)):
        code, lines = two_ranks(driver(tmp_path, patch, "train.py"), *TINY_TRAIN, "--genotype",
                                genotype_file, "--device", "cpu", "--out", f"{tmp_path}/{name}")
        assert code != 0 and lines == [f"error: {first}", f"process 1: error: {other}"]
    code, _, err = run_cli(driver(tmp_path, step.format("first.data"), "train.py"), *TINY_TRAIN,
                           "--genotype", genotype_file, "--out", f"{tmp_path}/one")
    assert code == 1 and ours(err) == [f"error: {weights}"]


def test_readme_maps_the_paper_to_functions_that_hold_their_tags_and_its_demo_runs(
        tmp_path, monkeypatch):
    lines = open(f"{HERE}/README.md").read().splitlines()
    start = lines.index("## The paper in the code")
    assert start < 80  # a guide: the map early
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    modules, found = dict(ops=ops, add=add, search=search, train=train, masks=masks), set()
    for row in (line for line in lines[start:end] if line.startswith("| ") and ".py:" in line):
        paper, code, tag = (cell.strip() for cell in row.strip("|").split("|"))
        tag = tag.strip("`")
        for module, name in re.findall(r"`(\w+)\.py:([\w.]+)`", code):
            obj = modules[module]
            for part in name.split("."):
                obj = getattr(obj, part)  # the function, class or table exists
            if callable(obj):
                source = inspect.getsource(obj)
            else:  # a table of data: its definition and the comment lines above it
                text = inspect.getsource(modules[module]).splitlines()
                at = next(i for i, line in enumerate(text) if line.startswith(f"{name} = "))
                source = "\n".join(text[at - 3:at + 1])
            assert tag in source, f"README: {module}.py:{name} has no {tag!r} ({paper})"
            if tag.startswith("# Eq."):  # on a line that computes, not in a comment of its own
                assert any(line.split("#")[0].strip() for line in source.splitlines()
                           if tag in line), (name, tag)
            found.add(tag)
    tags = {f"# Eq. {k}" for k in range(1, 8)} | {"# Algorithm 1", "# Fig. 2", "# Sec. III-C"}
    assert tags <= found
    finishes("search.py", *TINY_SEARCH, "--epochs", "1", cwd=tmp_path)
    assert ops.load_genotype(f"{tmp_path}/g.json") and os.path.exists(f"{tmp_path}/g.png")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--genotype", "g.json", *TINY_TRAIN, "--epochs",
                       "1"])["test"]["frame_auc"] is not None
    assert os.path.exists(f"{tmp_path}/runs/train/metrics.json")
    # the effective config, saved
    assert json.load(open(f"{tmp_path}/runs/search/config.json"))["image_size"] == 32
