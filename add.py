"""The ADD network (Fig. 2), its two heads, its loss and its update (Sec. III-B to III-D; Eq. 3-7).

- d2_layout, ADD: a stem, then D^2 blocks of N normal cells, a reduction cell between blocks, built
  from a genotype (ops.Cell); with genotype=None every edge is a MixedOp: the search network.
- Heads: the mask head (m, Sec. III-C) and the classifier fed with f (Eq. 4) or f * m (Eq. 6).
- loss_terms, add_loss: Eq. 5-7, CE' + alpha * MSE (this alpha weighs the mask loss: the paper
  reuses the architecture's letter; the flag is --mask-weight).
- gradient_step: one update on that loss: the search's w and alpha steps (Eq. 3), a training step.
Below the divider, written once for both scripts: Table IV's networks (torchvision's and Xception),
Run (stop signals, the votes of several processes, non-finite losses, progress), several processes
(torchrun), the data, checkpoints and resume, the device, BatchNorm folding, the benchmark's timer,
the plotting helper.
"""
import argparse
import contextlib
import csv
import json
import os
import resource
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from masks import (FFPP_METHODS, METHODS, SYNTHETIC_METHODS, SYNTHETIC_PRESETS, InputError,
                   atomic_write, bounded, hull_mask, jpeg, reason, synthetic_frame, usable_cpus,
                   write_text)
from ops import STEPS, Cell, genotype_edges, search_edges

GRAD_CLIP = 5.0  # gradient norm of every w update (DARTS's value; the paper does not say)
# the paper's network at 256 px: N 4 (Sec. IV-D), C 48
PAPER_SIZE = dict(channels=48, cells_per_block=4, stem_reductions=3)
DEMO_SIZE = dict(channels=16, cells_per_block=1, stem_reductions=2)  # the demo's at 64 px
BLOCKS = 3  # D^2 blocks (Fig. 2)


def d2_layout(blocks, cells_per_block):
    """Fig. 2(a): `blocks` D^2 blocks of N normal cells, a reduction cell between consecutive
    blocks. d2_layout(3, 4) -> 4 normal, reduce, 4 normal, reduce, 4 normal (True marks a reduction
    cell)."""
    layout = []
    for b in range(blocks):
        # a reduction cell, then a D^2 block
        layout += [True] * (b > 0) + [False] * cells_per_block  # Fig. 2
    return layout


def stem(C_out, reductions):
    """3x3 conv-BN(-ReLU) layers, one per halving (stride 2): 256 px faces -> 32x32 features with 3
    reductions; with 0, one stride-1 layer (3 -> C_out channels at full size). The paper does not
    describe its stem: one chain ending at 3C channels (DARTS's stem multiplier), a layer a
    halving."""
    layers, C_in, n = [], 3, max(1, reductions)
    for i in range(n):
        C = C_out if i == n - 1 else C_out // 2
        layers += [nn.Conv2d(C_in, C, 3, 2 if reductions else 1, 1, bias=False), nn.BatchNorm2d(C),
                   nn.ReLU()]
        C_in = C
    return nn.Sequential(*layers[:-1])  # the cells' ReLU-Conv-BN start with their own ReLU


class Heads(nn.Module):
    """The two heads on the last features f (Sec. III-B, III-C). Mask: m' = sigmoid(1x1 conv(f)) at
    f's resolution, bilinearly up-sampled to the input's: m, compared with the hull mask M by Eq. 5.
    The classifier: f * m' (Eq. 6), a 1x1 conv, global average pooling, two FC layers.
    mask=False: Eq. 4."""
    def __init__(self, C_in, hidden, mask):
        super().__init__()
        self.mask = nn.Conv2d(C_in, 1, 1) if mask else None
        self.conv = nn.Sequential(nn.Conv2d(C_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                  nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    # f (B, c, h', w'); size: the input's (H, W) -> logits (B, 2), m (B, 1, H, W) or None
    def forward(self, f, size):
        # in fp32 even under bf16 autocast: bf16 logits (8 bits of mantissa) tie in blocks and bias
        # AUC
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            if self.mask is None:
                return self.classify(f), None  # Eq. 4: FC(f)
            m = torch.sigmoid(self.mask(f))  # (B, 1, h', w') in [0, 1]
            logits = self.classify(f * m)  # Eq. 6: FC(f * m), m at f's resolution (B, 1, h', w')
            # m at the input's size
            return logits, F.interpolate(m, size=size, mode="bilinear", align_corners=False)

    # (B, c, h', w') -> (B, 2): 1x1 conv, global average pooling, two FC layers
    def classify(self, f):
        return self.fc(self.conv(f).mean((2, 3)))


class ADD(nn.Module):
    """Fig. 2: stem -> cells (layout from d2_layout) -> heads. Returns (logits (B, 2), m (B, 1, H,
    W) or None). Channels double at each reduction cell; each cell outputs STEPS * C channels.
    partial: the search network's partial channels (ops.MixedOp), unused with a genotype."""
    def __init__(self, genotype, C, layout, stem_reductions=3, mask=True, hidden=256, partial=1):
        super().__init__()
        C_stem = 3 * C  # DARTS's stem multiplier
        self.stem = stem(C_stem, stem_reductions)
        C_pp, C_p, C_cur, reduction_prev = C_stem, C_stem, C, False
        self.cells = nn.ModuleList()
        for reduction in layout:
            C_cur *= 2 if reduction else 1
            # a genotype is (normal, reduce): indexed by the reduction flag
            edges = search_edges() if genotype is None else genotype_edges(genotype[reduction])
            self.cells.append(Cell(edges, C_pp, C_p, C_cur, reduction, reduction_prev,
                                   genotype is not None, partial))
            C_pp, C_p, reduction_prev = C_p, STEPS * C_cur, reduction
        self.heads = Heads(C_p, hidden, mask)

    # x (B, 3, H, W); weights: (normal, reduce), each as Cell.forward takes it
    def forward(self, x, weights=None):
        s0 = s1 = self.stem(x)  # (B, 3C, H/2^r, W/2^r)
        for cell in self.cells:
            w = None if weights is None else weights[cell.reduction]  # (normal, reduce)
            s0, s1 = s1, cell(s0, s1, w)  # Fig. 2: each cell takes the outputs of the two before it
        return self.heads(s1, x.shape[-2:])


def loss_terms(logits, m, labels, M):
    """The two terms of Eq. 7, in fp32: CE' (Eq. 6; Eq. 4 without a mask branch), the cross-entropy
    of logits computed from f * m, and MSE (Eq. 5), the mean over pixels of (M - m)^2 averaged over
    the batch (None without a mask branch: m is None)."""
    ce = F.cross_entropy(logits.float(), labels)  # Eq. 6 (Eq. 4 without a mask branch)
    # mean over pixels and batch of (M - m)^2
    mse = None if m is None else F.mse_loss(m.float(), M)  # Eq. 5
    return ce, mse


def add_loss(ce, mse, mask_weight):
    """Eq. 7: L = CE' + alpha * MSE (CE' alone without a mask branch), alpha = mask_weight."""
    return ce if mse is None else ce + mask_weight * mse  # Eq. 7


def gradient_step(model, optimizer, batch, device, mask_weight, flips=None, penalty=None, clip=True,
                  world=1):
    """One update of the optimizer's parameters on one batch with the loss of Eq. 7 -> the detached
    (CE, MSE, loss) on the device (MSE 0 without a mask branch). In the search it is Eq. 3's L(y;
    F(x, alpha, w)): w on a training batch (Algorithm 1, lines 2-4) or alpha on a validation batch
    (lines 5-7), and only the gradients of those parameters are computed, so the alpha step does not
    pay for w's. penalty: a term added to the loss (search.py's parameter term); clip: the gradient
    norm to GRAD_CLIP (w's updates); world > 1: the processes' gradients averaged before (the
    search: DDP cannot wrap a network whose alpha step leaves w without gradients)."""
    # faces (B, 3, H, W), hull masks M (B, 1, H, W), labels (B,)
    x, M, y = to_device(batch, device, flips)
    with autocast(device):
        logits, m = model(x)
    ce, mse = loss_terms(logits, m, y, M)
    # L(y; F(x, alpha, w)), the network's own loss (Eq. 7)
    loss = add_loss(ce, mse, mask_weight)  # Eq. 3
    if penalty:
        loss = loss + penalty()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad()  # grads set to None (torch >= 2.0's default)
    loss.backward(inputs=params)
    if world > 1:
        average_gradients(params, world)
    if clip:
        nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    # w = w - grad_w L (line 4), or alpha = alpha - grad_alpha L (line 7), by the optimizer's rule
    optimizer.step()
    return torch.stack([ce, ce * 0 if mse is None else mse, loss]).detach()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ==============================================================================================
# Below: not the paper's method. How search.py and train.py run, written once for both.

# Table IV's hand-designed networks and the small ones of the field, in ADD's harness
BASELINES = ("resnet18", "resnet152", "vgg16", "xception", "efficientnet_b0", "mobilenet_v2",
             "mobilenet_v3_small", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "mnasnet0_5")


class Baseline(nn.Module):
    """A hand-designed classifier from scratch (nothing is downloaded) in ADD's harness (Table IV),
    returning (logits, None): Eq. 4 alone. torchvision's, or Xception (below). ADD's rule for every
    network: BatchNorm momentum 0.1 (torchvision's mnasnet keeps 0.0003), no dropout or stochastic
    depth (ADD has none), the last layer initialised as nn.Linear (mnasnet's and efficientnet's
    scale with 1/classes: the CE would start at 3.8), Adam with weight decay on every parameter
    (train.make_optimizer). small_input: the first stride-2 layer at stride 1 (a pool removed), as
    CIFAR variants do: a 64 px face ends on 4x4, as in ADD."""
    def __init__(self, arch, small_input=False):
        super().__init__()
        if arch == "xception":
            self.net = Xception(2)
        else:  # imported here: 1.2 s at every start that an ADD run does not need
            import torchvision
            self.net = getattr(torchvision.models, arch)(weights=None, num_classes=2)
        for m in self.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
            # torchvision.ops.StochasticDepth
            if isinstance(m, nn.Dropout) or type(m).__name__ == "StochasticDepth":
                m.p = 0.0
        # the classifier's last layer
        [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1].reset_parameters()
        if small_input:  # the first in definition order, which is the order they run in: the stem
            first = next(m for m in self.net.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))
                         and m.stride in (2, (2, 2)))
            first.stride = 1
            # VGG's first pool: a pool of 1, none (at stride 1, 64 px would shrink to 63)
            if isinstance(first, nn.MaxPool2d):
                first.kernel_size = 1

    def forward(self, x):
        return self.net(x), None


def separable(C_in, C_out):
    """Xception's separable convolution and its BN: a depthwise 3x3, a pointwise 1x1, no bias."""
    return [nn.Conv2d(C_in, C_in, 3, 1, 1, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False), nn.BatchNorm2d(C_out)]


class XceptionBlock(nn.Module):
    """(ReLU, separable convolution, BN) from each width to the next (the entry flow's first block
    without its first ReLU), then a 3x3 stride-2 max pool where the block halves; plus the
    residual: the input, or where the block halves, a strided 1x1 convolution and BN of it."""
    def __init__(self, widths, stride, relu_first=True):
        super().__init__()
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ReLU(), *separable(a, b)]
        if stride > 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.body = nn.Sequential(*layers[0 if relu_first else 1:])
        self.skip = nn.Identity()
        if stride > 1:
            self.skip = nn.Sequential(nn.Conv2d(widths[0], widths[-1], 1, stride, bias=False),
                                      nn.BatchNorm2d(widths[-1]))

    def forward(self, x):
        return self.body(x) + self.skip(x)


class Xception(nn.Sequential):
    """Chollet's Xception (CVPR 2017), the network FaceForensics++ trains (torchvision has none):
    the entry flow (two 3x3 convolutions without padding, blocks to 128, 256 and 728 channels, each
    halving), the middle flow (8 blocks of three separable convolutions at 728), the exit flow (a
    block to 1024, separable convolutions to 1536 and 2048), global average pooling, a linear
    classifier. 22,855,952 parameters at 1,000 classes, as Keras counts Chollet's."""
    def __init__(self, classes):
        blocks = [XceptionBlock([64, 128, 128], 2, relu_first=False),
                  XceptionBlock([128, 256, 256], 2), XceptionBlock([256, 728, 728], 2)]
        blocks += [XceptionBlock([728] * 4, 1) for _ in range(8)]
        blocks.append(XceptionBlock([728, 728, 1024], 2))
        super().__init__(nn.Conv2d(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), *blocks,
                         *separable(1024, 1536), nn.ReLU(), *separable(1536, 2048), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, classes))


class Diverged(Exception):
    """A non-finite loss or state: the run stops, its last checkpoint stays as it was."""


class Stopped(BaseException):
    """A stop from outside: the run ends with this one line (no `except Exception` swallows it)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# steps between reads of the device's count of non-finite losses: the one host read between them
CHECK_EVERY = 50
PROGRESS_SECONDS = 600  # a progress line at a run's first check, then at most every 10 minutes


class Run:
    """What a run of either loop needs around its steps; a context manager.
    1) SIGTERM and SIGINT (`timeout`, a scheduler, Ctrl-C: sent to the process group; loader workers
       ignore them) set a flag step() reads after each step: a run ends at a step boundary, in one
       line. stop_now(line): from there on a signal raises Stopped(line) at once.
    2) The vote: with several processes each step combines every rank's stop flag and whether it saw
       a non-finite loss (MAX over a CPU group): all stop, or all end on a divergence, together;
       a failure in the work at an epoch's end (rank 0's files, every rank's scores) ends all
       (gather_or_fail).
    3) Non-finite losses, counted on the device, read every CHECK_EVERY steps and at an epoch's end:
       between two checks a step never waits for the device.
    4) Progress at a check: images/s and the time left (a search step that also moves alpha costs
       2 units).
    5) On exit the loaders' workers end (they would hang the interpreter's exit), then the handlers
       are put back: a second Ctrl-C meanwhile is still only a flag. A process of several ending on
       an error ignores the stop signals from then on instead (its line is printed last)."""
    def __init__(self, device, loaders=(), total=0, group=None, advice=""):
        self.device = device
        self.loaders = loaders
        self.total = total  # units of work (step's cost) this run does
        self.group = group  # gloo, over all processes; None in one process
        self.rank, self.world = rank_world(group)
        self.advice = advice  # what the divergence line advises
        self.signal = None  # the name of a stop signal received
        self.line = None  # stop_now's line
        self.bad = torch.zeros((), dtype=torch.int32, device=device)  # non-finite losses seen
        self.unread = 0  # steps since the last read of self.bad
        self.done = 0  # units of work done
        self.images = 0  # this process's training images
        self.start = time.time()
        self.printed = None  # when the last progress line was printed

    def __enter__(self):
        self.handlers = {s: signal.signal(s, self.receive) for s in STOP_SIGNALS}
        return self

    def __exit__(self, kind, *exc):
        if kind is not None and dist.is_initialized():  # the process ends (run_main): a signal
            self.handlers = dict.fromkeys(STOP_SIGNALS, signal.SIG_IGN)  # from torchrun's agent,
            ignore_stop_signals()  # sent once another process ended, must not cut its line
        for data in self.loaders:  # persistent workers, once started: ended as DataLoader does
            if getattr(data, "_iterator", None) is not None:
                data._iterator._shutdown_workers()
                data._iterator = None
        for s, handler in self.handlers.items():
            signal.signal(s, handler)

    def receive(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if self.line:
            self.stop_now(self.line)

    def stop_now(self, line):
        """From here on a signal raises Stopped(line, "{}" its name); one that came already, now."""
        self.line = line
        if self.signal:
            raise Stopped(line.replace("{}", self.signal))

    def vote(self, *flags):
        """Each flag combined over all processes (any rank's True is every rank's); one process:
        as is (every step votes: no tensor)."""
        if self.group is None:
            return [bool(f) for f in flags]
        t = torch.tensor([float(bool(f)) for f in flags])
        dist.all_reduce(t, dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in t]

    def on_rank0(self, work):
        """work() on rank 0 alone (files, the log, metrics), its failure (a full disk, a refused
        checkpoint) ending every process (gather_or_fail) -> its result, on every process."""
        return gather_or_fail(work if self.rank == 0 else lambda: None, self.group)[0]

    def check_weights(self, model, epoch):
        """At an epoch's end, before anything uses them: weights or statistics made non-finite by
        an update (after a finite loss) end every process with one line (Diverged)."""
        if self.vote(nonfinite(model.state_dict()))[0]:
            raise Diverged(f"non-finite weights after epoch {epoch + 1}'s last update; "
                           f"{self.advice}")

    def step(self, loss, images, epoch, step, steps, cost=1):
        """After a step (loss: its 0-dim loss on the device) -> whether to stop now, as every rank;
        a non-finite loss on any rank raises Diverged on all."""
        self.bad += (~torch.isfinite(loss.detach())).int()
        self.unread += 1
        self.done += cost
        self.images += images
        if (step + 1) % CHECK_EVERY and step + 1 < steps:
            return self.vote(self.signal)[0]  # between checks: nothing read from the device
        stop, bad = self.vote(self.signal, self.bad.item())
        if bad:
            raise Diverged(f"non-finite loss at epoch {epoch + 1}, within steps "
                           f"{step + 2 - self.unread}-{step + 1}; {self.advice}")
        self.unread = 0
        if self.printed is None or time.time() - self.printed > PROGRESS_SECONDS:
            self.progress(loss)
        return stop

    def progress(self, loss):
        self.printed = time.time()
        elapsed = self.printed - self.start
        left = elapsed / self.done * (self.total - self.done)
        left = f"{left / 3600:.1f} h" if left >= 7200 else f"{left / 60:.1f} min"
        print(f"  loss {loss.item():.4f}, {self.images * self.world / elapsed:.1f} training "
              f"images/s on {self.world} x {self.device}; the rest takes about {left}", flush=True)


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun): one a GPU, every one running the same script

def init_distributed(device_name):
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK -> (rank, world size, device, a gloo group for the
    votes and gathers: None in one process). A process per GPU (nccl: LOCAL_RANK's) or per CPU
    slot (gloo); --device cuda:N in one process: GPU N (its kernels and pinned memory). Ranks
    other than 0 print no progress: their lines would repeat rank 0's."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if "RANK" not in os.environ:
        if device.type == "cuda" and device.index is not None:  # "cuda": the current GPU
            torch.cuda.set_device(device)
        return 0, 1, device, None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world, device, dist.new_group(backend="gloo")


def rank_world(group):
    """(this process's rank, the number of processes): (0, 1) without a group."""
    return (dist.get_rank(), dist.get_world_size()) if group is not None else (0, 1)


def one_process(flag):
    """--benchmark, --predict, --compare, --random-genotype: one process's work; under torchrun,
    one line."""
    if "RANK" in os.environ:
        raise InputError(f"{flag} runs in one process: run it with python, not torchrun")


def split_batch(batch_size, world):
    """--batch-size is the global batch: each of `world` processes takes an equal share."""
    if batch_size % world:
        raise InputError(f"--batch-size {batch_size}: the global batch must divide by the {world} "
                         f"processes (e.g. --batch-size {batch_size // world * world or world})")
    return batch_size // world


def average_gradients(params, world):
    """Every process's gradients of params replaced by their mean over the processes, in one
    all-reduce (DDP's arithmetic: the sum of grad / world), so that every process takes the same
    step."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(world)
    dist.all_reduce(flat)
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def all_ranks(t, group):
    """Every process's value of a tensor, (processes, *t.shape), on the host (a read of the device:
    at an epoch's end and at a checkpoint only)."""
    return torch.stack(gather(t.detach().cpu(), group))


def gather(part, group):
    """Every process's part (any picklable value) -> the parts in rank order, on every process;
    one process: [part]."""
    if group is None:
        return [part]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part, group=group)
    return parts


def gather_or_fail(work, group):
    """work() on every process -> the results in rank order, on every process; whatever fails on one
    ends them all together, the process it failed on raising it, the others Diverged with its
    message and process: every process's line says why (run_main)."""
    try:
        result, error = work(), None
    except Exception as e:
        result, error = None, e
    parts = gather((result, None if error is None else str(error)), group)
    failed = [f"{message} (process {rank})" for rank, (_, message) in enumerate(parts)
              if message is not None]
    if failed:
        raise error or Diverged(failed[0])
    return [result for result, _ in parts]


def run_main(main):
    """A script's entry: main(), every end a user can act on as one line on stderr, no traceback
    (InputError: a mistake; Diverged: non-finite numbers; Stopped: a signal; OSError: a full disk, a
    file that cannot be read). Under torchrun each process ends in its line, "process N: " before
    the others', written at once (two processes' lines never interleave), then leaves without the
    interpreter's finalization, where gloo's threads can abort it (SIGABRT)."""
    rank = int(os.environ.get("RANK", 0))
    try:
        main()
    except (InputError, Diverged, OSError) as e:
        line = f"error: {e}"
    except Stopped as e:
        line = str(e)
    else:
        return
    finally:
        if dist.is_initialized():  # torchrun's agent signals the rest once one process ended:
            ignore_stop_signals()  # their lines must not be cut short
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.write(f"process {rank}: {line}\n" if rank else f"{line}\n")
    sys.stderr.flush()
    if "RANK" in os.environ:
        os._exit(1)
    sys.exit(1)


def ignore_stop_signals(worker_id=None):
    """A loader worker's worker_init_fn: the stop signals are the main process's to handle."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def loader(dataset, batch_size, workers, device, sampler, drop_last=False):
    """A DataLoader as both scripts use it: persistent workers that ignore the stop signals and hand
    over uint8 batches (to_device), pinned for a GPU; its workers' seeds drawn from a generator of
    its own, not the global one a checkpoint saves (a resumed epoch starts its loader again)."""
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=workers, worker_init_fn=ignore_stop_signals,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      generator=torch.Generator())


def loader_workers(data):
    """Loader workers a process: none for the in-memory synthetic data, else its share of the CPUs
    (of the processes torchrun starts on this machine), at most 8."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return 0 if data == "synthetic" else min(8, max(1, usable_cpus() // processes))


# ----------------------------------------------------------------------------------------------
# The data both scripts open, and its options

class FaceCrops(Dataset):
    """Frames prepared by masks.py, through manifest.csv (PNGs a person can open; a sample decodes
    in ~2.6 ms). A sample: image (3, S, S) and mask (1, S, S) in {0, 1}, uint8; label;
    "method/video"; samples[i] = (method, video, frame). FF++ has four fakes per real video: in
    training each real frame is repeated round(#fake / #real) times, so that an epoch sees both
    classes equally often."""
    def __init__(self, root, split, methods, train, image_size):
        manifest = f"{root}/manifest.csv"
        if not os.path.exists(manifest):
            raise InputError(f"{root}: no prepared data ({manifest} is missing); run masks.py "
                             f"first, "
                             f"e.g. python masks.py --data ff++ --src DOWNLOAD_ROOT --root {root}")
        with open(manifest) as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == split
                    and (r["label"] == "0" or r["method"] in methods)]
        fakes = sum(r["label"] == "1" for r in rows)
        if not fakes or fakes == len(rows):
            raise InputError(f"{manifest}: the {split} split has {len(rows) - fakes} real and "
                             f"{fakes} fake frames "
                             f"of methods {','.join(methods)}; both classes are needed")
        repeat = max(1, round(fakes / (len(rows) - fakes))) if train else 1
        self.rows = [r for r in rows for _ in range(repeat if r["label"] == "0" else 1)]
        self.root, self.size = root, (image_size, image_size)
        self.labels = [int(r["label"]) for r in self.rows]
        self.samples = [(r["method"], r["video"], int(r["frame"])) for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        image = Image.open(os.path.join(self.root, r["image"]))
        mask = Image.open(os.path.join(self.root, r["mask"]))
        if image.size != self.size:
            image = image.resize(self.size, Image.BILINEAR)
            mask = mask.resize(self.size, Image.NEAREST)
        image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # (3, S, S) uint8
        mask = torch.from_numpy(np.asarray(mask) > 127).to(torch.uint8)[None]  # (1, S, S) in {0, 1}
        return image, mask, self.labels[i], f"{r['method']}/{r['video']}"


class SyntheticFaces(Dataset):
    """The built-in data: `videos` real videos of `frames` frames and, for each, the same video
    faked frame by frame (as FF++ makes its fakes) by family methods[j % len(methods)];
    deterministic by (seed, split, preset), drawn into memory (~3 ms a pair at 64 px). A sample as
    FaceCrops gives it: a face of random identity, pose, lighting and background, the hull mask of
    its 68 landmarks."""
    def __init__(self, split, methods, videos, frames, size, seed, preset="easy"):
        # disjoint people per split
        first = {"train": 0, "val": 1_000_000, "test": 2_000_000}[split]
        images, points, self.labels, self.samples = [], [], [], []
        for v in range(first, first + videos):
            family = methods[v % len(methods)]
            for t in range(frames):
                s = synthetic_frame(seed, v, t, size, family, SYNTHETIC_PRESETS[preset])
                for label, kind in enumerate(("real", "fake")):
                    images.append(np.uint8(np.round(255 * s[kind])))
                    points.append(s[f"{kind}_points"])
                    self.labels.append(label)
                    self.samples.append((family if label else "real", f"{v:07d}", t))
        quality = SYNTHETIC_PRESETS[preset]["jpeg"]
        images = [jpeg(i, quality) for i in images] if quality else images
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        self.masks = torch.from_numpy(np.stack([hull_mask(p, size) for p in points]))[:, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        method, video, _ = self.samples[i]
        return self.images[i], self.masks[i], self.labels[i], f"{method}/{video}"


def add_data_arguments(p):
    p.add_argument("--data", choices=tuple(METHODS), help="synthetic (built in, the default), "
                   "ff++ or celeb-df (prepared by masks.py)")
    p.add_argument("--root", help="prepared data folder (default: data/<name>)")
    p.add_argument("--methods", help="manipulations to use, comma-separated (default: all; ff++: "
                   + ",".join(FFPP_METHODS) + "; synthetic: " + ",".join(SYNTHETIC_METHODS) + ")")
    p.add_argument("--image-size", type=bounded(int, 8),
                   help="input size (paper: 256, Sec. IV-B; synthetic demo: 64)")
    p.add_argument("--synthetic", choices=tuple(SYNTHETIC_PRESETS),
                   help="synthetic only: the benchmark's preset (easy, the default: the demo; "
                   "hard: JPEG-compressed, re-noised fakes, to compare networks)")
    p.add_argument("--videos", type=bounded(int, 2),
                   help="synthetic only: real videos in the train split (val, test: half)")
    p.add_argument("--frames", type=bounded(int, 1),
                   help="frames per video: synthetic data (default 4), --predict (default 32)")
    p.add_argument("--data-seed", type=bounded(int, 0), help="synthetic only: the seed its people, "
                   "scenes and fakes are drawn with (default 0)")
    p.add_argument("--workers", type=bounded(int, 0), help="DataLoader workers per process "
                   "(default: 0 on synthetic data, else the CPUs this process may use / processes "
                   "per node, at most 8)")


def open_split(args, split, methods, train, **other):
    """One split of args.data (or of the data `other` names: data, root, videos, frames), as
    (image, mask, label, video) samples from any of the three sources."""
    cfg = dict(vars(args), **other)
    if cfg["data"] == "synthetic":
        videos = cfg["videos"] if split == "train" else max(2, cfg["videos"] // 2)
        return SyntheticFaces(split, methods, videos, cfg["frames"], cfg["image_size"],
                              cfg["data_seed"], cfg["synthetic"])
    root = cfg["root"] or os.path.join("data", cfg["data"])
    return FaceCrops(root, split, methods, train, cfg["image_size"])


# ----------------------------------------------------------------------------------------------
# The configuration, checkpoints and the log

def resolve_defaults(args, real, demo):
    """Every option left unset (None): the demo's on the built-in data (the default), else the real
    data's (the paper's but for the departures)."""
    args.data = args.data or "synthetic"
    for key, value in dict(demo if args.data == "synthetic" else real, synthetic="easy",
                           data_seed=0).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def save_checkpoint(state, path):
    """A plain dict of tensors and plain values (loads with weights_only=True), written atomically;
    refused (Diverged, the file on disk intact) if a floating tensor holds a NaN or an infinity:
    every checkpoint is one a run can continue from."""
    name = nonfinite(state)
    if name:
        raise Diverged(f"{name} holds a non-finite value: {path} was not written (the one on disk "
                       "is intact)")
    atomic_write(path, lambda f: torch.save(state, f))


def nonfinite(state):
    """The dotted name of a floating tensor in nested dicts, lists and tuples that holds a NaN or an
    infinity, or None; one wait a device, not one a tensor."""
    flags = {}  # device -> {name: whether finite (0-dim, on the device)}
    for name, t in _tensors(state):
        if t.is_floating_point():
            flags.setdefault(t.device, {})[name] = t.isfinite().all()
    for finite in flags.values():
        for name, ok in zip(finite, torch.stack(list(finite.values())).tolist()):
            if not ok:
                return name


def _tensors(obj, name=""):
    """(dotted name, tensor) for every tensor in nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        yield name, obj
    if isinstance(obj, (list, tuple)):
        obj = dict(enumerate(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}.{k}" if name else str(k))


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such checkpoint")
    except Exception as e:  # torch.load raises many types on a corrupt file; all mean the same here
        raise InputError(f"{path}: not a readable checkpoint ({reason(e)})")


def resume(path, given, expected, needed, built_in, schedule, trim=True):
    """--resume: the checkpoint at path, and the configuration to continue with: the options given
    on this command line win, else the checkpoint's (expected: the options of a run of this version;
    needed: the state's keys besides the model). A checkpoint of another script, or of a version
    that lacks an option or set one this version builds in (built_in: name -> value) otherwise, is
    an InputError; so is a change to an option the restored optimizers and schedules hold
    (schedule). The log beside it is trimmed to its epochs (trim_log). -> (configuration, state)"""
    state = load_checkpoint(path)
    given = {k: v for k, v in vars(given).items() if v is not None}  # False and 0 too
    saved = state.get("config") if isinstance(state, dict) else None
    lacking = ["config"]
    if isinstance(saved, dict):
        lacking = [k for k in ("model", *needed) if k not in state]
    if lacking:
        raise InputError(f"{path}: not a checkpoint this script can resume (its state has no "
                         f"{lacking[0]}: written by another version, or another script); start a "
                         "new run")
    missing = [f"--{k.replace('_', '-')}" for k in expected if k not in saved and k not in given]
    changed = [f"--{k.replace('_', '-')} {saved[k]} (built in here: {v})"
               for k, v in built_in.items() if saved.get(k, v) != v]
    if missing or changed:
        why = f"it ran with {', '.join(changed)}"
        if missing:
            why = f"its configuration has no {', '.join(missing[:3])}"
        raise InputError(f"{path}: written by another version of this script ({why}); "
                         "start a new run")
    changing = [k for k in schedule if k in given and given[k] != saved.get(k)]
    if changing:
        raise InputError(f"{path}: its optimizer and schedule hold "
                         f"--{changing[0].replace('_', '-')} {saved.get(changing[0])}, "
                         "and a resumed run keeps them; start a new run to change it")
    if trim:
        trim_log(os.path.join(os.path.dirname(path), "log.jsonl"), state["epoch"])
    return argparse.Namespace(**{**{k: saved.get(k) for k in expected}, **given}), state


def restore(state, modules, path):
    """A resumed run: each module's state from state[key] ({key: module}: the network, optimizers,
    schedulers), and the CPU generator's; nothing draws from a CUDA generator (no dropout)."""
    for key, module in modules.items():
        load_state(module, state[key], path, key)
    torch.set_rng_state(state["rng"])


def load_state(module, state, path, what="model"):
    """load_state_dict with a one-line error when the checkpoint was made for another network."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"{path}: the checkpoint's {what} does not match this configuration "
                         f"({reason(e)})")


def append_log(path, line):
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def trim_log(path, epochs):
    """log.jsonl of a resumed run: only the lines of the epochs its checkpoint holds. An epoch's
    line is written before its checkpoint: a kill between the two leaves a line too many (or half of
    one)."""
    lines, keep = [], []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["epoch"] <= epochs:
                keep.append(line + "\n")
    write_text(path, "".join(keep))


def new_run_dir(path, group=None):
    """A fresh run never overwrites an earlier one: PATH if it is new or empty, else PATH-2,
    PATH-3...; under torchrun rank 0's choice, for every process."""
    k, candidate = 1, path
    while os.path.isdir(candidate) and os.listdir(candidate):
        k += 1
        candidate = f"{path.rstrip(os.sep)}-{k}"
    if group is not None:
        chosen = [candidate]
        dist.broadcast_object_list(chosen, src=0, group=group)
        candidate = chosen[0]
    return candidate


def write_config(args, path):
    """Prints the configuration a run uses and keeps it beside its checkpoint (config.json)."""
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    write_text(path, json.dumps(vars(args), indent=1))


def scale_milestones(milestones, epochs):
    """The paper's learning-rate milestones (in epochs of 300) scaled to a shorter or longer run."""
    return sorted({max(1, round(m * epochs / 300)) for m in milestones})


# ----------------------------------------------------------------------------------------------
# Batches, the device, inference

def to_device(batch, device, flips=None):
    """A loader's (image uint8 (B, 3, H, W), mask uint8 (B, 1, H, W), label (B,), video) -> x float
    in [0, 1] channels_last, M float in {0, 1}, y, on the device (uint8 is a quarter of float32's
    bytes through workers and pinned memory). flips: the training augmentation's generator, or
    None."""
    x = batch[0].to(device, non_blocking=True, memory_format=torch.channels_last).float().div_(255)
    M, y = batch[1].to(device, non_blocking=True).float(), batch[2].to(device, non_blocking=True)
    return (*random_flips(x, M, flips), y) if flips is not None else (x, M, y)


def random_flips(x, M, generator):
    """Training augmentation (not in the paper): the same horizontal flip of a face and its mask,
    p = 0.5 per sample, drawn from a seeded generator (epoch_generator): a resumed run flips as an
    uninterrupted one, whatever the number of loader workers."""
    flip = torch.rand(len(x), generator=generator) < 0.5  # on the host: (B,)
    if x.device.type == "cuda":  # a copy from pinned memory, queued: the host does not wait
        flip = flip.pin_memory()
    flip = flip.to(x.device, non_blocking=True)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x), torch.where(flip, M.flip(-1), M)


def epoch_generator(*key):
    """A torch.Generator seeded by a tuple such as (seed, epoch, rank): independent streams per
    key."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))


def autocast(device):
    """bf16 autocast on a GPU that computes in bf16 (CUDA compute capability 8 and up: A100, H100,
    RTX 30 on); fp32 elsewhere: on the CPU bf16 is slower and gains nothing, on older GPUs it is
    emulated."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device):
    """Waits for queued GPU work (for timing); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_model(model, device):
    """The model on the device, channels_last (faster on the CPU too); on CUDA cuDNN times its
    kernels for the fixed input size, and what runs in fp32 (the heads, the losses) is fp32, not
    TF32."""
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.backends.cudnn.allow_tf32 = False
    return model.to(device, memory_format=torch.channels_last)


def fold_batchnorm(model):
    """Inference only: each BatchNorm right after a convolution is folded into it (BN(conv(x)) =
    conv'(x) with the running statistics), a pass over the activation saved. ADD's pairs are
    neighbours in an nn.Sequential; a hand-designed network's (torchvision's ResNet holds its own as
    attributes) are found by torch.fx's tracing. In place; returns the model in eval mode."""
    model.eval()
    if not isinstance(model, ADD):  # a Baseline
        model.net = fuse(model.net)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return model


# ----------------------------------------------------------------------------------------------
# --benchmark's timer, and the one plotting helper

def time_alternately(steps, device, calls, rounds, warmup=2):
    """--benchmark: each of `steps` ({name: step()}) timed in turn, A, B, A, B, ..., `rounds` rounds
    of `calls` calls after `warmup` (the allocator, cuDNN autotuning) -> the best seconds per call
    of each: a ratio measured in one run on one machine."""
    best = {name: float("inf") for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            for _ in range(warmup if r == 0 else 0):
                step()
            sync(device)
            tic = time.time()
            for _ in range(calls):
                step()
            sync(device)
            best[name] = min(best[name], (time.time() - tic) / calls)
    return best


def random_batch(batch_size, size):
    """A batch shaped like the loaders' (image uint8, mask uint8, label, video), for --benchmark."""
    return (torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8),
            torch.randint(0, 2, (batch_size, 1, size, size), dtype=torch.uint8),
            torch.randint(0, 2, (batch_size,)), None)


def peak_memory_mib(device):
    """Peak GPU memory allocated on CUDA, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def figure(rows, cols, size):
    """The plotting helper, with save_figure: a matplotlib figure of rows x cols panels (files
    only)."""
    import matplotlib  # here: ~0.5 s at the start of every run that draws nothing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def save_figure(fig, path, title=None):
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.85 if title else 1.0))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    fig.clf()
    plt.close(fig)
