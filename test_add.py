"""Smoke and property tests for ADD on tiny synthetic data, tiny video trees and a real face photo.

    python -m pytest -q            # the whole suite (about 4.5 minutes on 2 CPU cores)
"""
import contextlib
import csv
import glob
import inspect
import json
import math
import os
import re
import resource
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
TINY_SEARCH = ["--videos", "4", "--frames", "1", "--image-size", "32", "--channels", "4", "--cells", "3",
               "--batch-size", "4", "--warmup-epochs", "0"]
TINY_TRAIN = ["--videos", "6", "--frames", "1", "--image-size", "32", "--channels", "4", "--batch-size", "8",
              "--log-every", "0", "--visualize", "2"]


def run_cli(*args, cwd=HERE, env=None):
    """A script as a user runs it: -> (return code, stdout, stderr)."""
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=240, env=env)
    return p.returncode, p.stdout, p.stderr


def one_line_error(stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def genotype_file(tmp_path):
    path = str(tmp_path / "g.json")
    ops.save_genotype(GENOTYPE, path)
    return path


# ----------------------------------------------------------------------------------------------
# ops.py: the search space, Eq. 1-2, the genotype

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", ops.PRIMITIVES)
def test_every_op_keeps_shape_or_halves_it(name, stride):
    x = torch.randn(2, 6, 8, 8)
    assert ops.OPS[name](6, stride, True)(x).shape == (2, 6, 8 // stride, 8 // stride)
    assert ops.OPS[name](6, stride, False)(torch.randn(2, 6, 7, 9)).shape == (2, 6, 7 // stride + stride - 1, 9 // stride + stride - 1)


def test_search_space_is_the_papers_eleven_operations():
    # Sec. III-B's list, in its order: zero, identity, 3x3 avg / max pooling, 3x3 / 5x5 / 7x7 convolution,
    # 3x3 / 5x5 separable, 3x3 / 5x5 dilated separable
    assert ops.PRIMITIVES == ["none", "skip_connect", "avg_pool_3x3", "max_pool_3x3", "conv_3x3", "conv_5x5", "conv_7x7",
                              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    convs = lambda name: [(m.kernel_size[0], m.dilation[0], m.groups > 1) for m in ops.OPS[name](6, 1, True).modules()
                          if isinstance(m, torch.nn.Conv2d)]
    assert isinstance(ops.OPS["none"](6, 1, True), ops.Zero) and isinstance(ops.OPS["skip_connect"](6, 1, True), torch.nn.Identity)
    assert isinstance(ops.OPS["avg_pool_3x3"](6, 1, True), torch.nn.AvgPool2d)
    assert isinstance(ops.OPS["max_pool_3x3"](6, 1, True), torch.nn.MaxPool2d)
    for k in (3, 5, 7):
        assert convs(f"conv_{k}x{k}") == [(k, 1, False)]  # one dense k x k convolution
    for k in (3, 5):
        assert convs(f"sep_conv_{k}x{k}") == [(k, 1, True), (1, 1, False)] * 2  # depthwise + pointwise, twice
        assert convs(f"dil_conv_{k}x{k}") == [(k, 2, True), (1, 1, False)]  # dilated depthwise + pointwise


def full_op(mixed, i, C, stride):
    """Operation i as OPS builds it (with its own leading ReLU), holding the mixed op's weights."""
    full = ops.MixedOp._op(ops.PRIMITIVES[i], C, stride).eval()
    stored = mixed.ops[i - 1].state_dict().values()  # the zero operation (i = 0) is not built
    full.load_state_dict(dict(zip(full.state_dict().keys(), stored)))
    return full


def test_mixed_op_one_hot_is_that_op_and_zero_is_zero():
    torch.manual_seed(0)
    mixed = ops.MixedOp(4, 2).eval()  # eval: BN uses running statistics, so every call is the same function
    x = torch.randn(2, 4, 8, 8)
    for i, name in enumerate(ops.PRIMITIVES):
        out = mixed(x, F.one_hot(torch.tensor(i), len(ops.PRIMITIVES)).float())
        if name == "none":
            assert out.shape == (2, 4, 4, 4) and (out == 0).all()
            continue
        assert torch.equal(out, full_op(mixed, i, 4, 2)(x))
    assert not any(isinstance(op, ops.Zero) for op in mixed.ops)  # the zero op costs nothing


def test_mixed_op_is_the_softmax_weighted_sum_of_eq2():
    torch.manual_seed(0)
    mixed = ops.MixedOp(4, 1).eval()
    x, alpha = torch.randn(2, 4, 6, 6), torch.randn(len(ops.PRIMITIVES))
    w = torch.exp(alpha) / torch.exp(alpha).sum()
    by_hand = torch.zeros(2, 4, 6, 6)
    for i in range(1, len(ops.PRIMITIVES)):
        by_hand += w[i] * full_op(mixed, i, 4, 1)(x)
    assert torch.allclose(mixed(x, alpha.softmax(0)), by_hand, atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channels_route_a_kth_of_the_channels_through_eq2_and_shuffle_the_rest(stride):
    torch.manual_seed(0)
    K, C = 4, 8
    mixed = ops.MixedOp(C, stride, partial=K).eval()
    assert all(m.in_channels == C // K for m in mixed.modules() if isinstance(m, torch.nn.Conv2d))
    x, w = torch.randn(2, C, 8, 8), torch.softmax(torch.randn(len(ops.PRIMITIVES)), 0)
    out = mixed(x, w)
    assert out.shape == (2, C, 8 // stride, 8 // stride)
    eq2 = sum(w[i] * full_op(mixed, i, C // K, stride)(x[:, :C // K]) for i in range(1, 11))  # by hand, on C/K channels
    rest = x[:, C // K:] if stride == 1 else F.max_pool2d(x[:, C // K:], 2)
    unshuffled = torch.empty_like(out)
    for g in range(K):  # the shuffle puts channel g * C/K + i at i * K + g
        for i in range(C // K):
            unshuffled[:, g * (C // K) + i] = out[:, i * K + g]
    assert torch.allclose(unshuffled[:, :C // K], eq2, atol=1e-6) and torch.equal(unshuffled[:, C // K:], rest)
    cl = x.contiguous(memory_format=torch.channels_last)  # the search network's format stays (no silent NCHW)
    assert ops.channel_shuffle(cl, K).is_contiguous(memory_format=torch.channels_last)


def darts_cell_by_hand(cell, s0, s1, weights):
    """A search cell computed as DARTS writes it, from operations built anew by OPS (each holding the
    weights of the cell's): node i = sum over its edges of sum(w * op(h) for w, op in OP_df)."""
    states = [cell.pre0(s0), cell.pre1(s1)]
    for node in range(4):
        total = 0
        for k, (n, inp) in enumerate(cell.edges):
            if n == node:
                stride = 2 if cell.reduction and inp < 2 else 1
                total = total + sum(weights[k, i] * (full_op(cell.ops[k], i, states[inp].shape[1], stride)(states[inp])
                                                     if name != "none" else 0) for i, name in enumerate(ops.PRIMITIVES))
        states.append(total)
    return torch.cat(states[2:], dim=1)


@pytest.mark.parametrize("reduction", [False, True])
def test_one_partial_channel_group_is_the_papers_darts_cell_in_values(reduction):
    torch.manual_seed(0)
    cell = ops.Cell(ops.search_edges(), 6, 6, 4, reduction=reduction, reduction_prev=False, affine=False).eval()
    assert all(not hasattr(m, "bypass") for m in cell.modules())  # K = 1: no partial-channel machinery
    s0, s1, weights = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8), torch.softmax(torch.randn(14, 11), -1)
    assert torch.allclose(cell(s0, s1, (weights, None)), darts_cell_by_hand(cell, s0, s1, weights), atol=1e-5)


def test_beta_sums_to_one_per_node_and_the_cell_is_derived_from_alpha_times_beta():
    beta = ops.node_softmax(torch.randn(14))
    assert [round(float(beta[list(search.node_edges(n))].sum()), 6) for n in range(4)] == [1.0] * 4
    pc = search.SearchNetwork(4, 3, 2, True, partial=2)
    P = ops.PRIMITIVES.index
    with torch.no_grad():  # node 1 (edges 2, 3, 4 from inputs 0, 1, node 0): alpha prefers edges 2 and 3 ...
        pc.alpha_normal.zero_()
        pc.alpha_normal[2, P("sep_conv_3x3")], pc.alpha_normal[3, P("dil_conv_3x3")] = 3.0, 3.2
        pc.alpha_normal[4, P("max_pool_3x3")] = 2.5
        pc.beta_normal.zero_()
        pc.beta_normal[4] = 2.0  # ... but beta makes edge 4 (node 0 -> node 1) the strongest with it
    by_alpha = search.derive_cell(pc.alpha_normal.softmax(-1))
    assert by_alpha[2:4] == (("sep_conv_3x3", 0), ("dil_conv_3x3", 1))
    # alpha x beta by hand, the strongest op of each edge: edge 2: e^3 / (e^3 + 10) = 0.667, times beta's
    # 1 / (2 + e^2) = 0.107: 0.071; edge 3: 0.710 x 0.107 = 0.076; edge 4: 0.549 x e^2 / (2 + e^2) = 0.432
    assert pc.genotype().normal[2:4] == (("dil_conv_3x3", 1), ("max_pool_3x3", 2))


def copy_convs(source, target):
    """The convolution weights of `source` into `target`'s convolutions, in order."""
    convs = lambda m: [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    assert len(convs(source)) == len(convs(target))
    for a, b in zip(convs(source), convs(target)):
        b.weight.data.copy_(a.weight)


@pytest.mark.parametrize("reduction", [False, True])
def test_search_and_derived_cells_share_one_wiring(reduction):
    # the search cell with alpha one-hot on the genotype's (operation, input) pairs, its other edges at zero,
    # computes the derived cell holding the same weights (eval: every BatchNorm on its initial statistics)
    torch.manual_seed(0)
    cell = GENOTYPE.reduce if reduction else GENOTYPE.normal
    search_cell = ops.Cell(ops.search_edges(), 8, 8, 4, reduction, reduction_prev=True, affine=False).eval()
    derived = ops.Cell(ops.genotype_edges(cell), 8, 8, 4, reduction, reduction_prev=True, affine=True).eval()
    weights = torch.zeros(14, len(ops.PRIMITIVES))
    for j, (op, inp) in enumerate(cell):
        k, o = ops.search_edges().index((j // 2, inp, None)), ops.PRIMITIVES.index(op)
        weights[k, o] = 1.0
        copy_convs(search_cell.ops[k].ops[o - 1], derived.ops[j])  # the mixed op builds all but zero
    copy_convs(search_cell.pre0, derived.pre0)
    copy_convs(search_cell.pre1, derived.pre1)
    s0, s1 = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)  # after a reduction cell: s0 twice s1's size
    out = derived(s0, s1)
    assert out.shape == (2, 16, 4 if reduction else 8, 4 if reduction else 8)
    assert torch.allclose(search_cell(s0, s1, (weights, None)), out, rtol=1e-4, atol=1e-5)  # pooling's BN: 1/sqrt(1 + eps)


def test_derivation_follows_the_darts_rule_on_a_hand_worked_alpha():
    P = ops.PRIMITIVES.index
    w = torch.full((14, 11), 0.01)
    w[0, P("none")], w[0, P("sep_conv_3x3")] = 0.9, 0.05  # node 0: 'none' never wins; sep_conv_3x3 does
    w[1, P("conv_7x7")] = 0.3
    w[2, P("skip_connect")], w[3, P("max_pool_3x3")], w[4, P("dil_conv_3x3")] = 0.2, 0.6, 0.4  # node 1
    w[5, P("conv_3x3")], w[6, P("none")], w[7, P("dil_conv_5x5")], w[8, P("avg_pool_3x3")] = 0.3, 0.9, 0.5, 0.4
    w[9, P("sep_conv_5x5")], w[13, P("conv_5x5")] = 0.7, 0.2  # node 3: edges from input 0 and node 2
    assert search.derive_cell(w) == (
        ("sep_conv_3x3", 0), ("conv_7x7", 1),
        ("max_pool_3x3", 1), ("dil_conv_3x3", 2),
        ("dil_conv_5x5", 2), ("avg_pool_3x3", 3),
        ("sep_conv_5x5", 0), ("conv_5x5", 4))


def test_derived_genotypes_are_valid_and_round_trip_through_json(tmp_path):
    torch.manual_seed(1)
    model = search.SearchNetwork(4, 3, 2, mask=True)
    with torch.no_grad():
        model.alpha_normal.normal_(0, 1)
        model.alpha_reduce.normal_(0, 1)
    g = model.genotype()
    ops.save_genotype(g, str(tmp_path / "g.json"))
    assert ops.load_genotype(str(tmp_path / "g.json")) == g
    text = (tmp_path / "g.json").read_text()
    assert [line.count('["') for line in text.splitlines() if '["' in line] == [2] * 8  # a node (two pairs) a line
    assert add.ADD(g, 4, add.d2_layout(2, 1), 2)(torch.rand(1, 3, 32, 32))[0].shape == (1, 2)


@pytest.mark.parametrize("content, expected", [
    (None, "no such genotype file"),
    ('{"normal": [["sep_conv_3x3", 0]', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"normal": [["sep_conv_3x3", 0]], "reduce": []}', '"normal": expected a list of 8 [op, input] pairs'),
    ("NORMAL_ONLY", '"reduce": expected a list of 8 [op, input] pairs (2 per node, 4 nodes), got missing'),
    ("UNKNOWN_OP", "\"normal\"[3]: unknown op 'sep_conv_9x9'"),
    ("BAD_INPUT", '"reduce"[2]: input 3 does not precede node 1'),
    ("BAD_PAIR", '"normal"[0]: expected [op name, input index], got ["sep_conv_3x3", "0"]'),
])
def test_bad_genotype_files_give_one_line_errors(tmp_path, content, expected):
    good = json.loads(ops.genotype_to_json(GENOTYPE))
    if content == "NORMAL_ONLY":
        content = json.dumps({"normal": good["normal"]})
    elif content in ("UNKNOWN_OP", "BAD_INPUT", "BAD_PAIR"):
        cell, k, pair = {"UNKNOWN_OP": ("normal", 3, ["sep_conv_9x9", 1]), "BAD_INPUT": ("reduce", 2, ["conv_3x3", 3]),
                         "BAD_PAIR": ("normal", 0, ["sep_conv_3x3", "0"])}[content]
        good[cell][k] = pair
        content = json.dumps(good)
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ops.InputError) as e:
        ops.load_genotype(str(path))
    assert str(e.value).startswith(str(path)) and expected in str(e.value) and "\n" not in str(e.value)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "f.txt")
    ops.atomic_write(path, lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ops.atomic_write(path, crash)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.txt"]  # no temporary file left behind


# ----------------------------------------------------------------------------------------------
# search.py: Algorithm 1

def tiny_batch(n=8, size=32, videos=4):
    ds = masks.SyntheticFaces("train", list(masks.SYNTHETIC_METHODS), videos, 1, size, seed=0)
    idx = torch.arange(n) % len(ds)
    return ds.images[idx], ds.masks[idx], torch.tensor(ds.labels)[idx], None


def test_search_steps_lower_the_loss_and_move_alpha():
    torch.manual_seed(0)
    model = search.SearchNetwork(4, 3, 2, mask=True)
    w_params, a_params = list(model.net.parameters()), model.arch_parameters()
    w_opt = torch.optim.SGD(w_params, 0.05, momentum=0.9)
    a_opt = torch.optim.Adam(a_params, 0.02)
    alpha0 = [a.detach().clone() for a in a_params]
    batch, cpu = tiny_batch(), torch.device("cpu")
    losses = []
    for _ in range(12):
        losses.append(search.gradient_step(model, w_opt, w_params, batch, cpu, 1.0, 5.0)[2].item())
        search.gradient_step(model, a_opt, a_params, batch, cpu, 1.0, None)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert all((a - a0).abs().max() > 1e-3 for a, a0 in zip(a_params, alpha0))


def test_search_writes_genotype_picture_and_log(tmp_path, capsys):
    g, run = str(tmp_path / "g.json"), str(tmp_path / "run")
    model = search.main(TINY_SEARCH + ["--epochs", "2", "--partial-channels", "2", "--steps-per-epoch", "500", "--out", g,
                                       "--run-dir", run])
    assert ops.load_genotype(g) == model.genotype() and Image.open(str(tmp_path / "g.png")).size == (1240, 380)
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [e["epoch"] for e in log] == [1, 2]
    beta = torch.tensor(log[-1]["edge_weights"]["reduce"])  # with K > 1 beta is logged, and drawn: alpha.png has 2 rows
    assert torch.allclose(beta, ops.node_softmax(model.beta_reduce.detach())) and Image.open(os.path.join(run, "alpha.png")).size[1] == 800
    saved = torch.load(os.path.join(run, "search.pt"), weights_only=True)
    assert (saved["epoch"], saved["step"]) == (2, 0) and torch.equal(saved["model"]["alpha_normal"], model.alpha_normal)
    assert "2 epochs x 2 steps (one pass over the training split, capping --steps-per-epoch 500) = 4 steps of 4 " \
           "training + 4 validation images" in capsys.readouterr().out


def search_state(run):
    """(epoch, step) of a search checkpoint being written by another process, or None."""
    try:
        state = torch.load(os.path.join(run, "search.pt"), weights_only=True)
        return state["epoch"], state["step"]
    except Exception:  # not there yet (it is replaced atomically, never half-written)
        return None


def wait_for(p, path, reached):
    """Until the checkpoint at path, written by process p, is `reached` (-> True) or p ends (-> False);
    loaded only when it changed (loading it in a loop would take a core from p, of the 2 there are)."""
    seen = None
    while p.poll() is None:
        stamp = (lambda s: (s.st_ino, s.st_mtime_ns, s.st_size))(os.stat(path)) if os.path.exists(path) else None
        if stamp not in (seen, None) and reached(torch.load(path, weights_only=True)):  # replaced atomically, never
            return True  # half-written
        seen = stamp
        time.sleep(0.02)
    return False


def in_own_group(*argv, env=None, stdout=subprocess.DEVNULL):
    """A script started as a scheduler or a terminal starts a job: in a process group of its own, which
    `timeout`, `scancel` and Ctrl-C signal as a whole (loader workers included)."""
    return subprocess.Popen([sys.executable, *argv], cwd=HERE, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


# The AVX2 kernels on any x86 processor, one thread: torch 2.14's oneDNN kernel for the backward of a 1x1 stride-2
# conv on channels_last inputs of 2-4 channels corrupts the heap there (an abort, or silently other numbers)
AVX2 = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", OMP_NUM_THREADS="1")


def stop_message(err, pattern):
    """The one line a stopped run ends with -> the numbers the pattern captures."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), err[-3000:]
    return [int(v) for v in re.fullmatch(pattern, lines[0]).groups()]


# the real-data path: partial channels K = 4, a budget of 3 steps an epoch (one pass is 4), 2 loader workers;
# 4 epochs, the warm-up (6 steps) ending with epoch 2, a checkpoint every 2 steps
STOP_SEARCH = ["--videos", "8", "--frames", "1", "--image-size", "32", "--channels", "4", "--cells", "3", "--batch-size", "4",
               "--epochs", "4", "--steps-per-epoch", "3", "--warmup", "0.5", "--partial-channels", "4", "--workers", "2",
               "--checkpoint-every", "2"]


def test_search_stopped_by_signals_to_its_process_group_resumes_as_if_never_stopped(tmp_path):
    # every run here with the AVX2 kernels (AVX2): its edges of 1 and 2 channels once made them corrupt the heap
    argv = STOP_SEARCH
    run, script = str(tmp_path / "run"), os.path.join(HERE, "search.py")
    code, _, err = run_cli(script, *argv, "--out", str(tmp_path / "whole.json"), "--run-dir", str(tmp_path / "whole"), env=AVX2)
    assert code == 0, err[-2000:]  # the run to compare with, as a process too
    pattern = r"stopped by SIG(?:TERM|INT) at epoch (\d), step (\d); its checkpoint is written: continue with " \
              r"python search.py --resume --run-dir " + re.escape(run)
    for sig, after in ((signal.SIGTERM, (0, 2)), (signal.SIGINT, (2, 2))):  # in the warm-up, then after it (step 8)  # (a SIGKILL: the training test below)
        p = in_own_group(script, *argv, "--out", str(tmp_path / "g.json"), "--run-dir", run, env=AVX2) \
            if sig == signal.SIGTERM else in_own_group(script, "--resume", "--run-dir", run, env=AVX2)
        assert wait_for(p, os.path.join(run, "search.pt"), lambda state: (state["epoch"], state["step"]) >= after)
        os.killpg(p.pid, sig)  # the whole group: the search and its loader workers
        _, err = p.communicate()
        epoch, step = stop_message(err, pattern)  # the checkpoint is at the step the stop came: no step lost
        assert p.returncode == 1 and search_state(run) == (epoch - 1, step) >= after, (err, search_state(run))
    code, out, err = run_cli(script, "--resume", "--run-dir", run, env=AVX2)
    assert code == 0 and "resumed" in out, err[-2000:]
    assert open(tmp_path / "g.json").read() == open(tmp_path / "whole.json").read()  # the same genotype
    end, whole = (torch.load(os.path.join(r, "search.pt"), weights_only=True)["model"] for r in (run, str(tmp_path / "whole")))
    for key in ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"):
        assert torch.equal(end[key], whole[key])  # the same alpha and beta, bit for bit
    logs = [[json.loads(line) for line in open(os.path.join(r, "log.jsonl"))] for r in (str(tmp_path / "whole"), run)]
    assert [e["epoch"] for e in logs[1]] == [1, 2, 3, 4]  # no line lost or repeated
    assert [(e["train_ce"], e["val_ce"], e["alpha_steps"]) for e in logs[0]] == \
        [(e["train_ce"], e["val_ce"], e["alpha_steps"]) for e in logs[1]]
    assert [e["alpha_steps"] for e in logs[0]] == [0, 0, 3, 3]  # the warm-up: 6 of the 12 steps
    assert all(len(e["edge_weights"]["normal"]) == 14 for e in logs[1])  # beta logged: the cell is chosen by alpha x beta


def test_factorized_reduce_is_darts_two_stride_2_convs_on_grids_offset_by_one():
    torch.manual_seed(0)
    op = random_batchnorm(ops.FactorizedReduce(6, 8, True)).eval()
    for h, w in ((8, 8), (7, 9)):  # odd sizes: the offset grid is padded with zeros
        x = torch.randn(2, 6, h, w)
        r = F.relu(x)
        shifted = F.pad(r[:, :, 1:, 1:], (0, 1, 0, 1))  # DARTS's own formulation
        darts = torch.cat([F.conv2d(r, op.conv1.weight, stride=2), F.conv2d(shifted, op.conv2.weight, stride=2)], dim=1)
        assert torch.allclose(op(x), op.bn(darts), atol=1e-6) and op(x).shape == (2, 8, (h + 1) // 2, (w + 1) // 2)


def test_factorized_reduce_survives_the_avx2_kernels():
    # FactorizedReduce at the shapes where the strided 1x1 conv corrupts the heap, forward and backward, many times
    # (with the AVX2 kernels the group-stop test above also runs: its search has edges of 1 and 2 channels)
    drive = ("import torch, ops\n"
             "for C_in, C_out in ((2, 2), (2, 4), (4, 2), (4, 4)):\n"
             "    op = ops.FactorizedReduce(C_in, C_out, True).to(memory_format=torch.channels_last)\n"
             "    for _ in range(50):\n"
             "        x = torch.randn(4, C_in, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()\n"
             "        op(x).square().sum().backward()\n")
    code, _, err = run_cli("-c", drive, env=AVX2)
    assert code == 0, err[-2000:]


def test_search_checkpoints_keep_their_format_and_the_previous_one_resumes(tmp_path, monkeypatch):
    saved, real_save = [], search.SearchRun.save

    def keep_a_copy(run, epoch, step, means):
        real_save(run, epoch, step, means)
        saved.append(torch.load(run.path, weights_only=True))
    monkeypatch.setattr(search.SearchRun, "save", keep_a_copy)
    argv = TINY_SEARCH + ["--epochs", "2", "--checkpoint-every", "1"]  # 2 steps an epoch
    whole = search.main(argv + ["--out", str(tmp_path / "g.json"), "--run-dir", str(tmp_path / "whole")])
    mid = next(state for state in saved if (state["epoch"], state["step"]) == (1, 1))  # epoch 2, after its first step
    # the format as written today: a rename here needs a conversion in search.upgrade, as `sums` has
    assert set(mid) == {"model", "w_opt", "a_opt", "w_sched", "a_sched", "epoch", "step", "means", "rng", "config"}
    assert set(mid["means"]) == {"w", "alpha", "w_steps", "alpha_steps"}
    # the same checkpoint as the version before commit 0e16673 wrote it: the sums of (CE, MSE, loss, steps) of
    # w and alpha in one tensor, none of the options added since (search.ADDED)
    means = mid.pop("means")
    mid["sums"] = torch.stack([torch.cat([means[k], torch.tensor([float(means[f"{k}_steps"])])]) for k in ("w", "alpha")])
    for key in (*search.ADDED, "deterministic"):
        del mid["config"][key]
    mid["config"]["run_dir"] = str(tmp_path / "old")
    os.makedirs(tmp_path / "old")
    torch.save(mid, tmp_path / "old" / "search.pt")
    resumed = search.main(["--resume", "--run-dir", str(tmp_path / "old")])
    assert torch.equal(resumed.alpha_normal, whole.alpha_normal) and torch.equal(resumed.alpha_reduce, whole.alpha_reduce)


def test_a_log_line_without_its_checkpoint_is_dropped_on_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1, "x": 1}\n{"epoch": 2, "x": 2}\n{"epoch": 3, "x"')  # killed after line 2 and mid-line 3
    add.trim_log(str(log), 1)  # the checkpoint holds epoch 1: epoch 2 runs again and writes its line again
    assert log.read_text() == '{"epoch": 1, "x": 1}\n'


@pytest.mark.parametrize("poisoned_after, error, on_disk", [
    (4, r"model.net.stem.0.weight holds a non-finite value: .*search.pt was not written .the one on disk is intact.", 1),
    (5, r"non-finite loss at epoch 1, within steps 3-3; the last checkpoint is intact", 2)])
def test_no_checkpoint_holds_a_non_finite_value(tmp_path, monkeypatch, poisoned_after, error, on_disk):
    path = str(tmp_path / "c.pt")
    add.save_checkpoint(dict(model={"w": torch.ones(2)}), path)
    bad = dict(model={"w": torch.ones(2)}, opt=dict(state={0: dict(exp_avg=torch.tensor([1.0, float("inf")]))}))
    with pytest.raises(add.Diverged, match=r"opt.state.0.exp_avg holds a non-finite value: .*c.pt was not written"):
        add.save_checkpoint(bad, path)
    assert torch.equal(add.load_checkpoint(path)["model"]["w"], torch.ones(2))  # the one on disk is intact
    # a state on two devices (on CUDA Adam's step counts stay on the CPU; the meta device stands in for the GPU)
    add.save_checkpoint(dict(model={"w": torch.ones(2, device="meta")}, opt=dict(state={0: dict(step=torch.tensor(3.0))})),
                        path)
    assert add.load_checkpoint(path)["opt"]["state"][0]["step"] == 3
    # a search (a w and an alpha step per step, a checkpoint every step, the loss read every 50 steps) whose w
    # turns NaN after step 2's alpha step (a weight is NaN at step 2's checkpoint) or step 3's w step (step 3's
    # alpha loss is NaN): neither checkpoint is written
    real, calls = search.gradient_step, []

    def poisoned(model, optimizer, params, *args, **kwargs):
        out = real(model, optimizer, params, *args, **kwargs)
        calls.append(1)
        if len(calls) == poisoned_after:
            with torch.no_grad():
                model.net.stem[0].weight.fill_(float("nan"))
        return out
    monkeypatch.setattr(search, "gradient_step", poisoned)
    run = str(tmp_path / "run")
    with pytest.raises(add.Diverged, match=error):
        search.main(TINY_SEARCH + ["--videos", "8", "--epochs", "1", "--checkpoint-every", "1", "--out",
                                   str(tmp_path / "g.json"), "--run-dir", run])
    state = torch.load(os.path.join(run, "search.pt"), weights_only=True)
    assert state["step"] == on_disk and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_expected_parameters_are_the_networks_when_one_hot_and_the_spaces_mean_when_uniform():
    costs, P = search.parameter_costs(), ops.PRIMITIVES.index
    alpha = torch.full((14, 11), -30.0)
    alpha[:, P("sep_conv_3x3")] = 30.0  # every edge sep_conv_3x3: then every genotype the cells can make has one size
    cell = tuple(("sep_conv_3x3", i) for node in range(4) for i in (0, 1))
    network = add.count_parameters(add.ADD(ops.Genotype(cell, cell), 48, add.d2_layout(3, 4), 3))
    weights = ((alpha.softmax(-1), None),) * 2
    assert search.expected_parameters(weights, costs).item() == pytest.approx(network, rel=1e-6)
    # uniform alpha: the mean size over the space, counted by hand: per node two edges of a mean operation,
    # plus, in a reduction cell, FactorizedReduce for skip_connect on the 2 x 2 / (i + 2) stride-2 edges a node expects
    size = lambda name, C, stride: add.count_parameters(ops.OPS[name](C, stride, True))
    nonzero = [p for p in ops.PRIMITIVES if p != "none"]
    empty = ops.Genotype(*[(("none", 0), ("none", 1)) * 4] * 2)
    by_hand, C = add.count_parameters(add.ADD(empty, 48, add.d2_layout(3, 4), 3)), 48
    for reduction in add.d2_layout(3, 4):
        C *= 2 if reduction else 1
        by_hand += 4 * 2 * np.mean([size(p, C, 1) for p in nonzero])
        if reduction:
            by_hand += sum(2 * 2 / (i + 2) for i in range(4)) * (size("skip_connect", C, 2) - size("skip_connect", C, 1)) / 10
    uniform = ((torch.full((14, 11), 1 / 11), None),) * 2
    assert search.expected_parameters(uniform, costs).item() == pytest.approx(by_hand, rel=1e-6)


def test_the_parameter_term_moves_alpha_toward_cheaper_operations(tmp_path):
    costs = search.parameter_costs()
    ends = {}
    for weight in ("0", "20"):
        model = search.main(TINY_SEARCH + ["--epochs", "2", "--param-weight", weight, "--out", str(tmp_path / f"{weight}.json"),
                                           "--run-dir", str(tmp_path / weight)])
        free = [ops.PRIMITIVES.index(p) for p in ("skip_connect", "avg_pool_3x3", "max_pool_3x3")]
        ends[weight] = (search.expected_parameters(model.cell_weights(), costs).item(),
                        model.alpha_normal.softmax(-1)[:, free].sum().item())
    assert ends["20"][0] < ends["0"][0] - 1e5 and ends["20"][1] > ends["0"][1]  # smaller, more parameter-free ops


class ToySupernet(torch.nn.Module):
    """A supernet in which one operation matters: its logit is the weight of sep_conv_3x3 on normal
    edge 3 (node 1, input 1) times a feature that gives the label away; every other (edge, operation)
    adds a fixed offset."""
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 1)  # the w that tuning steps train (unused by the logit)
        self.alpha_normal, self.alpha_reduce = (torch.nn.Parameter(torch.zeros(14, 11)) for _ in range(2))
        self.offsets = 0.5 * torch.randn(14, 11, generator=torch.Generator().manual_seed(0))

    def cell_weights(self):
        return tuple((a.softmax(-1), None) for a in (self.alpha_normal, self.alpha_reduce))

    def forward(self, x, weights=None):
        w = (weights or self.cell_weights())[0][0]  # the normal cell's (14, 11)
        z = 40 * w[3, ops.PRIMITIVES.index("sep_conv_3x3")] * (2 * x[:, 0, 0, 0] - 1) + (w * self.offsets).sum()
        return torch.stack([-z, z], 1) / 2 + 0 * self.net.weight.sum(), None


def test_darts_pt_picks_the_operation_that_matters_and_keeps_its_edge():
    y = torch.tensor([0, 1] * 8)
    batches = [((y * 255).to(torch.uint8)[:, None, None, None].expand(16, 3, 4, 4), torch.zeros(16, 1, 4, 4), y, None)]
    toy = ToySupernet()
    assert ("sep_conv_3x3", 1) not in search.derive_cell(toy.cell_weights()[0][0])[2:4]  # alpha alone cannot tell
    genotype = search.select_by_perturbation(toy, batches, lambda weights: None, torch.device("cpu"), seed=0)
    assert ("sep_conv_3x3", 1) in genotype.normal[2:4]  # node 1 keeps edge 3, with the operation that matters
    assert ops.genotype_from_dict(json.loads(ops.genotype_to_json(genotype)), "pt") == genotype  # a valid genotype


def test_darts_pt_with_partial_channels_scales_and_removes_whole_edges():
    torch.manual_seed(0)
    model = search.SearchNetwork(8, 3, 2, True, partial=4).eval()  # K = 4: 2 of each edge's 8 channels operated
    with torch.no_grad():
        for p in model.arch_parameters():
            p.normal_(0, 1)
    nothing, skip = {kind: {} for kind in search.CELL_TYPES}, ops.PRIMITIVES.index("skip_connect")
    # decisions on the normal cell: edge 1's operation is skip_connect; node 1 (edges 2, 3, 4) keeps edges 2 and 4
    projected = search.projected(model.cell_weights(), {"normal": {1: skip}, "reduce": {}}, {"normal": {1: [2, 4]}, "reduce": {}})
    (w, e), reduce = (tuple(t.detach().clone() for t in cw) for cw in model.cell_weights())
    w[1], w[1, skip] = 0, w[1].sum()  # by hand: the row's total on the chosen operation ...
    w[3], e[3] = 0, 0  # ... and the dropped edge gone, its edge weight (its bypass channels) too
    assert all(torch.equal(a, b) for a, b in zip((*projected[0], *projected[1]), (w, e, *reduce)))
    batch = tiny_batch(8, 32)
    x, _, y = add.to_device(batch, torch.device("cpu"))
    with torch.no_grad():  # DARTS-PT scores in training mode: BatchNorm on the batch's statistics, as the search
        ce_train = F.cross_entropy(model.train()(x, ((w, e), reduce))[0], y).item()
        ce_eval = F.cross_entropy(model.eval()(x, ((w, e), reduce))[0], y).item()
    assert search.validation_ce(model.eval(), projected, [batch], torch.device("cpu")) == pytest.approx(ce_train, rel=1e-6)
    assert ce_train != pytest.approx(ce_eval, rel=1e-3)
    model.eval()
    cell, s1 = model.net.cells[0], torch.randn(2, 24, 8, 8)  # a normal cell: node 0 is its first 8 output channels
    weights = search.projected(model.cell_weights(), nothing, nothing)[0]
    node0 = lambda s0, w: cell(s0, s1, w)[:, :8]
    s0 = torch.randn(2, 24, 8, 8)
    assert not torch.allclose(node0(s0, weights), node0(s0 + 1, weights))  # edge 0 brings c_{k-2} in ...
    search.remove(weights, 0)  # ... until removed: its bypass channels go with it
    assert torch.equal(node0(s0, weights), node0(s0 + 1, weights))
    chosen = {"normal": {1: ops.PRIMITIVES.index("skip_connect")}, "reduce": {}}
    (w, e), _ = search.projected(model.cell_weights(), chosen, nothing)
    assert torch.equal(e, model.cell_weights()[0][1]) and w[1].sum() == pytest.approx(1.0) and (w[1] > 0).sum() == 1


def test_darts_pt_on_a_finished_search_writes_a_valid_genotype(tmp_path, capsys, monkeypatch):
    g, pt, run = str(tmp_path / "g.json"), str(tmp_path / "pt.json"), str(tmp_path / "r")
    model = search.main(TINY_SEARCH + ["--epochs", "1", "--partial-channels", "4", "--out", g, "--run-dir", run])
    capsys.readouterr()
    # the command's path; each of its 324 removals scored by a cheap function of the weights instead of a forward
    # of the supernet (the selection itself: the two tests above)
    score = torch.randn(14, 11, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(search, "validation_ce", lambda model, weights, batches, device: float((weights[0][0] * score).sum()))
    search.main(["--resume", "--run-dir", run, "--select", "pt", "--pt-tune-steps", "1", "--pt-batches", "1", "--out", pt])
    out = capsys.readouterr().out
    assert "DARTS-PT selection" in out and "chosen by DARTS-PT" in out and ops.load_genotype(pt)
    assert re.search(r"DARTS-PT kept \d+ of alpha's 16 \(operation, input\) choices\n$", out)  # its last line
    assert ops.load_genotype(g) == model.genotype()  # the search's own choice stays where it was


def test_the_step_budget_draws_a_fresh_seeded_subset_each_epoch():
    args = search.parse_args(TINY_SEARCH + ["--videos", "8", "--steps-per-epoch", "3", "--workers", "0"])  # 16 samples: 4 batches
    (train_loader, val_loader), steps, one_pass = search.loaders(args)
    assert (steps, one_pass) == (3, 4) and len(train_loader) == len(val_loader) == 3
    orders = []
    for epoch in (0, 1, 0):
        train_loader.sampler.set_epoch(epoch)
        orders.append(list(train_loader.sampler))
    assert len(orders[0]) == 12 == len(set(orders[0])) and orders[0] != orders[1] and orders[0] == orders[2]
    train_loader.sampler.set_epoch(0, start=4)  # a resumed epoch: from its second batch on
    assert list(train_loader.sampler) == orders[0][4:] and len(train_loader) == 2
    assert search.parse_args(["--data", "ff++"]).steps_per_epoch * 300 == 60_000  # real data: README, Search cost
    args.steps_per_epoch = 200  # the real-data budget on a small split: at most one pass an epoch
    assert search.loaders(args)[1:] == (4, 4)


def test_one_epoch_runs_with_the_default_warmup(tmp_path):
    search.main(TINY_SEARCH[:-2] + ["--epochs", "1", "--out", str(tmp_path / "g.json"), "--run-dir", str(tmp_path / "r")])
    log = json.loads(open(tmp_path / "r" / "log.jsonl").readline())
    assert log["alpha_steps"] == 1 and log["val_ce"] > 0  # 2 steps, the first 40% (1 step) w alone
    code, _, err = run_cli("search.py", "--epochs", "2", "--warmup-epochs", "2")
    one_line_error(err, "--warmup-epochs 2: alpha would never move in 2 epochs")


def test_warmup_keeps_alpha_still_and_the_log_has_both_terms(tmp_path, capsys):
    run = str(tmp_path / "run")
    model = search.main(TINY_SEARCH + ["--epochs", "2", "--warmup-epochs", "1", "--w-optimizer", "adam", "--w-lr", "1e-3",
                                       "--w-lr-batch", "0", "--out", str(tmp_path / "g.json"), "--run-dir", run])
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    torch.manual_seed(0)  # alpha as initialised: the same draw as the run's
    initial = search.SearchNetwork(4, 3, 2, True).alpha_normal.softmax(-1)
    assert torch.allclose(torch.tensor(log[0]["softmax_alpha"]["normal"]), initial, atol=1e-6)  # still in the warm-up
    assert not torch.allclose(model.alpha_normal.softmax(-1), initial, atol=1e-4)  # moved in epoch 2
    assert log[0]["val_ce"] is None and log[1]["val_ce"] > 0 and all(e["train_ce"] > 0 and e["train_mse"] > 0 for e in log)
    out = capsys.readouterr().out
    assert "alpha still (warm-up)" in out and "val CE" in out and "M parameters at the paper's size (C 48, N 4)" in out
    assert Image.open(os.path.join(run, "alpha.png")).size[0] > 500


def test_paper_sets_every_departure_back_to_the_papers_value_and_flags_still_win():
    real, paper = search.parse_args(["--data", "ff++"]), search.parse_args(["--data", "ff++", "--paper"])
    assert {k: getattr(paper, k) for k in search.DEPARTURES} == {k: search.PAPER[k] for k in search.DEPARTURES} and \
        (paper.w_lr, paper.partial_channels, paper.steps_per_epoch, paper.param_weight) == (0.1, 1, 0, 0.0)
    assert (real.w_lr, real.partial_channels, real.steps_per_epoch, real.param_weight) == (0.025, 4, 200, 0.1)
    assert all(getattr(paper, k) == getattr(real, k) for k in ("image_size", "channels", "cells", "batch_size", "epochs"))
    demo = search.parse_args(["--paper", "--partial-channels", "4"])  # the demo's sizes, the paper's optimisation
    assert (demo.image_size, demo.w_lr, demo.warmup, demo.partial_channels) == (64, 0.1, 0.0, 4)


@pytest.mark.parametrize("script, argv, expected", [
    ("search", ["--steps-per-epoch", "-1"], "argument --steps-per-epoch: expected a whole number >= 0, got '-1'"),
    ("search", ["--warmup-epochs", "-2"], "argument --warmup-epochs: expected a whole number >= 0, got '-2'"),
    ("search", ["--param-weight", "-0.1"], "argument --param-weight: expected a number >= 0, got '-0.1'"),
    ("search", ["--warmup", "1"], "argument --warmup: expected a number >= 0 and < 1, got '1'"),
    ("search", ["--epochs", "two"], "argument --epochs: expected a whole number >= 1, got 'two'"),
    ("search", ["--channels", "6", "--partial-channels", "4"], "--partial-channels 4: must divide --channels 6"),
    ("search", ["--image-size", "8"], "--image-size 8: the stem (2 halvings) and the two reduction cells need at least 16 px"),
    ("search", ["--seed", "-1"], "argument --seed: expected a whole number >= 0, got '-1'"),
    ("train", ["--seed", "-3"], "argument --seed: expected a whole number >= 0, got '-3'"),
    ("train", ["--lr", "nan"], "argument --lr: expected a number >= 0, got 'nan'"),
    ("train", ["--threshold", "1.5"], "argument --threshold: expected a number >= 0 and < 1, got '1.5'"),
    ("train", ["--milestones", "80", "0"], "argument --milestones: expected a whole number >= 1, got '0'"),
    ("masks", ["--benchmark", "--frames", "0"], "argument --frames: expected a whole number >= 1, got '0'"),
])
def test_bad_flag_values_are_one_line_errors(script, argv, expected):
    with pytest.raises(ops.InputError) as e:
        {"search": search.parse_args, "train": lambda a: train.parse_args(["--genotype", "g.json"] + a),
         "masks": masks.main}[script](argv)
    assert str(e.value) == expected


def test_random_genotypes_are_uniform_over_the_space(tmp_path, capsys):
    g = ops.random_genotype(3)
    assert g == ops.random_genotype(3) and g != ops.random_genotype(4) and g.normal != g.reduce
    ops_seen, first_inputs = {}, {}
    for seed in range(500):
        for cell in ops.random_genotype(seed):
            for k in range(0, 8, 2):
                (op_a, a), (op_b, b) = cell[k], cell[k + 1]
                assert 0 <= a < b < k // 2 + 2  # two distinct inputs among the node's predecessors
                for op in (op_a, op_b):
                    ops_seen[op] = ops_seen.get(op, 0) + 1
            first_inputs[cell[6][1], cell[7][1]] = first_inputs.get((cell[6][1], cell[7][1]), 0) + 1
    assert set(ops_seen) == set(ops.PRIMITIVES) - {"none"}
    assert all(abs(n / 8000 - 0.1) < 0.015 for n in ops_seen.values())  # each of the ten ops: 10% of 8000 edges
    assert len(first_inputs) == 10 and all(abs(n / 1000 - 0.1) < 0.03 for n in first_inputs.values())  # node 3: 10 pairs
    search.main(["--random-genotype", "3", "--out", str(tmp_path / "r.json")])
    assert ops.load_genotype(str(tmp_path / "r.json")) == g and os.path.exists(tmp_path / "r.png")
    assert "M parameters at the paper's size" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# masks.py: hull masks, real faces, dataset preparation, synthetic data

def test_hull_mask_area_equals_the_polygon_area():
    n, R, c = 12, 80.0, 100.0
    corners = np.array([(c + R * math.cos(2 * math.pi * k / n), c + R * math.sin(2 * math.pi * k / n)) for k in range(n)])
    inside = c + np.random.default_rng(0).uniform(-40, 40, (56, 2))  # interior points do not change the hull
    mask = masks.hull_mask(np.concatenate([inside, corners]).astype(np.float32), 200)
    area = n / 2 * R ** 2 * math.sin(2 * math.pi / n)  # regular 12-gon
    assert abs(mask.sum() - area) / area < 0.01 and set(np.unique(mask)) == {0, 1}


def test_a_real_photo_gives_one_face_and_a_mask_covering_it():
    image = astronaut()
    faces = masks.FaceFinder().faces(image)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    mask = masks.hull_mask(faces[0].landmarks, *image.shape[:2])
    box = mask[int(y0):int(y1), int(x0):int(x1)]
    assert box.mean() > 0.5 and mask.sum() < 2 * (x1 - x0) * (y1 - y0)  # covers the face, not the photo
    crop, points = masks.crop_face(image, faces[0], size=128)
    assert crop.shape == (128, 128, 3) and 0.25 < masks.hull_mask(points, 128).mean() < 0.75


def test_show_draws_an_overlay_and_rejects_faceless_photos(tmp_path):
    photo, out, blank = str(tmp_path / "a.png"), str(tmp_path / "o.png"), str(tmp_path / "blank.png")
    Image.fromarray(astronaut()).save(photo)
    masks.main(["--show", photo, "--out", out])
    overlay = np.asarray(Image.open(out), dtype=float)
    assert overlay.shape == (512, 512, 3)
    inside = masks.hull_mask(masks.FaceFinder().faces(astronaut())[0].landmarks, 512)
    blend = astronaut()[inside > 0] * (1 - 90 / 255) + np.array([255, 40, 40]) * 90 / 255  # translucent red
    assert np.median(np.abs(overlay[inside > 0] - blend)) <= 1.0  # the face shows through the tint (dots aside)
    Image.new("RGB", (300, 300), (90, 90, 90)).save(blank)
    with pytest.raises(ops.InputError, match="no face found"):
        masks.main(["--show", blank, "--out", out])


def write_video(path, frames):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
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
    """FF++ as downloaded: 6 real videos, two methods, one corrupt and one faceless fake, splits."""
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
    (src / "manipulated_sequences/Deepfakes/c23/videos/001_000.mp4").write_bytes(os.urandom(4000))
    with wave.open(str(src / "manipulated_sequences/FaceSwap/c23/videos/005_004.mp4"), "wb") as audio_only:
        audio_only.setnchannels(1)  # a media file without a video stream
        audio_only.setsampwidth(2)
        audio_only.setframerate(8000)
        audio_only.writeframes(bytes(1600))
    write_video(str(src / "manipulated_sequences/FaceSwap/c23/videos/003_002.mp4"), [np.full((256, 256, 3), 90, np.uint8)] * 4)
    os.remove(real / "003.mp4")  # 003 as a folder of extracted frames instead of an mp4
    os.makedirs(real / "003")
    for t in range(4):
        Image.fromarray(np.roll(astronaut(), t, axis=1)).save(real / "003" / f"{t:04d}.png")
    os.makedirs(src / "splits")
    for split, pairs in (("train", [["000", "001"]]), ("val", [["002", "003"]]), ("test", [["004", "005"]])):
        (src / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    root = str(src / "prepared")
    masks.main(["--data", "ff++", "--src", str(src), "--root", root, "--methods", "Deepfakes,FaceSwap",
                "--frames", "2", "--workers", "2"])
    return str(src), root


def manifest_counts(root):
    rows = open(os.path.join(root, "manifest.csv")).read().splitlines()[1:]
    counts = {}
    for row in rows:
        split, label = row.split(",")[:2]
        counts[split, int(label)] = counts.get((split, int(label)), 0) + 1
    return counts


def test_ffpp_prepares_to_the_right_counts_and_reports_bad_videos(ffpp):
    _, root = ffpp
    # train: reals 000, 001; fakes Deepfakes 000_001 (001_000 corrupt), FaceSwap 000_001, 001_000; 2 frames each
    # val: reals 002, 003 (003 a folder); fakes Deepfakes 002_003, 003_002, FaceSwap 002_003 (003_002 faceless)
    # test: reals 004, 005; fakes 004_005, 005_004 of both methods (FaceSwap 005_004 has no video stream)
    assert manifest_counts(root) == {("train", 0): 4, ("train", 1): 6, ("val", 0): 4, ("val", 1): 6,
                                     ("test", 0): 4, ("test", 1): 6}
    report = open(os.path.join(root, "report.txt")).read()
    assert "Deepfakes/001_000\tvideo\tunreadable video" in report
    assert "FaceSwap/003_002\tvideo\tno face in any of its 2 frames" in report
    assert "FaceSwap/003_002\tframe 1\tno face" in report
    assert "FaceSwap/005_004\tvideo\tfailed (ValueError: no video stream)" in report
    mask = np.asarray(Image.open(os.path.join(root, "masks/original/000/0001.png")))
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255} and 0.2 < (mask > 0).mean() < 0.8


def test_restart_skips_finished_videos_and_redoes_a_half_written_one(ffpp, capsys):
    src, root = ffpp
    argv = ["--data", "ff++", "--src", src, "--root", root, "--methods", "Deepfakes,FaceSwap", "--frames", "2", "--workers", "1"]
    os.remove(os.path.join(root, "records/original/000.json"))  # killed after its frames, before its record
    open(os.path.join(root, "faces/original/000/0001.png.tmp999"), "w").close()
    before = manifest_counts(root)
    masks.main(argv)
    out = capsys.readouterr().out
    assert "16 already prepared, 2 to do (1 of them again)" in out and "prepared 2 frames" in out  # + the corrupt one
    assert manifest_counts(root) == before
    assert not os.path.exists(os.path.join(root, "faces/original/000/0001.png.tmp999"))  # cleaned up


@pytest.mark.parametrize("argv, expected", [
    (["--src", "/no/such/dir"], "/no/such/dir: not found; expected the FaceForensics++ download root"),
    (["--methods", "Deepfake"], "--methods: unknown ff++ method 'Deepfake'"),
    (["--splits", "/tmp/no-splits"], "/tmp/no-splits/train.json: not found; expected FaceForensics++'s official split file"),
    (["--compression", "c40"], "original_sequences/youtube/c40/videos: not found"),
    (["--benchmark", "--src", "/no/such/video.mp4"], "/no/such/video.mp4: no such video file"),
])
def test_bad_preparation_input_is_a_one_line_error(ffpp, argv, expected):
    src, root = ffpp
    if argv[0] == "--benchmark":
        code, _, err = run_cli("masks.py", *argv)
    else:
        flags = {"--src": src, "--methods": "Deepfakes", "--root": root, **dict(zip(argv[::2], argv[1::2]))}
        code, _, err = run_cli("masks.py", "--data", "ff++", *[v for kv in flags.items() for v in kv])
    assert code != 0
    one_line_error(err, expected)


def png_bomb(path):
    """A PNG whose header claims 20000 x 20000 pixels: PIL refuses it (a decompression bomb)."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_preparation_survives_any_error_retries_transient_ones_and_checks_settings(tmp_path, face_video, capsys):
    src, root = tmp_path / "ffpp", str(tmp_path / "prepared")
    real, fake = src / "original_sequences/youtube/c23/videos", src / "manipulated_sequences/Deepfakes/c23/videos"
    for folder, names in ((real, ("000", "001", "002", "003")), (fake, ("000_001", "001_000", "002_003", "003_002"))):
        os.makedirs(folder, exist_ok=True)
        for name in names:
            shutil.copy(face_video, folder / f"{name}.mp4")
    os.remove(fake / "001_000.mp4")  # 001_000 is a folder of frames, one of which is a decompression bomb
    os.makedirs(fake / "001_000")
    Image.fromarray(astronaut()).save(fake / "001_000" / "0.png")
    png_bomb(fake / "001_000" / "1.png")
    os.rename(real / "002.mp4", tmp_path / "002.mp4")  # 002 missing for now (a download still running)
    os.makedirs(src / "splits")
    for split, pairs in (("train", [["000", "001"]]), ("val", [["002", "003"]]), ("test", [])):
        (src / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    argv = ["--data", "ff++", "--src", str(src), "--root", root, "--methods", "Deepfakes", "--frames", "2"]
    masks.main(argv + ["--workers", "2"])
    out = capsys.readouterr().out
    assert "skipped Deepfakes/001_000: failed (DecompressionBombError" in out  # recorded; the pool went on
    assert "skipped original/002: unreadable video (FileNotFoundError" in out and "tried again on the next run" in out
    # the bomb's video keeps the frame read before it: train fakes 000_001 (2) + 001_000 (1)
    assert manifest_counts(root) == {("train", 0): 4, ("train", 1): 3, ("val", 0): 2, ("val", 1): 4}
    os.rename(tmp_path / "002.mp4", real / "002.mp4")  # the download finished
    masks.main(argv + ["--workers", "1"])
    assert "7 already prepared, 1 to do (1 of them again)" in capsys.readouterr().out
    assert manifest_counts(root)[("val", 0)] == 4
    code, _, err = run_cli("masks.py", *argv[:-1], "3")  # other --frames into the same root
    one_line_error(err, f"{root}: prepared with --frames 2 --size 256 --detect-size 640 --compression c23, not "
                        f"--frames 3", "--redo")
    masks.main(argv + ["--workers", "1", "--retry-failed"])  # the bomb's video, recorded as failed, is tried again
    assert "7 already prepared, 1 to do (1 of them again)" in capsys.readouterr().out
    masks.main(argv[:-1] + ["3", "--workers", "1", "--redo"])
    assert manifest_counts(root)[("train", 0)] == 6 and "8 to do" in capsys.readouterr().out  # 3 of 6 frames each


def small_ffpp(tmp_path, face_video, fakes=("000_001", "001_000", "002_003", "003_002")):
    """FF++ as downloaded, 4 real and 4 Deepfakes videos (copies of the face video), splits train/val."""
    src = tmp_path / "ffpp"
    real, fake = src / "original_sequences/youtube/c23/videos", src / "manipulated_sequences/Deepfakes/c23/videos"
    for folder, names in ((real, ("000", "001", "002", "003")), (fake, fakes)):
        os.makedirs(folder, exist_ok=True)
        for name in names:
            shutil.copy(face_video, folder / f"{name}.mp4")
    os.makedirs(src / "splits")
    for split, pairs in (("train", [["000", "001"]]), ("val", [["002", "003"]]), ("test", [])):
        (src / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    return src, real, fake


def test_frames_stay_until_a_redo_succeeds_and_bad_records_are_handled(tmp_path, face_video, capsys):
    src, real, _ = small_ffpp(tmp_path, face_video)
    root = str(tmp_path / "prepared")
    argv = ["--data", "ff++", "--src", str(src), "--root", root, "--methods", "Deepfakes", "--frames", "2", "--workers", "1"]
    masks.main(argv)
    record_file = os.path.join(root, "records/original/002.json")
    record = json.load(open(record_file))
    json.dump(dict(record, retry=True), open(record_file, "w"))  # as a partial download leaves it: tried again
    os.rename(real / "002.mp4", tmp_path / "002.mp4")  # and now its source is gone (a network mount down)
    masks.main(argv)
    assert "skipped original/002: unreadable video (FileNotFoundError" in capsys.readouterr().out
    assert manifest_counts(root)[("val", 0)] == 4 and os.path.exists(os.path.join(root, "faces/original/002/0004.png"))
    assert json.load(open(record_file))["reason"].endswith("the 2 frames prepared before are kept")
    os.rename(tmp_path / "002.mp4", real / "002.mp4")
    open(os.path.join(root, "records/original/003.json"), "w").write('{"split": "val", "lab')  # cut short
    masks.main(argv)
    out = capsys.readouterr().out
    assert "003.json: not a readable record" in out and "6 already prepared, 2 to do (1 of them again)" in out
    assert json.load(open(record_file))["reason"] == "" and manifest_counts(root)[("val", 0)] == 4
    for r in glob.glob(os.path.join(root, "records/*/*.json")):  # as the first version wrote them
        json.dump({k: v for k, v in json.load(open(r)).items() if k != "settings"}, open(r, "w"))
    code, _, err = run_cli("masks.py", *argv)
    one_line_error(err, f"{root}: prepared with an older version of masks.py (records without settings)", "--redo")


def test_a_worker_killed_by_a_signal_is_that_videos_failure_and_the_rest_goes_on(tmp_path, face_video):
    src, _, fake = small_ffpp(tmp_path, face_video)
    os.remove(fake / "001_000.mp4")  # a folder of 5000 x 5000 frames: ~2.3 s of CPU each (no face: full-size HOG)
    os.makedirs(fake / "001_000")
    Image.new("RGB", (5000, 5000), (90, 90, 90)).save(fake / "001_000" / "0.png")
    for k in (1, 2):
        shutil.copy(fake / "001_000" / "0.png", fake / "001_000" / f"{k}.png")
    root = str(tmp_path / "prepared")
    cpu_limit = lambda: resource.setrlimit(resource.RLIMIT_CPU, (6, 120))  # SIGXCPU kills a process after 6 s of CPU
    p = subprocess.run([sys.executable, "masks.py", "--data", "ff++", "--src", str(src), "--root", root, "--methods",
                        "Deepfakes", "--frames", "3", "--workers", "2"], capture_output=True, text=True, cwd=HERE,
                       timeout=240, preexec_fn=cpu_limit)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped Deepfakes/001_000: failed (the process preparing it died" in p.stdout
    assert manifest_counts(root) == {("train", 0): 6, ("train", 1): 3, ("val", 0): 6, ("val", 1): 6}  # 3 frames each
    assert not os.path.exists(os.path.join(root, "staging/Deepfakes/001_000"))


def test_manifest_is_written_with_csv_quoting(tmp_path):
    root = str(tmp_path)
    record = dict(split="train", label=1, method="Deepfakes", name='001,"002"', path="x", settings={}, frames=[3],
                  skipped_frames=[], reason="", retry=False)
    os.makedirs(os.path.join(root, "records", "Deepfakes"))
    open(os.path.join(root, "records", "Deepfakes", "a.json"), "w").write(json.dumps(record))
    masks.write_manifest(root)
    row = next(csv.DictReader(open(os.path.join(root, "manifest.csv"))))
    assert row["video"] == '001,"002"' and row["frame"] == "3" and row["image"] == 'faces/Deepfakes/001,"002"/0003.png'


def test_odd_frames_give_faces_16_bit_exif_rotated_video_natural_order(tmp_path):
    face = astronaut()[:, 56:456]  # (512, 400, 3): not square, so a turn shows in the shape
    gray = np.asarray(Image.fromarray(face).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(tmp_path / "gray16.png")  # opens as mode I;16
    assert np.abs(masks.load_rgb(str(tmp_path / "gray16.png"))[..., 0].astype(int) - gray // 257).max() <= 1
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.ascontiguousarray(np.rot90(face))).save(tmp_path / "turned.jpg", exif=exif)
    path = str(tmp_path / "phone.mp4")
    with av.open(path, "w") as container:  # frames stored sideways, with a display rotation of 90 degrees
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 512, 400, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(face, -1)), format="rgb24")))
        container.mux(stream.encode())
    for source in (str(tmp_path / "gray16.png"), str(tmp_path / "turned.jpg"), path):
        found = list(masks.read_faces(source, 2, 128, 640))
        assert found and all(crop is not None for _, crop, _, _ in found), source
        assert next(masks.iter_frames(source, 1, 640))[1].shape[:2] == (512, 400), source
    folder = tmp_path / "frames"
    os.makedirs(folder)
    for t in (1, 2, 10):
        Image.new("RGB", (10 * t, 10)).save(folder / f"{t}.png")
    assert [rgb.shape[1] for _, rgb, _, _ in masks.iter_frames(str(folder), 2, 640)] == [10, 100]  # 1, 10 (not 1, 2)


def test_long_videos_seek_to_the_same_frames(tmp_path):
    path = str(tmp_path / "long.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "8"})  # a keyframe every 8 frames
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for t in range(40):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 6 * t, np.uint8), format="rgb24")))
        container.mux(stream.encode())
    through = list(masks._video_frames(path, 4, 640, seek_gap=10**9))
    seeking = list(masks._video_frames(path, 4, 640, seek_gap=2))
    assert [f[0] for f in through] == [f[0] for f in seeking] == [5, 15, 25, 35]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(through, seeking))
    assert [round(f[1].mean() / 6) for f in seeking] == [5, 15, 25, 35]  # the frames' own content


def test_celebdf_as_released_gives_validation_of_both_classes_without_shared_people(tmp_path):
    rng = np.random.default_rng(0)
    src, names = tmp_path / "celebdf", {"Celeb-real": [], "YouTube-real": [], "Celeb-synthesis": []}
    for i in range(59):  # 59 celebrities, ~10 videos each, each swapped with a few partners
        names["Celeb-real"] += [f"id{i}_{k:04d}" for k in range(10)]
        for j in rng.choice([p for p in range(59) if p != i], 4, replace=False):
            names["Celeb-synthesis"] += [f"id{i}_id{j}_{k:04d}" for k in range(rng.integers(1, 5))]
    names["YouTube-real"] = [f"{k:05d}" for k in range(300)]
    for folder, files in names.items():
        os.makedirs(src / folder)
        for name in files:
            open(src / folder / f"{name}.mp4", "w").close()
    test = [f"1 Celeb-real/{n}.mp4" for n in names["Celeb-real"][::9]] + [f"0 Celeb-synthesis/{n}.mp4" for n in names["Celeb-synthesis"][::8]]
    (src / "List_of_testing_videos.txt").write_text("\n".join(test) + "\n")
    videos = masks.celebdf_videos(str(src))
    count = lambda split, label: sum(v.split == split and v.label == label for v in videos)
    for label in (0, 1):
        assert 0.08 < count("val", label) / (count("val", label) + count("train", label)) < 0.25
    people = lambda split: set().union(*(masks._identities(v.method, v.name) for v in videos if v.split == split))
    assert not people("val") & people("train") and count("test", 0) + count("test", 1) == len(test)
    (src / "List_of_testing_videos.txt").write_text("1 YouTube-real/00001.mp4\nYouTube-real/00002.mp4 1\n")
    with pytest.raises(ops.InputError, match="List_of_testing_videos.txt, line 2: expected '<1 real | 0 fake> <folder>/<file>.mp4'"):
        masks.celebdf_videos(str(src))


def test_workers_default_to_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # pinned to one core of many
    assert masks.usable_cpus() == 1 and masks.loader_workers("ff++") == 1 and masks.loader_workers("synthetic") == 0


@pytest.fixture(scope="module")
def celebdf(tmp_path_factory, face_video):
    src = tmp_path_factory.mktemp("celebdf")
    names = {"Celeb-real": ["id0_0000", "id1_0000", "id2_0000", "id3_0000"], "YouTube-real": ["00000", "00001"],
             "Celeb-synthesis": ["id0_id2_0000", "id1_id3_0000", "id0_id1_0000", "id2_id0_0001", "id3_id1_0001"]}
    for folder, files in names.items():
        os.makedirs(src / folder)
        for name in files:
            shutil.copy(face_video, src / folder / f"{name}.mp4")
    (src / "List_of_testing_videos.txt").write_text("1 YouTube-real/00001.mp4\n0 Celeb-synthesis/id2_id0_0001.mp4\n")
    root = str(src / "prepared")
    masks.main(["--data", "celeb-df", "--src", str(src), "--root", root, "--frames", "1", "--workers", "1"])
    return str(src), root


def test_celebdf_split_follows_the_test_list_and_keeps_identities_apart(celebdf):
    src, root = celebdf
    split = {f"{v.method}/{v.name}": v.split for v in masks.celebdf_videos(src)}
    # swaps outside the test list: id0-id2, id1-id3 (twice), id0-id1. Validation grows from id2 (the
    # fewest swaps cut), then id0 (completes id0_id2): a tenth of the fakes reached; its reals come along
    assert split == {"YouTube-real/00001": "test", "Celeb-synthesis/id2_id0_0001": "test",
                     "Celeb-real/id0_0000": "val", "Celeb-real/id2_0000": "val", "Celeb-synthesis/id0_id2_0000": "val",
                     "YouTube-real/00000": "train", "Celeb-real/id1_0000": "train", "Celeb-real/id3_0000": "train",
                     "Celeb-synthesis/id1_id3_0000": "train", "Celeb-synthesis/id3_id1_0001": "train"}
    # id0_id1_0000 mixes both sides: left out of both
    assert manifest_counts(root) == {("test", 0): 1, ("test", 1): 1, ("val", 0): 2, ("val", 1): 1, ("train", 0): 3,
                                     ("train", 1): 2}


def test_prepared_frames_read_as_balanced_uint8_samples(ffpp):
    _, root = ffpp
    train_set = masks.FaceCrops(root, "train", ["Deepfakes", "FaceSwap"], train=True, image_size=64)
    assert len(train_set) == 4 * 2 + 6  # 4 real frames repeated round(6/4) = 2 times
    image, mask, label, video = train_set[0]
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0, 1}
    assert image.dtype == mask.dtype == torch.uint8 and label in (0, 1) and "/" in video
    # uint8 through the loader, normalised on the device == the float image read directly
    x, M, y = add.to_device(torch.utils.data.default_collate([train_set[i] for i in range(4)]), torch.device("cpu"))
    for i in range(4):
        r = train_set.rows[i]
        face = Image.open(os.path.join(root, r["image"])).convert("RGB").resize((64, 64), Image.BILINEAR)
        hull = Image.open(os.path.join(root, r["mask"])).resize((64, 64), Image.NEAREST)
        assert torch.equal(x[i], torch.from_numpy(np.asarray(face, dtype=np.float32) / 255).permute(2, 0, 1))
        assert torch.equal(M[i, 0], torch.from_numpy(np.asarray(hull) > 127).float())
    assert x.is_contiguous(memory_format=torch.channels_last) and y.tolist() == train_set.labels[:4]
    with pytest.raises(ops.InputError, match="run masks.py first"):
        masks.FaceCrops("/no/such/root", "train", ["Deepfakes"], True, 64)


def test_image_and_mask_flip_together_reproducibly():
    ds = masks.SyntheticFaces("train", ["swap"], 8, 1, 32, seed=0)
    x, M, y = add.to_device((ds.images, ds.masks, torch.tensor(ds.labels)), torch.device("cpu"))
    fx, fM, fy = add.to_device((ds.images, ds.masks, torch.tensor(ds.labels)), torch.device("cpu"), add.epoch_generator(0, 3))
    mirrored = [torch.equal(fx[i], x[i].flip(-1)) and torch.equal(fM[i], M[i].flip(-1)) for i in range(len(x))]
    same = [torch.equal(fx[i], x[i]) and torch.equal(fM[i], M[i]) for i in range(len(x))]
    assert all(a != b for a, b in zip(mirrored, same)) and 0 < sum(mirrored) < len(x) and torch.equal(fy, y)
    again = add.to_device((ds.images, ds.masks, torch.tensor(ds.labels)), torch.device("cpu"), add.epoch_generator(0, 3))
    assert torch.equal(again[0], fx)  # the same (seed, epoch): the same flips


@pytest.mark.parametrize("family", masks.SYNTHETIC_METHODS)
def test_synthetic_fakes_differ_from_their_source_only_in_and_near_the_face(family):
    for video in range(3):
        s = masks.synthetic_frame(0, video, 0, 64, family)
        diff = np.abs(s["fake"] - s["real"]).max(-1)
        assert diff[s["weight"] > 0.5].mean() > 0.01  # visibly changed inside the manipulated region
        near_face = binary_dilation(masks.hull_mask(s["fake_points"], 64), iterations=4)
        assert diff[~near_face].max() == 0  # untouched beyond 4 px (the feathering) of the face hull
    again = masks.synthetic_frame(0, 2, 0, 64, family)
    assert np.array_equal(again["fake"], s["fake"])  # deterministic by seed


def test_synthetic_landmarks_follow_dlibs_layout():
    pts = masks.synthetic_frame(0, 0, 0, 128)["real_points"]
    assert pts.shape == (68, 2)
    assert pts[0, 0] < pts[8, 0] < pts[16, 0] and pts[8, 1] > pts[30, 1] > pts[19, 1]  # jaw L->R, chin, nose, brow
    assert pts[36:42, 0].mean() < pts[42:48, 0].mean() and pts[48, 0] < pts[54, 0]  # eyes, mouth corners
    assert pts[51, 1] < pts[57, 1]  # upper lip above lower lip


# ----------------------------------------------------------------------------------------------
# add.py and train.py: the network, Eq. 7, evaluation, checkpoints, protocols

def test_add_outputs_logits_and_a_mask_in_unit_range():
    model = add.ADD(GENOTYPE, 4, add.d2_layout(2, 1), stem_reductions=2)
    logits, m = model(torch.rand(3, 3, 48, 48))
    assert logits.shape == (3, 2) and m.shape == (3, 1, 48, 48) and 0 <= m.min() and m.max() <= 1
    full_size = add.ADD(GENOTYPE, 4, add.d2_layout(2, 1), stem_reductions=0)  # a stem without halvings: 3 -> 3C at 16 px
    assert full_size.stem(torch.rand(1, 3, 16, 16)).shape == (1, 12, 16, 16) and full_size(torch.rand(1, 3, 16, 16))[0].shape == (1, 2)


def test_channels_last_and_fp32_heads_match_the_plain_path():
    torch.manual_seed(0)
    model, x = add.ADD(GENOTYPE, 8, add.d2_layout(2, 1), 2).eval(), torch.rand(3, 3, 32, 32)
    plain = model(x)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain[0], cl[0], atol=1e-5) and torch.allclose(plain[1], cl[1], atol=1e-6)
    heads, f = add.Heads(16, 32, mask=True).eval(), torch.randn(3, 16, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on CUDA: the body in bf16, the heads not
        logits, m = heads(f, (32, 32))
        mixed = ops.MixedOp(4, 1)(torch.randn(2, 4, 8, 8), torch.full((11,), 1 / 11))
    assert logits.dtype == m.dtype == mixed.dtype == torch.float32  # Eq. 2's sum and the heads in fp32
    assert torch.equal(logits, heads(f.float(), (32, 32))[0])


def random_batchnorm(model, seed=0):
    """Running statistics and affine parameters far from their defaults: a fold that dropped gamma,
    beta, the mean or the variance would change the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            if m.affine:
                m.weight.data.copy_(1 + 0.5 * torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(0.5 * torch.randn(m.num_features, generator=g))
    return model


@pytest.mark.parametrize("arch", ["add", "resnet18"])
def test_folded_batchnorm_gives_the_same_logits_with_no_batchnorm_left_after_a_conv(arch):
    torch.manual_seed(0)
    model = add.ADD(GENOTYPE, 8, add.d2_layout(2, 1), 2) if arch == "add" else train.Baseline(arch)
    x = torch.rand(3, 3, 32, 32)
    plain = random_batchnorm(model).eval()(x)
    before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded = add.fold_batchnorm(model, 32)
    left = [name for name, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if arch == "resnet18":  # conv1/bn1 and each block's bn1, bn2 are attributes, the downsample's in a Sequential
        assert before == 20 and left == []
    else:  # only FactorizedReduce's BatchNorm is left: it follows a concatenation, not a convolution
        assert left and all(name.endswith(".bn") for name in left)
    assert torch.allclose(folded(x)[0], plain[0], rtol=1e-4, atol=1e-4)
    if arch == "add":
        assert torch.allclose(folded(x)[1], plain[1], atol=1e-5)


class Tangled(torch.nn.Module):
    """Convolution -> BatchNorm pairs that must not fold: an in-place ReLU between them, an in-place add
    between them, an output with a second consumer, a convolution called twice; and one clean pair."""
    def __init__(self):
        super().__init__()
        for k in range(1, 6):
            setattr(self, f"c{k}", torch.nn.Conv2d(3, 3, 3, padding=1))
            setattr(self, f"b{k}", torch.nn.BatchNorm2d(3))

    def forward(self, x):
        a = self.b1(F.relu(self.c1(x), inplace=True))
        y = self.c2(x)
        y += x
        b = self.b2(y)
        z = self.c3(x)
        c = self.b3(z) + z
        d = self.b4(self.c4(self.c4(x)))
        e = self.b5(self.c5(x))
        return (a + b + c + d + e).mean((2, 3))[:, :2], None


def test_folding_leaves_every_batchnorm_whose_input_is_not_a_convolutions_own_output():
    torch.manual_seed(0)
    model, x = random_batchnorm(Tangled()).eval(), torch.rand(2, 3, 16, 16)
    expected = model(x)[0]
    folded = add.fold_batchnorm(model, 16)  # no error: the tangled pairs stay as they were
    assert [k for k in range(1, 6) if isinstance(getattr(folded, f"b{k}"), torch.nn.BatchNorm2d)] == [1, 2, 3, 4]
    assert torch.allclose(folded(x)[0], expected, atol=1e-5)


def test_a_non_finite_loss_is_caught_within_its_window():
    check = add.FiniteCheck(torch.device("cpu"), 4, "lower --lr")
    for step, value in enumerate([1.0, float("nan"), 1.0]):
        check.add(torch.tensor(value), step, False, "epoch 3")  # read every 4 steps: no error yet
    with pytest.raises(add.Diverged, match=r"non-finite loss at epoch 3, within steps 1-4; lower --lr"):
        check.add(torch.tensor(1.0), 3, False, "epoch 3")
    fine = add.FiniteCheck(torch.device("cpu"), 2, "")
    for step in range(5):
        fine.add(torch.tensor(0.5), step, step == 4, "epoch 1")
    assert fine.start == 5


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="torch.compile needs a C compiler")
def test_compile_runs_a_training_step(tmp_path, capsys):
    # the smallest ADD: one block of one cell of identity edges (still the stem, the cell's 1x1 convolutions, both
    # heads): inductor compiles its training and its inference step in ~10 s on 2 cores
    cheap = ops.Genotype(*[tuple(("skip_connect", i) for node in range(4) for i in (0, 1))] * 2)
    ops.save_genotype(cheap, str(tmp_path / "cheap.json"))
    metrics = train.main(["--genotype", str(tmp_path / "cheap.json"), "--benchmark", "--compile", "--image-size", "32",
                          "--channels", "4", "--batch-size", "4", "--blocks", "1", "--cells-per-block", "1"])
    assert "; compilation " in capsys.readouterr().out and metrics["add"]["train"] > 0


def test_default_model_size_is_in_the_papers_range():
    cfg = dict(train.REAL_DATA, arch="add", blocks=3, mask_weight=1.0)
    n = add.count_parameters(train.build_model(cfg, GENOTYPE))
    assert 4.5e6 < n < 6.5e6  # paper, Table IV: 5.6 M


def test_table_v_mask_weight_zero_keeps_the_branch_and_no_mask_branch_removes_it():
    args = train.parse_args(["--genotype", "unused.json", "--mask-weight", "0"])
    model = train.build_model(vars(args), GENOTYPE)  # Eq. 6 with an unsupervised m, Eq. 7 with alpha = 0
    logits, m = model(torch.rand(2, 3, 64, 64))
    assert model.heads.mask is not None and m.shape == (2, 1, 64, 64)
    y = torch.tensor([0, 1])
    loss = add.add_loss(*add.loss_terms(logits, m, y, torch.ones(2, 1, 64, 64)), args.mask_weight)
    assert torch.equal(loss, F.cross_entropy(logits, y))  # Eq. 7 with alpha = 0: the cross-entropy alone
    loss.backward()
    assert model.heads.mask.weight.grad.abs().sum() > 0  # m unsupervised, still trained through Eq. 6's f * m
    args = train.parse_args(["--genotype", "unused.json", "--no-mask-branch"])  # Eq. 4 alone
    model = train.build_model(vars(args), GENOTYPE)
    assert args.mask_weight == 0 and model.heads.mask is None and not any("heads.mask" in k for k in model.state_dict())
    assert model(torch.rand(2, 3, 64, 64))[1] is None


def test_eq6_the_classifier_sees_the_features_times_the_predicted_region():
    torch.manual_seed(0)
    heads = random_batchnorm(add.Heads(16, 32, mask=True)).eval()
    f, other = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)  # the last features of two batches of images
    with torch.no_grad():
        logits, m = heads(f, (32, 32))
        assert not torch.allclose(logits, heads(other, (32, 32))[0], atol=1e-3) and m.shape == (2, 1, 32, 32)
        m = torch.sigmoid(heads.mask(f))  # m at f's resolution
        assert torch.allclose(logits, heads.fc(heads.conv(f * m).mean((2, 3))), atol=1e-6)  # FC(f * m)
        heads.mask.weight.zero_()
        heads.mask.bias.fill_(-1e4)  # m = 0 everywhere: the classifier sees f * 0
        assert torch.equal(heads(f, (32, 32))[0], heads(other, (32, 32))[0])  # the logits ignore the image
        heads.mask.bias.fill_(1e4)  # m = 1: Eq. 4's FC(f)
        assert torch.allclose(heads(f, (32, 32))[0], heads.fc(heads.conv(f).mean((2, 3))), atol=1e-6)


def test_loss_is_eq7():
    logits, labels = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    m, M = torch.rand(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    ce = -torch.log_softmax(logits, -1)[torch.arange(4), labels].mean()
    mse = ((M - m) ** 2).mean()
    assert torch.allclose(add.add_loss(*add.loss_terms(logits, m, labels, M), 10.0), ce + 10 * mse)
    assert add.loss_terms(logits, None, labels, M)[1] is None
    assert torch.allclose(add.add_loss(*add.loss_terms(logits, None, labels, M), 10.0), ce)


def test_thirty_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = add.ADD(GENOTYPE, 8, add.d2_layout(3, 1), stem_reductions=2)
    args = train.parse_args(["--genotype", "unused.json", "--lr", "2e-3", "--batch-size", "8"])
    optimizer, _ = train.make_optimizer(model, args)
    batch = tiny_batch(8, 32)
    first = train.train_epoch(model, [batch] * 5, optimizer, torch.device("cpu"), args)
    train.train_epoch(model, [batch] * 20, optimizer, torch.device("cpu"), args)
    last = train.train_epoch(model, [batch] * 5, optimizer, torch.device("cpu"), args)
    assert sum(last) < 0.6 * sum(first) and last[0] < 0.6 * first[0]  # Eq. 7, and its cross-entropy alone


def test_acc_auc_and_video_aggregation_match_hand_computation():
    probs = np.array([0.9, 0.7, 0.2, 0.4, 0.6, 0.1, 0.55, 0.3])
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    pos, neg = probs[labels == 1], probs[labels == 0]
    auc = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])  # Mann-Whitney
    acc = np.mean((probs > 0.5) == labels)
    got = train.scores(labels, probs)
    assert (got["acc"], got["auc"]) == pytest.approx((acc, auc))
    videos = ["b", "b", "a", "a", "c", "a", "d", "c"]
    video_probs, video_labels = train.video_level(probs, labels, videos)
    assert video_probs == pytest.approx([(0.2 + 0.4 + 0.1) / 3, 0.8, (0.6 + 0.3) / 2, 0.55])
    assert video_labels.tolist() == [0, 1, 1, 0]
    assert train.scores(np.array([1, 1]), np.array([0.7, 0.2]))["auc"] is None  # one class: no AUC


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = add.ADD(GENOTYPE, 4, add.d2_layout(2, 1), 2).eval()
    path = str(tmp_path / "m.pt")
    add.save_checkpoint(dict(model=model.state_dict()), path)
    again = add.ADD(GENOTYPE, 4, add.d2_layout(2, 1), 2).eval()
    add.load_state(again, add.load_checkpoint(path)["model"], path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x)[0], again(x)[0])
    other = add.ADD(GENOTYPE, 8, add.d2_layout(2, 1), 2)
    with pytest.raises(ops.InputError, match="does not match this configuration"):
        add.load_state(other, add.load_checkpoint(path)["model"], path)


def test_training_resumes_at_the_right_epoch_and_stops_on_nan(tmp_path, genotype_file, monkeypatch, capsys):
    out = str(tmp_path / "run")
    argv = TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "3", "--out", out]
    real_terms, calls = train.loss_terms, []

    def nan_in_epoch_2(logits, *args):  # one training step an epoch (12 samples, batches of 8)
        calls.append(1)
        return (logits.sum() * float("nan"), None) if len(calls) == 2 else real_terms(logits, *args)

    monkeypatch.setattr(train, "loss_terms", nan_in_epoch_2)
    with pytest.raises(add.Diverged, match="non-finite loss at epoch 2, within steps 1-1"):
        train.main(argv)
    assert train.load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 1  # the last good one, intact
    monkeypatch.undo()
    metrics = train.main(argv + ["--resume"])
    assert "resumed" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3]
    assert metrics["test"]["frames"] == 6 and os.path.exists(os.path.join(out, "masks.png"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny trained runs: ADD on the swap family (tested on mouth and gan) and resnet18."""
    tmp = tmp_path_factory.mktemp("trained")
    ops.save_genotype(GENOTYPE, str(tmp / "g.json"))
    add_run, r18_run = str(tmp / "add"), str(tmp / "r18")
    metrics = train.main(TINY_TRAIN + ["--genotype", str(tmp / "g.json"), "--epochs", "2", "--out", add_run,
                                       "--methods", "swap", "--test-methods", "mouth,gan"])
    base = train.main(TINY_TRAIN + ["--arch", "resnet18", "--epochs", "1", "--out", r18_run, "--synthetic", "hard"])
    return dict(add=add_run, add_metrics=metrics, r18=r18_run, r18_metrics=base, tmp=tmp)


def test_protocols_cross_manipulation_and_baseline(trained):
    metrics, base = trained["add_metrics"], trained["r18_metrics"]
    assert metrics["test"]["data"] == "synthetic:mouth,gan" and metrics["val"]["data"] == "synthetic:swap"
    assert base["parameters"] > 11e6 and base["mask_weight"] == 0.0
    for run in (trained["add"], trained["r18"]):  # every run folder: metrics, per-frame predictions, pictures
        for picture in ("roc.png", "curves.png", "masks.png"):
            assert Image.open(os.path.join(run, picture)).size[0] > 100
    log = [json.loads(line) for line in open(os.path.join(trained["add"], "log.jsonl"))]
    assert all(e["train_ce"] > 0 and e["train_mse"] > 0 and e["val_ce"] > 0 and e["val_mse"] > 0 for e in log)
    assert all(e["train_mse"] is None and e["val_mse"] is None for e in map(json.loads, open(os.path.join(trained["r18"], "log.jsonl"))))


def test_predictions_csv_reproduces_the_reported_metrics(trained):
    rows = list(csv.DictReader(open(os.path.join(trained["add"], "predictions.csv"))))
    assert list(rows[0]) == ["video", "method", "frame", "label", "p_fake"] and len(rows) == 6
    assert {r["method"] for r in rows} <= {"real", "mouth", "gan"}
    labels, probs = np.array([int(r["label"]) for r in rows]), np.array([float(r["p_fake"]) for r in rows])
    test = trained["add_metrics"]["test"]
    assert sklearn.metrics.roc_auc_score(labels, probs) == test["frame_auc"]
    assert sklearn.metrics.average_precision_score(labels, probs) == test["frame_ap"]
    assert np.mean((probs > 0.5) == labels) == test["frame_acc"]


def test_eval_only_takes_the_checkpoints_data_and_writes_a_new_folder(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    best = os.path.join(trained["r18"], "best.pt")
    before = os.path.getmtime(best), sorted(os.listdir(trained["r18"]))
    p_fake = lambda run: [float(r["p_fake"]) for r in csv.DictReader(open(os.path.join(run, "predictions.csv")))]
    train.main(["--eval-only", "--checkpoint", best])  # no data flags
    # the run's own data (the hard preset, 32 px, 6 videos of 1 frame; none of them the defaults) and network:
    # every test frame's score as the training run wrote it (BatchNorm folded here: equal to 1e-5)
    assert p_fake("runs/eval") == pytest.approx(p_fake(trained["r18"]), abs=1e-5) and len(set(p_fake("runs/eval"))) == 6
    config = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("config: "))
    assert all(f" {kv} " in config for kv in ("synthetic=hard", "image_size=32", "videos=6", "frames=1", "arch=resnet18",
                                              "batch_size=8", "epochs=1"))  # what is used is what it prints
    train.main(["--eval-only", "--checkpoint", best, "--synthetic", "easy"])
    assert p_fake("runs/eval-2") != pytest.approx(p_fake(trained["r18"]), abs=1e-5)  # a flag overrides the checkpoint's
    own = train.main(["--eval-only", "--checkpoint", os.path.join(trained["add"], "best.pt")])
    assert own["test"]["data"] == "synthetic:swap" and os.path.exists("runs/eval-3/eval.json")  # its methods, not its test's
    assert os.path.exists("runs/eval/predictions.csv") and Image.open("runs/eval/roc.png")
    assert (os.path.getmtime(best), sorted(os.listdir(trained["r18"]))) == before  # the training run untouched


def test_checkpoints_of_another_script_or_version_are_one_line_errors(trained, tmp_path):
    run = str(tmp_path / "search")
    search.main(TINY_SEARCH + ["--epochs", "1", "--out", str(tmp_path / "g.json"), "--run-dir", run])
    searched = os.path.join(run, "search.pt")
    for mode in (["--eval-only"], ["--predict", str(tmp_path / "g.png")]):
        with pytest.raises(ops.InputError, match="search.pt: a search checkpoint .search.py's search.pt., not a trained"):
            train.main(mode + ["--checkpoint", searched])
    old = torch.load(searched, weights_only=True)
    del old["config"]["partial_channels"]  # as a search of an earlier version saved it
    torch.save(old, searched)
    with pytest.raises(ops.InputError, match="search.pt: written by another version of this script .its configuration "
                                             "has no --partial-channels.; start a new run"):
        search.main(["--resume", "--run-dir", run])
    copy = str(tmp_path / "train")
    shutil.copytree(trained["add"], copy)
    last = torch.load(os.path.join(copy, "last.pt"), weights_only=True)
    del last["config"]["synthetic"], last["config"]["blocks"]
    torch.save(last, os.path.join(copy, "last.pt"))
    with pytest.raises(ops.InputError, match="last.pt: written by another version of this script"):
        train.main(["--resume", "--out", copy])
    with pytest.raises(ops.InputError, match="last.pt: written by another version of train.py .its configuration has no "
                                             "--blocks.; train it again"):
        train.main(["--eval-only", "--checkpoint", os.path.join(copy, "last.pt")])
    # a finished training of the previous versions: today's keys (pinned here) but none of the options added since
    shutil.rmtree(copy)
    shutil.copytree(trained["add"], copy)
    last = torch.load(os.path.join(copy, "last.pt"), weights_only=True)
    assert set(last) == {"model", "optimizer", "scheduler", "epoch", "rng", "config", "genotype", "best_auc"}
    for key in (*train.ADDED, "deterministic"):
        del last["config"][key]
    torch.save(last, os.path.join(copy, "last.pt"))
    assert train.main(["--resume", "--out", copy])["test"] == trained["add_metrics"]["test"]  # it resumes: the test runs
    for checkpoint, out in ((os.path.join(copy, "last.pt"), "eval"), (os.path.join(trained["add"], "last.pt"), "today")):
        assert train.main(["--eval-only", "--checkpoint", checkpoint, "--out", str(tmp_path / out)])
    evaluated = [json.load(open(tmp_path / out / "eval.json"))["test"] for out in ("eval", "today")]
    assert evaluated[0] == evaluated[1] and evaluated[0]["frames"] == 6  # the same data (data seed 0), the same scores


def test_ap_and_eer_match_independent_computations():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(0.25 * labels + rng.normal(0.4, 0.2, 200), 0, 1).round(2)  # ties included
    got = train.scores(labels, probs)
    # AP by its definition: sum over thresholds of (recall step) x precision, from the sorted scores
    ap, tp, fp, last_recall = 0.0, 0, 0, 0.0
    for t in np.unique(probs)[::-1]:
        tp, fp = (labels[probs >= t] == 1).sum(), (labels[probs >= t] == 0).sum()
        ap += (tp / labels.sum() - last_recall) * tp / (tp + fp)
        last_recall = tp / labels.sum()
    assert got["ap"] == pytest.approx(ap) == pytest.approx(sklearn.metrics.average_precision_score(labels, probs))
    # EER: where FPR = FNR on the ROC, by root finding on its linear interpolation
    fpr, tpr, _ = sklearn.metrics.roc_curve(labels, probs)
    eer = scipy.optimize.brentq(lambda x: 1.0 - x - scipy.interpolate.interp1d(fpr, tpr)(x), 0.0, 1.0)
    assert got["eer"] == pytest.approx(eer, abs=1e-9) and 0.1 < eer < 0.5
    assert train.scores([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["eer"] == 0.0  # perfectly separated
    assert train.scores([0, 1, 1, 1, 1], [0.6, 0.7, 0.8, 0.9, 0.1])["bacc"] == pytest.approx((0 + 3 / 4) / 2)


def test_predict_scores_videos_photos_and_folders_and_reports_the_rest(trained, face_video, tmp_path, capsys):
    photo, folder, faceless, corrupt = (str(tmp_path / n) for n in ("astronaut.jpg", "frames", "grey.mp4", "bad.mp4"))
    Image.fromarray(astronaut()).save(photo)
    os.makedirs(folder)
    for t in (1, 2, 10):  # natural order: 1, 2, 10
        Image.fromarray(np.roll(astronaut(), 3 * t, axis=1)).save(os.path.join(folder, f"{t}.png"))
    write_video(faceless, [np.full((128, 128, 3), 90, np.uint8)] * 3)
    open(corrupt, "wb").write(os.urandom(3000))
    out = str(tmp_path / "predicted")
    report = train.main(["--predict", face_video, photo, folder, faceless, corrupt, "--checkpoint",
                         os.path.join(trained["add"], "best.pt"), "--frames", "4", "--out", out])
    lines = capsys.readouterr().out.splitlines()
    video = report[face_video]
    assert video["frames_scored"] == 4 and [f["frame"] for f in video["frames"]] == [0, 2, 3, 5]  # 4 of 6 frames
    assert video["p_fake"] == pytest.approx(np.mean([f["p_fake"] for f in video["frames"]]))
    assert video["verdict"] == ("fake" if video["p_fake"] > 0.5 else "real") and len(video["frames"][0]["box"]) == 4
    assert report[photo]["frames_scored"] == 1 and report[folder]["frames_scored"] == 3
    assert report[faceless]["reason"].startswith("no face found in 3 frame(s)")
    assert report[corrupt]["reason"].startswith("unreadable")
    assert any(line.startswith(f"{face_video}: p(fake) ") and "(4 of 4 frames scored)" in line for line in lines)
    assert f"{faceless}: no face found in 3 frame(s)" in lines
    assert json.load(open(os.path.join(out, "predictions.json")))[photo]["frames"][0]["frame"] == 0
    pictures = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert len(pictures) == 3 and all(Image.open(os.path.join(out, p)).size[0] > 200 for p in pictures)
    baseline = train.main(["--predict", photo, "--checkpoint", os.path.join(trained["r18"], "best.pt"), "--out", out])
    assert 0 <= baseline[photo]["p_fake"] <= 1 and os.path.exists(out + "-2/predictions.json")  # no m: crops and scores


def test_predict_user_mistakes_are_one_line_errors(trained, tmp_path):
    code, _, err = run_cli("train.py", "--predict", str(tmp_path / "missing.mp4"), "--checkpoint",
                           os.path.join(trained["add"], "best.pt"))
    assert code == 1
    one_line_error(err, "missing.mp4: no such file or folder (expected a video, a folder of frames or a photo)")
    code, _, err = run_cli("train.py", "--predict", str(tmp_path))
    one_line_error(err, "--predict needs --checkpoint PATH")


def test_cross_dataset_from_prepared_ffpp_to_celebdf(tmp_path, genotype_file, ffpp, celebdf):
    metrics = train.main(["--genotype", genotype_file, "--data", "ff++", "--root", ffpp[1], "--methods",
                          "Deepfakes,FaceSwap", "--test-data", "celeb-df", "--test-root", celebdf[1], "--image-size",
                          "32", "--channels", "4", "--cells-per-block", "1", "--stem-reductions", "2", "--epochs",
                          "1", "--batch-size", "4", "--workers", "0", "--log-every", "0", "--visualize", "0",
                          "--out", str(tmp_path / "run")])
    assert metrics["test"]["data"] == "celeb-df:Celeb-synthesis" and metrics["test"]["frames"] == 2
    on_synthetic = train.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--test-data", "synthetic",
                               "--out", str(tmp_path / "eval")])  # from real data to the built-in one: the demo's test split
    assert on_synthetic["test"]["data"] == "synthetic:swap,mouth,gan" and on_synthetic["test"]["frames"] == 640


def test_runs_on_prepared_ffpp_with_loader_workers_finish_and_exit(tmp_path, ffpp, face_video):
    # as a user runs them on real data: processes with 2 loader workers each. The cyclic garbage collector is off,
    # so that what a library keeps until the exit stays (matplotlib keeps a frame of the training loop, and the
    # loaders with it); a finished run must still exit, its workers ended
    as_run = f"import gc, runpy, sys; gc.disable(); sys.path.insert(0, {HERE!r}); sys.argv = sys.argv[1:]; " \
             "runpy.run_path(sys.argv[0], run_name='__main__')"
    data = ["--data", "ff++", "--root", ffpp[1], "--methods", "Deepfakes,FaceSwap", "--image-size", "32", "--channels", "4",
            "--stem-reductions", "2", "--batch-size", "4", "--epochs", "1", "--workers", "2"]
    for argv in (["search.py", *data, "--cells", "3", "--steps-per-epoch", "2", "--out", "g.json"],
                 ["train.py", "--genotype", "g.json", *data, "--cells-per-block", "1", "--visualize", "2", "--out", "t"],
                 ["train.py", "--eval-only", "--checkpoint", "t/best.pt", "--workers", "2", "--out", "e"],
                 ["train.py", "--predict", face_video, "--checkpoint", "t/best.pt", "--frames", "2", "--out", "p"]):
        p = subprocess.run([sys.executable, "-c", as_run, os.path.join(HERE, argv[0]), *argv[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)  # a hang is a TimeoutExpired
        assert p.returncode == 0 and p.stdout.rstrip().splitlines()[-1].startswith("wrote"), (argv, p.stderr[-2000:])
    assert ops.load_genotype(str(tmp_path / "g.json")) and os.path.exists(tmp_path / "e" / "eval.json")


@pytest.mark.parametrize("arch", ["xception", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5",
                                  "shufflenet_v2_x1_0", "mnasnet0_5"])
def test_the_hand_designed_networks_train_a_step_in_the_harness_of_add(arch):
    torch.manual_seed(0)
    args = train.parse_args(["--arch", arch, "--lr", "1e-3"])
    assert args.mask_weight == 0.0 and args.genotype_origin is None and args.small_input  # Eq. 4 alone; the built-in data
    model = train.build_model(vars(args), None)
    assert last_map(model) == 4 and last_map(train.Baseline(arch)) == 2  # a 64 px face: 4x4 as in ADD, not ImageNet's 2x2
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))  # mnasnet's: 0.0003
    assert not any(getattr(m, "p", 0) for m in model.modules() if isinstance(m, torch.nn.Dropout) or "Stochastic" in type(m).__name__)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]  # initialised to its inputs, as ADD's
    assert classifier.weight.abs().max() <= 1 / math.sqrt(classifier.in_features) and classifier.out_features == 2
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, _ = train.make_optimizer(model, args)
    ce, mse = train.train_epoch(model, [tiny_batch(4, 32)], optimizer, torch.device("cpu"), args)
    assert math.isfinite(ce) and mse is None and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def last_map(net):
    """The size of the last convolution's, pool's or BatchNorm's output on a 64 px face: the map the classifier pools."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: sizes.append(min(out.shape[-2:])))
             for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.BatchNorm2d))]
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, 64, 64))[1] is None
    for hook in hooks:
        hook.remove()
    return sizes[-1]


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_table_ivs_networks_end_on_4x4_maps_too(arch):
    assert last_map(train.Baseline(arch, small_input=True)) == 4 and last_map(train.Baseline(arch)) == 2


def test_xception_has_chollets_parameter_count():
    # Keras's Xception: 22,855,952 trainable parameters with ImageNet's 1000 classes; a 2-class head has 998 x 2049 fewer
    assert add.count_parameters(train.xception(1000)) == 22_855_952
    assert add.count_parameters(train.Baseline("xception")) == 22_855_952 - 998 * 2049


def test_the_data_seed_draws_another_synthetic_data_set_and_zero_keeps_todays():
    default = train.datasets(train.parse_args(["--genotype", "g.json", "--videos", "4", "--frames", "1"]))[0]
    assert torch.equal(default.images, masks.SyntheticFaces("train", list(masks.SYNTHETIC_METHODS), 4, 1, 64, seed=0).images)
    other = train.datasets(train.parse_args(["--genotype", "g.json", "--videos", "4", "--frames", "1", "--data-seed", "3"]))[0]
    assert torch.equal(other.images, masks.SyntheticFaces("train", list(masks.SYNTHETIC_METHODS), 4, 1, 64, seed=3).images)
    assert not torch.equal(default.images, other.images)


def fake_run(folder, cfg, test, val, train_ce=0.3):
    """A finished train.py run folder as --compare reads it: config.json, metrics.json, log.jsonl."""
    os.makedirs(folder)
    genotype = train.genotype_dict(ops.load_genotype(cfg["genotype"])) if cfg["arch"] == "add" else None
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    json.dump(dict(parameters=1000 * len(cfg["arch"]) + cfg["channels"], genotype=genotype, val=dict(frame_auc=val),
                   test=dict(frame_auc=test, video_auc=test)), open(os.path.join(folder, "metrics.json"), "w"))
    open(os.path.join(folder, "log.jsonl"), "w").write(json.dumps(dict(epoch=1, train_ce=train_ce, train_images=64,
                                                                      train_seconds=2.0)) + "\n")


def test_compare_takes_the_architecture_as_the_unit(tmp_path, capsys):
    rng, runs, auc = np.random.default_rng(0), [], {}
    genotypes = {"s1": (GENOTYPE, "search"), "s2": (ops.Genotype(GENOTYPE.reduce, GENOTYPE.normal), "search (DARTS-PT)"),
                 **{f"r{k}": (ops.random_genotype(k), "random") for k in range(3)}}
    for name, (genotype, origin) in genotypes.items():
        ops.save_genotype(genotype, str(tmp_path / f"{name}.json"), origin)
    archs = [dict(arch="add", genotype=str(tmp_path / f"{n}.json")) for n in genotypes] + \
        [dict(arch="mobilenet_v3_small"), dict(arch="shufflenet_v2_x0_5")]
    for a, arch in enumerate(archs):
        for seed in (0, 1, 2):
            cfg = vars(train.parse_args(["--arch", arch["arch"]] + (["--genotype", arch["genotype"]] if "genotype" in arch else [])
                                        + ["--seed", str(seed), "--data-seed", str(seed)]))
            auc[a, seed] = round(float(rng.uniform(0.6, 0.95)), 4)
            runs.append(str(tmp_path / f"{a}-{seed}"))
            fake_run(runs[-1], cfg, auc[a, seed], auc[a, seed] - 0.01)
    fake_run(str(tmp_path / "chance"), dict(cfg, seed=3), 0.5, 0.5, train_ce=0.69)  # a fourth shufflenet run that did not train
    rows = train.main(["--compare", *runs, str(tmp_path / "chance"), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    means = [statistics.mean(auc[a, s] for s in range(3)) for a in range(len(archs))]
    assert sorted(r["frame_auc"] for r in rows) == pytest.approx(sorted(means)) and len(rows) == 7
    shuffle = next(r for r in rows if r["name"] == "shufflenet_v2_x0_5")
    assert (shuffle["n"], shuffle["at_chance"]) == (3, 1) and "1 at chance, left out" in out

    def welch(a, b):  # by hand: Welch's t interval
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
        d = statistics.mean(a) - statistics.mean(b)
        return d, d - scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb), d + scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    for other, b in (("random", means[2:5]), ("hand-designed", means[5:])):
        d, low, high = welch(means[:2], b)  # n = architectures (2 searched, 3 random, 2 hand-designed), not runs
        assert f"searched - {other}: {d:+.3f} [{low:+.3f}, {high:+.3f}] test frame AUC (Welch's 95% interval over " \
               f"architectures: 2 and {len(b)})" in out
    diffs = [auc[0, s] - auc[5, s] for s in range(3)]  # the first searched cell against mobilenet_v3_small, seed by seed
    d, half = statistics.mean(diffs), scipy.stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert f"  s1 C16 N1 - mobilenet_v3_small: {d:+.3f} [{d - half:+.3f}, {d + half:+.3f}] (paired by seed, 3 seeds)" in out
    assert len(list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))) == 7 and Image.open(tmp_path / "cmp" / "pareto.png")
    sweep = []  # an lr sweep of one network on two selection seeds: the pick by mean validation AUC
    for lr, val in (("1e-3", (0.80, 0.84)), ("3e-3", (0.86, 0.85)), ("1e-2", (0.50, 0.90))):  # 1e-2's first at chance:
        for seed, v in zip((100, 101), val):  # it counts in the pick (mean 0.70), or 1e-2 would win by its other run
            sweep.append(str(tmp_path / f"lr{lr}-{seed}"))
            fake_run(sweep[-1], vars(train.parse_args(["--arch", "mnasnet0_5", "--lr", lr, "--seed", str(seed)])), 0.9, v,
                     train_ce=0.69 if v == 0.5 else 0.3)
    train.main(["--compare", *sweep, "--out", str(tmp_path / "cmp-lr")])
    out = capsys.readouterr().out
    assert "lr pick, mnasnet0_5 -: 0.003 of 0.001, 0.003, 0.01 (mean validation frame AUC 0.855)" in out and "edge" not in out
    train.main(["--compare", *sweep[:4], "--out", str(tmp_path / "cmp-lr2")])
    assert "0.003 of 0.001, 0.003 (mean validation frame AUC 0.855); at the grid's edge: extend it" in capsys.readouterr().out
    with pytest.raises(ops.InputError, match="nothing: not a finished train.py run folder"):
        train.main(["--compare", str(tmp_path / "nothing")])


def test_both_scripts_flush_subnormal_floats(tmp_path):
    """Weights that decay towards zero (a run at chance, under weight decay) go subnormal, which x86
    computes slowly: an Adam step of mobilenet_v3_small from such a run took 3.3 s, 0.4 s flushed."""
    subnormal = torch.finfo(torch.float32).tiny / 4
    try:
        for main, argv in ((search.main, ["--random-genotype", "1", "--out", str(tmp_path / "r.json")]),
                           (train.main, ["--compare", str(tmp_path / "nothing")])):
            torch.set_flush_denormal(False)
            assert (torch.tensor([subnormal]) * 1).item() > 0
            with contextlib.suppress(ops.InputError):
                main(argv)
            assert (torch.tensor([subnormal]) * 1).item() == 0
    finally:
        torch.set_flush_denormal(False)


def test_benchmarks_run(genotype_file, capsys):
    args = train.parse_args(["--genotype", genotype_file, "--benchmark", "--benchmark-against", "resnet18", "--image-size",
                             "32", "--channels", "4", "--batch-size", "4"])
    result = train.benchmark(args, torch.device("cpu"), steps=2, rounds=2)
    search.benchmark(search.parse_args(TINY_SEARCH + ["--benchmark", "--profile"]), torch.device("cpu"), steps=2)
    out = capsys.readouterr().out
    assert set(result) == {"add", "resnet18"} and all(v["train"] > 0 and v["inference"] > 0 for v in result.values())
    assert "add / resnet18: training " in out and "search step" in out and "peak memory" in out
    assert "profile of one step: " in out and "operator calls" in out and "aten::" in out


def test_a_batch_larger_than_the_training_split_is_an_error(tmp_path, genotype_file):
    with pytest.raises(ops.InputError, match="--batch-size 64: the train split has only 12 samples"):
        train.main(TINY_TRAIN + ["--genotype", genotype_file, "--batch-size", "64", "--out", str(tmp_path)])
    with pytest.raises(ops.InputError, match="--sync-bn: torch's SyncBatchNorm runs on CUDA devices only"):
        train.main(TINY_TRAIN + ["--genotype", genotype_file, "--sync-bn", "--device", "cpu", "--out", str(tmp_path)])


def test_bad_genotype_and_checkpoint_paths_are_one_line_errors(tmp_path):
    code, _, err = run_cli("train.py", "--genotype", str(tmp_path / "missing.json"))
    assert code == 1
    one_line_error(err, "missing.json: no such genotype file")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    code, _, err = run_cli("train.py", "--eval-only", "--checkpoint", str(corrupt))
    assert code == 1
    one_line_error(err, "corrupt.pt: not a readable checkpoint")


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, genotype_file, capsys):
    out = str(tmp_path / "run")
    first = train.main(TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "1", "--out", out, "--visualize", "0"])
    best = open(os.path.join(out, "best.pt"), "rb").read()
    capsys.readouterr()
    train.main(TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "1", "--out", out, "--visualize", "0", "--seed", "1"])
    assert capsys.readouterr().out.splitlines()[0] == f"run folder: {out}-2"
    assert open(os.path.join(out, "best.pt"), "rb").read() == best and len(open(os.path.join(out, "log.jsonl")).readlines()) == 1
    assert json.load(open(os.path.join(out, "metrics.json"))) == first


def test_training_stopped_by_signals_to_its_process_group_resumes_to_the_same_metrics(tmp_path, genotype_file):
    argv = ["--genotype", genotype_file, "--videos", "8", "--frames", "1", "--image-size", "32", "--channels", "4",
            "--batch-size", "4", "--epochs", "4", "--workers", "2", "--log-every", "0", "--visualize", "0"]
    killed, script = str(tmp_path / "killed"), os.path.join(HERE, "train.py")
    code, _, err = run_cli(script, *argv, "--out", str(tmp_path / "whole"))  # the run to compare with, a process too
    assert code == 0, err[-2000:]
    whole = json.load(open(tmp_path / "whole" / "metrics.json"))
    last = os.path.join(killed, "last.pt")
    epoch_of = lambda: torch.load(last, weights_only=True)["epoch"] if os.path.exists(last) else 0
    pattern = r"stopped by SIGINT (?:in epoch \d, after step \d of 4|at the end of epoch \d); the last checkpoint, " + \
              re.escape(last) + r", holds epoch (\d): continue with python train.py --resume --out " + re.escape(killed)
    held = 0
    for sig in (signal.SIGINT, signal.SIGKILL):  # Ctrl-C in epoch 2 or later, then a kill once the resumed run saved an epoch
        p = in_own_group(script, *argv, "--out", killed) if sig == signal.SIGINT else \
            in_own_group(script, "--resume", "--out", killed)
        assert wait_for(p, last, lambda state: state["epoch"] > held)
        os.killpg(p.pid, sig)  # the training process and its loader workers
        _, err = p.communicate()
        if sig == signal.SIGINT:  # stopped after the step the signal came in; the message names the checkpoint
            held, = stop_message(err, pattern)
            assert p.returncode == 1 and held == epoch_of() >= 1 and not os.path.exists(os.path.join(killed, "metrics.json"))
    code, out, err = run_cli(script, "--resume", "--out", killed)
    assert code == 0 and "resumed" in out, err[-2000:]
    resumed = json.load(open(os.path.join(killed, "metrics.json")))
    assert resumed["test"] == whole["test"] and resumed["val"] == whole["val"]


def test_a_stop_in_the_last_epoch_or_the_final_test_ends_in_one_line_and_resume_runs_the_test(tmp_path, genotype_file,
                                                                                                  monkeypatch):
    argv = TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "2", "--visualize", "0"]
    whole = train.main(argv + ["--out", str(tmp_path / "whole")])

    def signalled(real, when):  # `real`, which sends this process SIGINT (Ctrl-C) on its `when`-th call
        calls = []

        def wrapper(*a, **k):
            calls.append(1)
            if len(calls) == when:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        return wrapper
    for name, when, where in (("train_epoch", 2, "at the end of epoch 2"), ("report", 1, "during the final test")):
        out = str(tmp_path / name)
        monkeypatch.setattr(train, name, signalled(getattr(train, name), when))
        with pytest.raises(add.Stopped) as stop:
            train.main(argv + ["--out", out])
        assert str(stop.value) == f"stopped by SIGINT {where}; the last checkpoint, {out}/last.pt, holds epoch 2: " \
                                  f"python train.py --resume --out {out} runs the test"
        assert not os.path.exists(os.path.join(out, "metrics.json"))
        monkeypatch.undo()
        assert train.main(["--resume", "--out", out])["test"] == whole["test"]
    monkeypatch.setattr(train, "report", signalled(train.report, 1))
    with pytest.raises(add.Stopped, match="^stopped by SIGINT during the evaluation; nothing is lost: run it again$"):
        train.main(["--eval-only", "--checkpoint", str(tmp_path / "whole" / "best.pt"), "--out", str(tmp_path / "eval")])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def worker_of_rank(launcher, rank):
    """The pid of the torchrun worker of this rank: a child of the launcher (in a session of its own)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            if parent == launcher and f"RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                return pid
        except (OSError, ValueError, IndexError):  # gone meanwhile
            pass


def test_a_stop_reaches_every_torchrun_process_at_the_next_step_and_resumes(tmp_path, genotype_file):
    out = str(tmp_path / "ddp")
    argv = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *TINY_TRAIN, "--videos", "32", "--genotype",
            genotype_file, "--epochs", "3", "--device", "cpu", "--visualize", "0", "--out", out]  # 8 steps an epoch
    last = os.path.join(out, "last.pt")
    end = r"; the last checkpoint, " + re.escape(last) + r", holds epoch \d: continue with python train.py --resume --out " \
        + re.escape(out)
    # rank 1 alone, in epoch 2: both stop after the same step, the next (rank 0 learns of it from their agreement);
    # then torchrun's group, as `timeout` or a scheduler signals it (torchrun passes it on to its workers)
    p = in_own_group(*argv, "--log-every", "1", stdout=subprocess.PIPE)
    while "epoch 2 step 2/8" not in p.stdout.readline() and p.poll() is None:  # rank 0's progress line of each step
        pass
    os.kill(worker_of_rank(p.pid, 1), signal.SIGTERM)
    for resume, pattern in (([], r"stopped by a signal to another process in epoch 2, after step [2-7] of 8" + end),
                            (["--resume"], r"stopped by SIGTERM (in epoch \d, after step \d of 8|at the end of epoch \d)" + end)):
        if resume:
            p, held = in_own_group(*argv, *resume), torch.load(last, weights_only=True)["epoch"]
            assert wait_for(p, last, lambda state: state["epoch"] != held)
            os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate()
        ours = [line for line in err.splitlines() if line.startswith("stopped by")]  # torchrun adds its own traceback
        assert p.returncode != 0 and len(ours) == 1 and 'train.py", line' not in err, err[-3000:]
        assert re.fullmatch(pattern, ours[0]), ours[0]
    code, stdout, err = run_cli(*argv, "--resume")  # two processes again, to the end
    assert code == 0, err[-2000:]
    assert "2 process(es) on cpu" in stdout and stdout.count("epoch 3/3") == 1  # only rank 0 logs
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3]
    assert json.load(open(os.path.join(out, "metrics.json")))["test"]["frames"] == 32


def test_torchrun_with_a_batch_that_does_not_divide_is_a_one_line_error(tmp_path, genotype_file):
    code, _, err = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *TINY_TRAIN,
                           "--genotype", genotype_file, "--batch-size", "7", "--device", "cpu", "--out", str(tmp_path))
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0 and ours == ["error: --batch-size 7: the global batch must divide by the 2 processes (e.g. --batch-size 6)"]
    assert "train.py\", line" not in err  # no traceback from train.py (torchrun adds its own failure summary)


# ----------------------------------------------------------------------------------------------
# README: the map of the paper cannot go stale

def test_readme_maps_the_paper_to_functions_that_hold_their_tags():
    lines = open(os.path.join(HERE, "README.md")).read().splitlines()
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
                assert any(line.split("#")[0].strip() for line in source.splitlines() if tag in line), (name, tag)
            found.add(tag)
    assert {f"# Eq. {k}" for k in range(1, 8)} | {"# Algorithm 1", "# Fig. 2", "# Sec. III-C"} <= found


# ----------------------------------------------------------------------------------------------
# The README's main job, end to end at a reduced size

def test_readme_demo_search_then_train(tmp_path):
    code, out, err = run_cli(os.path.join(HERE, "search.py"), *TINY_SEARCH, "--epochs", "1", cwd=tmp_path)
    assert code == 0, err
    assert ops.load_genotype(str(tmp_path / "g.json")) and os.path.exists(tmp_path / "g.png")
    code, out, err = run_cli(os.path.join(HERE, "train.py"), "--genotype", "g.json", *TINY_TRAIN, "--epochs", "1",
                             cwd=tmp_path)
    assert code == 0, err
    assert "frame_auc" in out and json.load(open(tmp_path / "runs/train/metrics.json"))["test"]["frame_auc"] is not None
    assert os.path.exists(tmp_path / "runs/train/masks.png")
    assert json.load(open(tmp_path / "runs/search/config.json"))["image_size"] == 32  # the effective config, saved
