"""Train and evaluate ADD (Sec. III-B to III-D, IV-B, IV-C), and point a trained detector at videos.

Read top to bottom, this file is the paper's training and evaluation:
- build_model: ADD from a searched genotype (add.py, Fig. 2), or a hand-designed baseline (Table IV).
- make_optimizer, train_epoch: Sec. IV-B's optimizer; one pass over the training split with Eq. 7.
- frame_scores, video_level, scores, evaluate: ACC and AUC (Sec. IV-B) per frame and per video, with
  the field's balanced ACC, AP and EER beside them.
- datasets, test_split: the splits (Sec. IV-A) and the protocols of Tables I-III.
- fit: the whole training; the epoch of the best validation AUC is tested once, at the end.
Below the divider, what the paper does not describe: the settings, the bookkeeping of a run (resume,
checkpoints, stop signals, DDP), reports and pictures (Fig. 9's masks), --eval-only, --predict (is
this video fake?), --compare, --benchmark and the command line.

    python train.py --genotype g.json                                       # built-in synthetic data (demo)
    python train.py --genotype g.json --data ff++ --methods Face2Face       # inner-dataset (Table I)
    python train.py --genotype g.json --data ff++ --methods Face2Face --test-methods FaceSwap   # Table II
    python train.py --genotype g.json --data ff++ --test-data celeb-df      # cross-dataset (Table III)
    python train.py --genotype g.json --mask-weight 0                       # without L_MSE (Table V)
    python train.py --arch resnet18 --data celeb-df                         # baseline (Table IV)
    python train.py --eval-only --checkpoint runs/train/best.pt --test-data celeb-df
    python train.py --predict clip.mp4 photo.jpg frames/ --checkpoint runs/train/best.pt
    python train.py --compare runs/train runs/train-2 ...                   # one table and pareto.png
    torchrun --nproc_per_node 4 train.py --genotype g.json --data ff++      # several GPUs (DDP)
    python train.py --genotype g.json --benchmark                           # images/s, peak memory
A run folder (--out; a new one beside it when it exists, unless --resume) holds config.json,
log.jsonl, last.pt, best.pt, metrics.json, predictions.csv, roc.png, curves.png and masks.png.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DistributedSampler

from add import (ADD, Diverged, FiniteCheck, StoppableRun, Stopped, add_loss, autocast, count_parameters, d2_layout,
                 epoch_generator, fold_batchnorm, load_checkpoint, load_state, loader, loss_terms, new_run_dir,
                 peak_memory_mib, pick_device, prepare_model, random_batch, restore, resumed_config,
                 save_checkpoint, scale_milestones, time_steps, to_device, trim_log)
from masks import (METHODS, READ_ERRORS, add_data_arguments, loader_workers, open_split, parse_methods, read_faces,
                   resolve_defaults)
from ops import InputError, Parser, atomic_write, bounded, genotype_from_dict, genotype_origin, load_genotype

# Table IV's hand-designed networks (XceptionNet: below), and the small ones the field uses (DeepfakeBench's
# EfficientNets, mobile networks)
BASELINES = ("resnet18", "resnet152", "vgg16", "xception", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small",
             "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "mnasnet0_5")


class Baseline(nn.Module):
    """A hand-designed classifier from scratch (nothing is downloaded) in ADD's harness (Table IV),
    returning (logits, None): it trains with Eq. 4 alone. The rule is ADD's, for every network:
    BatchNorm momentum 0.1 (torchvision's mnasnet keeps 0.0003: its running statistics would still
    be ~87% at their start after 480 steps), no dropout or stochastic depth (ADD has none), the
    classifier's last layer initialised as torch's nn.Linear, to its inputs (mnasnet's and
    efficientnet's scale with 1/classes: at 2 classes their first logits have a standard deviation
    of 2-3, the CE starts at 3.8), and, by make_optimizer, Adam with weight decay on every parameter.
    small_input: the first stride-2 layer at stride 1 (removed if a pool), as CIFAR variants do, so
    that a 64 px face ends on a 4x4 map as in ADD, not on ImageNet's 2x2."""
    def __init__(self, arch, small_input=False):
        super().__init__()
        if arch == "xception":
            self.net = xception()
        else:
            import torchvision  # here, not at the top: 1.2 s at every start that an ADD run does not need
            self.net = getattr(torchvision.models, arch)(weights=None, num_classes=2)
        for m in self.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
            if isinstance(m, nn.Dropout) or type(m).__name__ == "StochasticDepth":  # torchvision.ops.StochasticDepth
                m.p = 0.0
        [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1].reset_parameters()  # the classifier's last layer
        if small_input:  # the first in definition order, which is the order they run in: the stem
            first = next(m for m in self.net.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and m.stride in (2, (2, 2)))
            first.stride = 1
            if isinstance(first, nn.MaxPool2d):  # VGG's first pool: a pool of 1, none (at stride 1, 64 px would shrink to 63)
                first.kernel_size = 1

    def forward(self, x):
        return self.net(x), None


def xception_unit(C_in, C_out):
    """Xception's unit: ReLU, a separable 3x3 convolution (depthwise, then pointwise), BatchNorm."""
    return [nn.ReLU(), nn.Conv2d(C_in, C_in, 3, 1, 1, groups=C_in, bias=False), nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out)]


class XceptionBlock(nn.Module):
    """`units` Xception units, the first changing the width (grow_first; else the last), then a 3x3
    max-pool of `stride`, plus the block's input (a 1x1 conv-BN where the shape changes)."""
    def __init__(self, C_in, C_out, units, stride, relu_first=True, grow_first=True):
        super().__init__()
        widths = [C_in] + [C_out] * units if grow_first else [C_in] * units + [C_out]
        layers = [layer for a, b in zip(widths, widths[1:]) for layer in xception_unit(a, b)][0 if relu_first else 1:]
        self.body = nn.Sequential(*layers, *[nn.MaxPool2d(3, stride, 1)] * (stride > 1))
        self.skip = nn.Identity() if stride == 1 and C_in == C_out else \
            nn.Sequential(nn.Conv2d(C_in, C_out, 1, stride, bias=False), nn.BatchNorm2d(C_out))

    def forward(self, x):
        return self.body(x) + self.skip(x)


def xception(classes=2):
    """XceptionNet (Chollet, CVPR 2017), FaceForensics++'s detector and Table IV's fourth network:
    entry flow, a middle flow of 8 blocks at 728 channels, exit flow; 22.86 M parameters at ImageNet's
    1000 classes (Table IV's 23 M), 20.81 M at 2. torchvision has none, hence here."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # entry flow
        nn.Conv2d(32, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        XceptionBlock(64, 128, 2, 2, relu_first=False), XceptionBlock(128, 256, 2, 2), XceptionBlock(256, 728, 2, 2),
        *[XceptionBlock(728, 728, 3, 1) for _ in range(8)],  # middle flow
        XceptionBlock(728, 1024, 2, 2, grow_first=False),  # exit flow
        *xception_unit(1024, 1536)[1:], nn.ReLU(), *xception_unit(1536, 2048)[1:], nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, classes))


def build_model(cfg, genotype):
    """ADD from the genotype (Fig. 2: D^2 blocks of N cells; the mask branch unless no_mask_branch,
    Eq. 4 alone), or a baseline."""
    if cfg["arch"] != "add":
        return Baseline(cfg["arch"], cfg.get("small_input"))  # Table IV: a hand-designed network
    layout = d2_layout(cfg["blocks"], cfg["cells_per_block"])
    return ADD(genotype, cfg["channels"], layout, cfg["stem_reductions"], mask=not cfg.get("no_mask_branch"))


def make_optimizer(model, args):
    """Sec. IV-B: "an Adam optimizer with a momentum value of 0.9" (beta1) "and a weight decay of
    0.0005", lr 0.5, divided by 10 at epochs 80 and 140 of 300. Adam diverges at 0.5 and momentum SGD
    does not learn there (README, Departures: measured), so lr 0.5 is read as 0.5e-3; --optimizer sgd
    is the other reading."""
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), args.lr, betas=(args.momentum, 0.999), weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, scale_milestones(args.milestones, args.epochs), 0.1)


def train_epoch(model, data, optimizer, device, args, flips=None, after_step=None):
    """One pass over the training split with Eq. 7 -> (mean CE, mean MSE or None). The losses stay on
    the device. flips: the epoch's torch.Generator for the random horizontal flips (augmentation);
    after_step(step, steps, loss, images): the run's bookkeeping (TrainRun.after_step)."""
    model.train()
    sums, has_mask = torch.zeros(2, device=device), False  # CE, MSE
    for step, batch in enumerate(data):
        x, M, y = to_device(batch, device, flips)  # faces (B, 3, H, W), hull masks M (B, 1, H, W), labels (B,)
        with autocast(device):
            logits, m = model(x)
        ce, mse = loss_terms(logits, m, y, M)
        loss = add_loss(ce, mse, args.mask_weight)  # Eq. 7 (Table V without L_MSE: --mask-weight 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        has_mask = mse is not None
        sums += torch.stack([ce.detach(), mse.detach() if has_mask else torch.zeros_like(ce)])
        if after_step:
            after_step(step, len(data), loss, len(x))
    ce, mse = (sums / max(1, len(data))).tolist()
    return ce, mse if has_mask else None


# ----------------------------------------------------------------------------------------------
# Evaluation (Sec. IV-B's ACC and AUC, and the field's AP and EER), per frame and per video

@torch.no_grad()
def frame_scores(model, loader, device):
    """Every sample of the loader, in order, in fp32 (no autocast: scores must not tie) -> dict of
    arrays p (fake probability), label, ce, mse (None without a mask branch), and the video ids.
    Results stay on the device and are copied to the host once, at the end."""
    model.eval()
    out, videos = dict(p=[], label=[], ce=[], mse=[]), []
    for batch in loader:
        x, M, y = to_device(batch, device)
        logits, m = model(x)
        out["p"].append(logits.float().softmax(-1)[:, 1])
        out["ce"].append(F.cross_entropy(logits.float(), y, reduction="none"))
        if m is not None:
            out["mse"].append((m.float() - M).square().mean((1, 2, 3)))  # Eq. 5, per sample
        out["label"].append(y)
        videos += list(batch[3])
    return {k: torch.cat(v).cpu().numpy() if v else None for k, v in out.items()}, videos


def video_level(probs, labels, videos):
    """One prediction per video: the mean of its frames' fake probabilities (and its label)."""
    _, index = np.unique(np.asarray(videos), return_inverse=True)
    counts = np.bincount(index)
    return np.bincount(index, probs) / counts, np.bincount(index, labels) / counts


def equal_error_rate(labels, probs):
    """EER: the error rate where the ROC's false-positive rate equals its false-negative rate,
    linearly interpolated between the two ROC points around the crossing."""
    from sklearn.metrics import roc_curve  # imported where used: ~1 s of every start that never scores (search.py)
    fpr, tpr, _ = roc_curve(labels, probs)
    gap = (1 - tpr) - fpr  # FNR - FPR, decreasing along the curve from 1 to -1
    i = int(np.argmax(gap <= 0))
    t = gap[i - 1] / (gap[i - 1] - gap[i]) if i > 0 else 0.0
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1])) if i > 0 else float(fpr[0])


def scores(labels, probs, threshold=0.5):
    """ACC and AUC (Sec. IV-B): ACC at the threshold, ROC AUC; beside them balanced ACC (the mean of
    the per-class accuracies: FF++'s test split is 1 real to 4 fakes), AP (fake = positive) and EER.
    The ranking metrics are None when one class is missing."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    labels, correct = np.asarray(labels).round(), (np.asarray(probs) > threshold) == np.asarray(labels).round()
    out = dict(acc=float(correct.mean()), bacc=float(np.mean([correct[labels == c].mean() for c in np.unique(labels)])))  # ACC
    two = len(np.unique(labels)) == 2
    out.update(auc=float(roc_auc_score(labels, probs)) if two else None,  # AUC (Sec. IV-B)
               ap=float(average_precision_score(labels, probs)) if two else None,
               eer=equal_error_rate(labels, probs) if two else None)
    return out


def evaluate(model, loader, device, threshold=0.5):
    """-> (metrics: frames, videos, frame_* and video_* scores, ce, mse; per-frame outputs)."""
    out, videos = frame_scores(model, loader, device)
    video_probs, video_labels = video_level(out["p"], out["label"], videos)
    metrics = dict(frames=len(out["p"]), videos=len(video_labels),  # ACC and AUC, per frame and per video
                   **{f"frame_{k}": v for k, v in scores(out["label"], out["p"], threshold).items()},
                   **{f"video_{k}": v for k, v in scores(video_labels, video_probs, threshold).items()},
                   ce=float(out["ce"].mean()), mse=None if out["mse"] is None else float(out["mse"].mean()))
    return metrics, dict(out, videos=videos)


# ----------------------------------------------------------------------------------------------
# The protocols (Sec. IV-A, IV-C) and the whole training

def datasets(args):
    """Train and validation splits of --data/--methods (FF++'s official splits; Celeb-DF: masks.py)."""
    methods = parse_methods(args.data, args.methods)
    return [open_split(args.data, args.root, split, methods, args.image_size, split == "train", args.videos, args.frames,
                       args.synthetic, args.data_seed) for split in ("train", "val")]


def test_split(args):
    """The test split and its name: --data/--methods' own (Table I), other manipulations of the same
    dataset (--test-methods: Table II), or another dataset (--test-data: Table III)."""
    test_data = args.test_data or args.data  # Table I: the training data's own test split
    same = test_data == args.data  # Table III when False: another dataset (--test-data)
    methods = parse_methods(test_data, args.test_methods or (args.methods if same else None))  # Table II: other methods
    root = args.test_root or (args.root if same else None)
    videos, frames = (args.videos, args.frames) if same else (DEMO["videos"], DEMO["frames"])  # real -> synthetic: the demo's
    return (open_split(test_data, root, "test", methods, args.image_size, False, videos, frames, args.synthetic or "easy",
                       args.data_seed),
            f"{test_data}:{','.join(methods)}")


def fit(args, rank, world, local_world, device):
    """Sec. IV-B's training: --epochs passes of Eq. 7 (Adam: make_optimizer), the lr / 10 at the milestones, the
    network validated after each epoch; the test split is evaluated once, at the end, with the epoch
    of the best validation AUC. Resume, DDP, checkpoints, stop signals and logs are TrainRun's."""
    args, state = resumed(args, rank, local_world)  # --resume: the saved configuration and state
    genotype = (genotype_from_dict(state["genotype"], "checkpoint") if state and state["genotype"]
                else load_genotype(args.genotype) if args.arch == "add" else None)
    (train_set, val_set), (test_set, test_name) = datasets(args), test_split(args)
    model = prepare_model(sync_batchnorm(build_model(vars(args), genotype), args, world, device), device, args.compile,
                          args.deterministic)
    optimizer, scheduler = make_optimizer(model, args)
    run = TrainRun(args, model, (optimizer, scheduler), genotype, state, rank, world, device)
    train_data, val_data, test_data = run.data(train_set, val_set, test_set, test_name)
    with run:
        for epoch in run.epochs():
            losses = train_epoch(run.net, train_data, optimizer, device, args, run.flips, run.after_step)
            scheduler.step()
            run.after_epoch(epoch, losses, val_data)  # validation, best.pt / last.pt, the log line
        if rank == 0:
            run.stop.stop_now(run.stopped("during the final test", args.epochs))
            return test(args, model, val_data, (test_set, test_data, test_name), device)


# ==============================================================================================
# Below: not the paper's method. Settings, the bookkeeping of a run, reports and pictures,
# --eval-only, --predict, --compare, --benchmark, the command line.

# Settings that differ between a real dataset (the paper's, Sec. IV-B, but for the lr: README, Departures) and the
# built-in synthetic data (a demo sized for 2 CPU cores). Flags override both.
REAL_DATA = dict(image_size=256, stem_reductions=3, channels=48, cells_per_block=4, batch_size=96, lr=5e-4, epochs=300,
                 milestones=[80, 140], small_input=False)
DEMO = dict(image_size=64, stem_reductions=2, channels=16, cells_per_block=1, batch_size=32, lr=1e-3, epochs=12,
            milestones=[200, 280], videos=160, frames=4, small_input=True)
# Options added after some checkpoints were written, with the value such a checkpoint stands for
ADDED = dict(compare=None, genotype_origin=None, no_flips=False, small_input=False, data_seed=0)
RUN_KEYS = ("resume", "workers", "device", "log_every", "check_every", "out", "deterministic")  # a resumed run may change
MODEL_KEYS = ("arch", "channels", "blocks", "cells_per_block", "stem_reductions", "image_size", "mask_weight",
              "small_input")  # to rebuild it
# --eval-only: the checkpoint's run's unless given (the same batches give bit-identical metrics)
CHECKPOINT_KEYS = ("data", "root", "methods", "image_size", "videos", "frames", "batch_size", "synthetic", "data_seed")


class TrainRun(StoppableRun):
    """The bookkeeping around the training loop, so that fit() shows the training alone: resume (the
    model, optimizer and scheduler states, the epoch, the best AUC), the distributed wrapper and the
    loaders, then each step's non-finite check, progress line and stop signals (SIGTERM, SIGINT: the
    run ends after the step with one line naming the last checkpoint), and each epoch's validation,
    checkpoints (best.pt by validation frame AUC, last.pt), log line and curves.png, on rank 0."""
    def __init__(self, args, model, optimizers, genotype, state, rank, world, device):
        self.args, self.model, self.optimizers, self.genotype = args, model, optimizers, genotype
        self.rank, self.world, self.device = rank, world, device
        self.start, self.best = (state["epoch"], state["best_auc"]) if state else (0, -1.0)
        if state:
            restore(state, dict(model=model, optimizer=optimizers[0], scheduler=optimizers[1]), os.path.join(args.out, "last.pt"))
            print(f"resumed {os.path.join(args.out, 'last.pt')} at epoch {self.start}")
        if self.start == args.epochs and rank == 0:
            print(f"training is complete (epoch {self.start} of {args.epochs}): the test runs")
        self.net = nn.parallel.DistributedDataParallel(model, [device.index] if device.type == "cuda" else None) \
            if world > 1 else model
        self.group = dist.new_group(backend="gloo") if world > 1 else None  # where the ranks agree to stop (CPU)

    def data(self, train_set, val_set, test_set, test_name):
        """The training loader (an epoch's order depends on (seed, epoch) only: resumable; each process
        its share of the global batch), the validation and the test loader; the header line, config.json."""
        args = self.args
        self.sampler = DistributedSampler(train_set, self.world, self.rank, shuffle=True, seed=args.seed, drop_last=True)
        train_data = loader(train_set, args.batch_size // self.world, args.workers, self.sampler, True)
        if not len(train_data):
            raise InputError(f"--batch-size {args.batch_size}: the train split has only {len(train_set)} samples "
                             f"({len(train_set) // self.world} per process)")
        if self.rank == 0:
            print(f"{args.arch}: {count_parameters(self.model) / 1e6:.2f} M parameters; train {len(train_set)}, "
                  f"val {len(val_set)}, test {len(test_set)} ({test_name}) samples; {self.world} process(es) on {self.device}")
            atomic_write(os.path.join(args.out, "config.json"), lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
        self.progress = Progress((args.epochs - self.start) * len(train_data), args.log_every if self.rank == 0 else 0,
                                 self.world)
        self.images = len(train_data) * args.batch_size  # training images an epoch, all processes
        self.loaders = (train_data, *(loader(s, args.batch_size, args.workers) for s in (val_set, test_set)))
        return self.loaders

    def epochs(self):
        for epoch in range(self.start, self.args.epochs):
            self.sampler.set_epoch(epoch)
            self.epoch, self.tic, self.lr = epoch, time.time(), self.optimizers[0].param_groups[0]["lr"]
            self.flips = None if self.args.no_flips else epoch_generator(self.args.seed, epoch, self.rank)  # resumable
            self.check = FiniteCheck(self.device, self.args.check_every,
                                     "the last good checkpoint is intact: lower --lr, or --resume from it")
            yield epoch

    def after_step(self, step, steps, loss, images):
        """loss: the step's 0-dim loss on the device, read every --check-every steps."""
        last, epoch = step + 1 == steps, self.epoch
        self.check.add(loss, step, last, f"epoch {epoch + 1}")
        self.progress.step(epoch, step, steps, loss.detach(), images)  # .item() only when it prints
        if not last and self.stop.agreed(self.group):  # the last step's signal: after the epoch's checkpoint
            raise Stopped(self.stopped(f"in epoch {epoch + 1}, after step {step + 1} of {steps}", epoch, True))

    def stopped(self, where, held, now=False):
        """The one line a stop ends with; now=False: "{}" where the signal's name goes (StopSignals.stop_now)."""
        out = self.args.out
        if not held:
            line = "no checkpoint yet (one is written at each epoch's end)"
        else:
            line = f"the last checkpoint, {os.path.join(out, 'last.pt')}, holds epoch {held}: " + (
                f"python train.py --resume --out {out} runs the test" if held == self.args.epochs else
                f"continue with python train.py --resume --out {out}")
        name = (self.stop.name or "a signal to another process") if now else "{}"
        return f"stopped by {name} {where}; {line}"

    def after_epoch(self, epoch, losses, val_data):
        """Rank 0: validation, log.jsonl (its line before the checkpoint: add.trim_log), best.pt when the
        validation frame AUC is the best so far, last.pt, curves.png, the epoch's line."""
        if self.rank == 0:
            train_seconds, tic = time.time() - self.tic, self.tic
            val, _ = evaluate(self.model, val_data, self.device)
            auc = val["frame_auc"] if val["frame_auc"] is not None else val["frame_acc"]
            improved, (train_ce, train_mse), (optimizer, scheduler) = auc > self.best, losses, self.optimizers
            self.best, seconds, out = max(self.best, auc), time.time() - tic, self.args.out
            line = dict(epoch=epoch + 1, train_ce=train_ce, train_mse=train_mse, val_ce=val["ce"], val_mse=val["mse"],
                        lr=self.lr, seconds=seconds, train_seconds=train_seconds,
                        train_images=self.images, val=val)
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
            state = dict(model=self.model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         epoch=epoch + 1, rng=torch.get_rng_state(), config=vars(self.args),
                         genotype=genotype_dict(self.genotype), best_auc=self.best)
            if improved:
                save_checkpoint(state, os.path.join(out, "best.pt"))
            save_checkpoint(state, os.path.join(out, "last.pt"))
            plot_curves(os.path.join(out, "log.jsonl"), os.path.join(out, "curves.png"))
            mse = lambda v: "" if v is None else f" MSE {v:.4f}"
            print(f"epoch {epoch + 1}/{self.args.epochs}  train CE {train_ce:.4f}{mse(train_mse)}  val CE {val['ce']:.4f}"
                  f"{mse(val['mse'])}  ACC {val['frame_acc']:.4f} AUC {val['frame_auc'] or float('nan'):.4f}  "
                  f"{seconds:.1f} s" + ("  (best)" if improved else ""), flush=True)
        if self.world > 1:
            dist.barrier()
        if self.stop.agreed(self.group):  # came in its last step, or during the validation
            raise Stopped(self.stopped(f"at the end of epoch {epoch + 1}", epoch + 1, True))


def resumed(args, rank, local_world):
    """--resume: the configuration saved in OUT/last.pt (but for RUN_KEYS) and that state; else (args,
    None). Also the loader workers, and the configuration printed."""
    path = os.path.join(args.out, "last.pt")
    state = load_checkpoint(path) if args.resume else None
    if state:
        args = resumed_config(state, args, RUN_KEYS, path, ("optimizer", "scheduler", "epoch", "best_auc"), ADDED)
        if rank == 0:
            trim_log(os.path.join(args.out, "log.jsonl"), state["epoch"])
    args.workers = loader_workers(args.data, local_world) if args.workers is None else args.workers
    if rank == 0:
        print_config(args)
    return args, state


def sync_batchnorm(model, args, world, device):
    """--sync-bn: batch statistics over all processes (CUDA only)."""
    if args.sync_bn and device.type != "cuda":
        raise InputError("--sync-bn: torch's SyncBatchNorm runs on CUDA devices only")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn and world > 1 else model


class Progress:
    """Prints loss, images/s (all processes together) and the time left every `every` steps."""
    def __init__(self, total_steps, every, world=1):
        self.total, self.every, self.world, self.done, self.start = total_steps, every, world, 0, time.time()

    def step(self, epoch, step, steps, loss, images):  # loss: a 0-dim tensor
        self.done += 1
        if self.every and self.done % self.every == 0:
            elapsed = time.time() - self.start
            left = elapsed / self.done * (self.total - self.done)
            print(f"  epoch {epoch + 1} step {step + 1}/{steps}  loss {loss.item():.4f}  "
                  f"{images * self.world * self.done / elapsed:.1f} images/s  {left / 60:.1f} min left", flush=True)


def init_distributed(device_name, batch_size):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: one process per GPU (nccl), or per CPU slot (gloo).
    -> rank, world size, local world size, device. The global batch must divide by the world size."""
    if "RANK" not in os.environ:
        return 0, 1, 1, pick_device(device_name)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if batch_size % world:
        raise InputError(f"--batch-size {batch_size}: the global batch must divide by the {world} processes "
                         f"(e.g. --batch-size {batch_size // world * world or world})")
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), device


def test(args, model, val_data, test, device):
    """Best checkpoint -> metrics.json (val and test), predictions.csv, roc.png, the table, masks.png."""
    best = load_checkpoint(os.path.join(args.out, "best.pt"))
    load_state(model, best["model"], os.path.join(args.out, "best.pt"))
    val, _ = evaluate(model, val_data, device)
    rows = {f"val  {args.data}:{','.join(parse_methods(args.data, args.methods))}": val}
    return report(args, model, rows, test, device, "metrics.json", best)


def report(args, model, rows, test, device, name, state):
    """Evaluates the test split (test: its dataset, loader and name); writes NAME (metrics, with the
    checkpoint's epoch and genotype), predictions.csv, roc.png and masks.png."""
    test_set, test_data, test_name = test
    rows[f"test {test_name}"], out = evaluate(model, test_data, device)
    metrics = dict(arch=args.arch, parameters=count_parameters(model), epoch=state["epoch"], mask_weight=args.mask_weight,
                   genotype=state.get("genotype"), **{k.split()[0]: dict(data=k.split()[1], **v) for k, v in rows.items()})
    atomic_write(os.path.join(args.out, name), lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    write_predictions(os.path.join(args.out, "predictions.csv"), test_set, out)
    plot_roc(os.path.join(args.out, "roc.png"), out, test_name)
    print_table(rows)
    if args.visualize:
        visualize(model, test_set, args.visualize, os.path.join(args.out, "masks.png"), device)
    print(f"wrote {args.out}: {name}, predictions.csv, roc.png" + (", masks.png" if args.visualize else ""))
    return metrics


def eval_only(args, device):
    """--eval-only --checkpoint PATH: the checkpoint's network on a test split: by default the one of
    its own run (data, methods, root, image size); --test-data/--test-methods/--test-root for others.
    Writes into a new run folder, never into the training run's."""
    model, cfg, state = model_from_checkpoint(args.checkpoint, device, args.compile)
    for key in CHECKPOINT_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, cfg.get(key, "easy" if key == "synthetic" else None))
    args.workers = loader_workers(args.data) if args.workers is None else args.workers
    if args.image_size != cfg["image_size"]:
        raise InputError(f"--image-size {args.image_size}: {args.checkpoint} was trained at {cfg['image_size']} px")
    for key in MODEL_KEYS + ("no_mask_branch", "genotype", "epochs", "seed"):  # what the printed config shows is used
        setattr(args, key, cfg.get(key))
    print_config(args)
    test_set, test_name = test_split(args)
    with StoppableRun() as run:
        run.loaders = [loader(test_set, args.batch_size, args.workers)]
        run.stop.stop_now("stopped by {} during the evaluation; nothing is lost: run it again")
        return report(args, model, {}, (test_set, run.loaders[0], test_name), device, "eval.json", state)


def print_table(rows):
    """rows: {name: metrics} -> one line each."""
    cols = ["frames", "videos"] + [f"{u}_{k}" for u in ("frame", "video") for k in ("acc", "bacc", "auc", "ap", "eer")]
    width = max(len(name) for name in rows) + 2
    print(" " * width + "".join(f"{c:>11s}" for c in cols))
    for name, m in rows.items():
        cells = [f"{m[c]:>11d}" if isinstance(m[c], int) else f"{'n/a':>11s}" if m[c] is None else f"{m[c]:>11.4f}"
                 for c in cols]
        print(f"{name:<{width}s}" + "".join(cells))


def write_predictions(path, dataset, out):
    """predictions.csv: video, method, frame, label, p(fake), one row per test frame (reproduces the
    reported metrics)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["video", "method", "frame", "label", "p_fake"])
    for (method, video, frame), label, p in zip(dataset.samples, out["label"], out["p"]):
        writer.writerow([video, method, frame, int(label), f"{p:.6f}"])
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


def figure(rows, cols, size):
    import matplotlib
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt
    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def save_figure(fig, path, top=1.0):
    for a in fig.axes:
        if a.get_xlabel() == "epoch":
            a.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout(rect=(0, 0, 1, top))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    fig.clf()
    import matplotlib.pyplot as plt
    plt.close(fig)


def plot_roc(path, out, name):
    """roc.png: the frame- and video-level ROC of the test split, AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve
    fig, ax = figure(1, 1, (5, 5))
    video_probs, video_labels = video_level(out["p"], out["label"], out["videos"])
    for level, labels, probs in (("frame", out["label"], out["p"]), ("video", video_labels, video_probs)):
        if len(np.unique(labels)) == 2:
            fpr, tpr, _ = roc_curve(labels, probs)
            ax[0, 0].plot(fpr, tpr, label=f"{level} level, AUC {roc_auc_score(labels, probs):.4f}")
    ax[0, 0].plot([0, 1], [0, 1], ":", color="gray")
    ax[0, 0].set(xlabel="false-positive rate (reals called fake)", ylabel="true-positive rate (fakes caught)",
                 title=f"ROC, {name}")
    ax[0, 0].legend(loc="lower right")
    save_figure(fig, path)


def plot_curves(log_path, path):
    """curves.png from log.jsonl: train and val CE and MSE, and val AUC, per epoch."""
    with open(log_path) as f:
        log = [json.loads(line) for line in f]
    epochs = [e["epoch"] for e in log]
    fig, ax = figure(1, 3, (13, 3.6))
    for k, (key, title) in enumerate((("ce", "cross-entropy (Eq. 6)"), ("mse", "mask MSE (Eq. 5)"))):
        for split in ("train", "val"):
            values = [e.get(f"{split}_{key}") for e in log]
            if any(v is not None for v in values):
                ax[0, k].plot(epochs, [np.nan if v is None else v for v in values], "o-", label=split)
        ax[0, k].set(xlabel="epoch", title=title)
        if ax[0, k].lines:
            ax[0, k].legend()
    ax[0, 2].plot(epochs, [np.nan if e["val"]["frame_auc"] is None else e["val"]["frame_auc"] for e in log], "o-",
                  label="frame")
    ax[0, 2].plot(epochs, [np.nan if e["val"]["video_auc"] is None else e["val"]["video_auc"] for e in log], "o-",
                  label="video")
    ax[0, 2].set(xlabel="epoch", title="validation AUC")
    ax[0, 2].legend()
    save_figure(fig, path)


def visualize(model, dataset, k, path, device):
    """Fig. 9: K faces with their predicted mask m, the hull mask M and p(fake), in a grid."""  # Fig. 9
    idx = np.linspace(0, len(dataset) - 1, k).round().astype(int)
    x, M, y, _ = (list(t) for t in zip(*(dataset[i] for i in idx)))
    with torch.no_grad():
        logits, m = model.eval()(to_device((torch.stack(x), torch.stack(M), torch.tensor(y)), device)[0])
    p, tile, font = logits.float().softmax(-1)[:, 1].cpu(), 128, ImageFont.load_default(size=12)
    columns = 3 if m is not None else 2
    per_row = max(1, min(4, k))
    canvas = Image.new("RGB", (per_row * columns * tile, ((k + per_row - 1) // per_row) * (tile + 18)), "white")
    for i in range(k):
        tiles = [x[i], *([m[i].float().cpu().mul(255).byte().expand(3, -1, -1)] if m is not None else []),
                 M[i].mul(255).expand(3, -1, -1)]
        left, top = (i % per_row) * columns * tile, (i // per_row) * (tile + 18)
        for j, t in enumerate(tiles):
            picture = Image.fromarray(t.permute(1, 2, 0).numpy()).resize((tile, tile), Image.NEAREST)
            canvas.paste(picture, (left + j * tile, top))
        caption = f"p(fake) {p[i]:.2f}, {'fake' if y[i] else 'real'}" + ("  | m | M" if m is not None else "  | M")
        ImageDraw.Draw(canvas).text((left + 4, top + tile + 2), caption, fill="black", font=font)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def genotype_dict(genotype):
    return None if genotype is None else {k: [list(p) for p in v] for k, v in genotype._asdict().items()}


def model_from_checkpoint(path, device, compile=False):
    """A train.py checkpoint -> (its network for inference on the device: eval mode, BatchNorm folded
    into the convolutions; its configuration; its state)."""
    state = load_checkpoint(path)
    cfg = state.get("config") if isinstance(state, dict) else None
    if not isinstance(cfg, dict) or "model" not in state:
        raise InputError(f"{path}: not a train.py checkpoint (no model or config inside)")
    if "alpha_normal" in state["model"]:
        raise InputError(f"{path}: a search checkpoint (search.py's search.pt), not a trained detector; train its "
                         f"genotype first: python train.py --genotype g.json")
    cfg = {**ADDED, **cfg}  # options added since: the value an older run had
    missing = [k for k in MODEL_KEYS if k not in cfg]
    if missing or "epoch" not in state:
        raise InputError(f"{path}: written by another version of train.py (its configuration has no "
                         f"{', '.join('--' + k.replace('_', '-') for k in missing) or 'epoch'}); train it again")
    genotype = genotype_from_dict(state["genotype"], path) if state.get("genotype") else None
    model = build_model(cfg, genotype)
    load_state(model, state["model"], path)
    return prepare_model(fold_batchnorm(model, cfg["image_size"]), device, compile).eval(), cfg, state


# ----------------------------------------------------------------------------------------------
# --predict: is this video fake? (the preparation of training, then the checkpoint's network)

def score_input(model, path, cfg, args, device):
    """One video, folder of frames or photo -> dict(p_fake, verdict, frames_scored, frames=[...],
    crops, m) or dict(reason=...) when it has no face or cannot be read."""
    try:
        found = list(read_faces(path, args.frames, 256, args.detect_size))
    except Exception as e:  # one input's failure is reported on its line; the others still run
        what = "unreadable" if isinstance(e, READ_ERRORS) else "failed"
        return dict(reason=f"{what} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    faces = [f for f in found if f[1] is not None]
    if not faces:
        return dict(reason=f"no face found in {len(found)} frame(s)" if found else "no frames decoded")
    s = cfg["image_size"]
    crops = np.stack([np.asarray(Image.fromarray(c).resize((s, s), Image.BILINEAR)) if s != 256 else c
                      for _, c, _, _ in faces])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2)  # (K, 3, S, S) uint8, as the loaders hand it over
    with torch.no_grad():
        logits, m = model(to_device((x, torch.zeros(len(x), 1, s, s), torch.zeros(len(x))), device)[0])
    p = logits.float().softmax(-1)[:, 1].cpu().numpy()
    frames = [dict(frame=i, p_fake=float(q), box=[round(float(v), 1) for v in box])
              for (i, _, _, box), q in zip(faces, p)]
    return dict(p_fake=float(p.mean()), verdict="fake" if p.mean() > args.threshold else "real",
                frames_scored=len(faces), frames_read=len(found), frames=frames, crops=crops,
                m=None if m is None else m[:, 0].float().cpu().numpy())


def draw_prediction(result, name, path, k=8):
    """Up to K of the scored face crops, each with the predicted m as a heat map over it (none for a
    baseline) and its p(fake)."""
    pick = np.linspace(0, len(result["crops"]) - 1, min(k, len(result["crops"]))).round().astype(int)
    fig, ax = figure(1, len(pick), (2.2 * len(pick), 2.6))
    for a, j in zip(ax[0], pick):
        a.imshow(result["crops"][j])
        if result["m"] is not None:
            a.imshow(result["m"][j], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        a.set_title(f"frame {result['frames'][j]['frame']}\np(fake) {result['frames'][j]['p_fake']:.2f}", fontsize=9)
        a.axis("off")
    fig.suptitle(f"{name}: p(fake) {result['p_fake']:.3f} ({result['verdict']})", fontsize=10)
    save_figure(fig, path, top=0.85)


def predict_files(args, device):
    """--predict: one printed line per input, DIR/predictions.json and a picture per input."""
    missing = [p for p in args.predict if not os.path.exists(p)]
    if missing:
        raise InputError(f"{missing[0]}: no such file or folder (expected a video, a folder of frames or a photo)")
    model, cfg, _ = model_from_checkpoint(args.checkpoint, device)
    out, report = new_run_dir(args.out), {}
    print(f"scoring {len(args.predict)} input(s) with {args.checkpoint} ({cfg['arch']}, {cfg['image_size']} px); "
          f"writing {out}")
    with StoppableRun() as run:
        run.stop.stop_now("stopped by {}: the inputs above were scored, predictions.json was not written")
        for k, path in enumerate(args.predict):
            result = score_input(model, path, cfg, args, device)
            if "reason" in result:
                print(f"{path}: {result['reason']}")
            else:
                picture = os.path.join(out, f"{k:03d}_{os.path.basename(os.path.normpath(path))}.png")
                draw_prediction(result, path, picture)
                print(f"{path}: p(fake) {result['p_fake']:.4f}  {result['verdict'].upper()} at threshold {args.threshold}  "
                      f"({result['frames_scored']} of {result['frames_read']} frames scored)  {picture}")
            report[path] = {k: v for k, v in result.items() if k not in ("crops", "m")}
    atomic_write(os.path.join(out, "predictions.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"wrote {out}/predictions.json")
    return report


# ----------------------------------------------------------------------------------------------
# --compare: runs grouped into architectures (all but their seeds the same), the architecture as the unit

COMPARE_IGNORED = ("seed", "data_seed", "out", "resume", "workers", "device", "log_every", "check_every", "visualize",
                   "compile", "deterministic", "genotype", "eval_only", "checkpoint", "predict", "threshold", "detect_size",
                   "benchmark", "benchmark_against", "compare")  # what does not change a run's network, data or training
AT_CHANCE = 0.65  # a training CE at or above this in the last epoch: the network did not train (ln 2 = 0.693)


def compare(args):
    """--compare RUN_DIR...: finished training runs grouped by everything but their seeds (--seed,
    --data-seed) -> a row a group: parameters, lr, training images/s, test frame and video AUC (mean
    and standard deviation over its seeds), validation frame AUC; printed, written to compare.csv and
    drawn as pareto.png. A run whose training CE stayed at chance is marked and left out of the test
    AUCs (the harness failed it), not of the validation AUC that picks an lr. Then the architecture
    (a row) is the unit: searched minus random and minus hand-designed, Welch's 95% interval over the
    rows' means; each searched row against each hand-designed one paired by seed; and, for rows that
    differ only in lr, the lr of the best mean validation AUC (the pick; pass the runs of other seeds
    at it for the comparison). -> the rows."""
    groups = {}
    for run in args.compare:
        cfg, metrics, log = read_run(run)
        cells = metrics["genotype"] if "genotype" in metrics else load_checkpoint(os.path.join(run, "best.pt")).get("genotype")
        # (the cells, not the genotype's file name, tell architectures apart)
        ignored = COMPARE_IGNORED + ("lr",) + (("small_input",) if cfg["arch"] == "add" else ())  # ADD has no such option
        architecture = json.dumps(dict({k: v for k, v in cfg.items() if k not in ignored}, cells=cells), sort_keys=True)
        groups.setdefault((architecture, cfg["lr"]), []).append((run, cfg, metrics, log))
    rows = sorted((dict(compare_row(runs), architecture=key[0]) for key, runs in groups.items()),
                  key=lambda r: (r["parameters"], r["name"], r["lr"]))
    out = new_run_dir(args.out)
    columns = ["name", "kind", "width", "parameters", "lr", "images_per_s", "frame_auc", "frame_auc_std", "video_auc",
               "video_auc_std", "val_auc", "n", "at_chance", "runs"]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([columns] + [[r[c] for c in columns] for r in rows])
    atomic_write(os.path.join(out, "compare.csv"), lambda f: f.write(text.getvalue().encode()))
    print(f"{'name':28s} {'kind':13s} {'width':>7s} {'params':>8s} {'lr':>7s} {'img/s':>7s}  {'test frame AUC':>15s}  "
          f"{'video AUC':>15s}  {'val AUC':>7s}  n")
    for r in rows:
        print(f"{r['name'][:28]:28s} {r['kind']:13s} {r['width']:>7s} {r['parameters'] / 1e6:>7.2f}M {r['lr']:>7g} "
              f"{r['images_per_s'] or float('nan'):>7.1f}  {r['frame_auc']:.3f} ± {r['frame_auc_std']:.3f}  "
              f"{r['video_auc']:.3f} ± {r['video_auc_std']:.3f}  {r['val_auc']:>7.3f}  {r['n']}"
              + (f"  ({r['at_chance']} at chance, left out of the test AUCs: {r['failed']})" if r["at_chance"] else ""))
    compare_architectures(rows)
    plot_pareto([r for r in rows if r["n"]], os.path.join(out, "pareto.png"))
    print(f"wrote {out}: compare.csv, pareto.png")
    return rows


def compare_row(runs):
    """One group of runs (the same but for their seeds) -> its row. A run whose training CE ended at
    chance is counted (at_chance, failed) and left out of the test AUCs, not of the validation AUC
    that picks the lr."""
    _, cfg, metrics, _ = runs[0]
    add = cfg["arch"] == "add"
    origin = cfg.get("genotype_origin") or ""
    kind = "hand-designed" if not add else "random" if origin == "random" else "searched" if origin.startswith("search") else "ADD"
    name = os.path.splitext(os.path.basename(cfg.get("genotype") or ""))[0] if add else cfg["arch"]
    failed = [run for run, _, _, log in runs if log[-1]["train_ce"] >= AT_CHANCE]
    kept = [(c, m) for run, c, m, _ in runs if run not in failed]
    frame, video = (np.array([m["test"][f"{level}_auc"] for _, m in kept], dtype=float) for level in ("frame", "video"))
    val = np.array([m["val"]["frame_auc"] for _, _, m, _ in runs], dtype=float)  # all: an lr that fails a seed is worse
    mean, spread = lambda a: float(a.mean()) if len(a) else float("nan"), lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0
    timed = [(e["train_images"], e["train_seconds"]) for _, _, _, log in runs for e in log if "train_seconds" in e]
    return dict(name=name, kind=kind, width=f"C{cfg['channels']} N{cfg['cells_per_block']}" if add else "-",
                parameters=metrics["parameters"], lr=cfg["lr"], images_per_s=sum(i for i, _ in timed) / sum(s for _, s in timed) if timed else None,
                frame_auc=mean(frame), frame_auc_std=spread(frame), video_auc=mean(video), video_auc_std=spread(video),
                val_auc=mean(val), n=len(kept), at_chance=len(failed), failed=" ".join(failed), runs=" ".join(sorted(r for r, *_ in runs)),
                seeds={f"{c['seed']}/{c.get('data_seed', 0)}": m["test"]["frame_auc"] for c, m in kept})


def compare_architectures(rows):
    """The verdicts of Table IV at matched size (pass one size band's runs), the architecture (a row)
    as the unit: searched minus random and minus hand-designed, Welch's 95% interval over the rows'
    mean test frame AUC; each searched row minus each hand-designed one paired by seed (the same
    --seed and --data-seed), Student's 95% interval over the differences. Rows that differ only in lr
    are a sweep: the lr with the best mean validation AUC is printed instead (runs at it, of other
    seeds, are then compared)."""
    sweeps = {}
    for r in rows:
        sweeps.setdefault(r["architecture"], []).append(r)
    if any(len(sweep) > 1 for sweep in sweeps.values()):
        for sweep in (s for s in sweeps.values() if len(s) > 1):
            pick, lrs = max(sweep, key=lambda r: r["val_auc"]), sorted(r["lr"] for r in sweep)
            print(f"lr pick, {pick['name']} {pick['width']}: {pick['lr']:g} of {', '.join(f'{lr:g}' for lr in lrs)} (mean "
                  f"validation frame AUC {pick['val_auc']:.3f})" + ("; at the grid's edge: extend it" if pick["lr"] in (lrs[0], lrs[-1]) else ""))
        return print("(an architecture at several lrs: the comparisons take one lr an architecture)")
    rows = [r for r in rows if r["n"]]
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("searched", "random", "hand-designed")}
    for other in ("random", "hand-designed"):
        a, b = [r["frame_auc"] for r in kinds["searched"]], [r["frame_auc"] for r in kinds[other]]
        if len(a) > 1 and len(b) > 1:
            d, low, high = welch_interval(a, b)
            print(f"searched - {other}: {d:+.3f} [{low:+.3f}, {high:+.3f}] test frame AUC (Welch's 95% interval over "
                  f"architectures: {len(a)} and {len(b)})")
    for s in kinds["searched"]:
        for h in kinds["hand-designed"]:
            seeds = sorted(set(s["seeds"]) & set(h["seeds"]))
            if len(seeds) > 1:
                d, low, high = paired_interval([s["seeds"][k] - h["seeds"][k] for k in seeds])
                print(f"  {s['name']} {s['width']} - {h['name']}: {d:+.3f} [{low:+.3f}, {high:+.3f}] (paired by seed, "
                      f"{len(seeds)} seeds)")


def welch_interval(a, b):
    """mean(a) - mean(b) and its 95% interval by Welch's t (unequal variances) -> (d, low, high)."""
    from scipy.stats import ttest_ind
    interval = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return float(np.mean(a) - np.mean(b)), float(interval.low), float(interval.high)


def paired_interval(differences):
    """The mean of paired differences and its 95% interval by Student's t -> (d, low, high)."""
    from scipy.stats import ttest_1samp
    interval = ttest_1samp(differences, 0.0).confidence_interval(0.95)
    return float(np.mean(differences)), float(interval.low), float(interval.high)


def read_run(run):
    """A finished train.py run folder -> (config, metrics, log lines); a one-line error otherwise."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(run, "metrics.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(run, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
    except (OSError, ValueError) as e:
        raise InputError(f"{run}: not a finished train.py run folder (config.json, metrics.json, log.jsonl: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:100]})")
    if not isinstance(cfg, dict) or "arch" not in cfg or not isinstance(metrics.get("test"), dict):
        raise InputError(f"{run}: not a finished train.py run folder (its config.json or metrics.json is another file)")
    return cfg, metrics, log


def plot_pareto(rows, path):
    """pareto.png: test frame AUC (mean, and the standard deviation over seeds as a bar) against the
    parameters (log scale), one point a group, a mark per kind."""
    fig, ax = figure(1, 1, (8, 5.5))
    marks = {"searched": ("o", "tab:blue"), "random": ("s", "tab:orange"), "hand-designed": ("^", "tab:green"),
             "ADD": ("D", "tab:purple")}
    for kind, (mark, colour) in marks.items():
        picked = [r for r in rows if r["kind"] == kind]
        if picked:
            ax[0, 0].errorbar([r["parameters"] for r in picked], [r["frame_auc"] for r in picked],
                              [r["frame_auc_std"] for r in picked], fmt=mark, color=colour, capsize=3, label=kind)
        for r in picked:
            ax[0, 0].annotate(f"{r['name']} {r['width'] if r['width'] != '-' else ''}".strip(), (r["parameters"], r["frame_auc"]),
                              fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax[0, 0].set(xscale="log", xlabel="parameters", ylabel="test frame AUC (mean ± std over seeds)",
                 title="accuracy against size")
    ax[0, 0].legend()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# --benchmark

def benchmark_timers(args, arch, device, steps):
    """For one architecture on a random batch: callables timing a training step (forward, Eq. 7,
    backward, update) and an inference step (BatchNorm folded, as --eval-only and --predict run),
    each -> (seconds per step, seconds of its 2 warm-up steps: compilation with --compile)."""
    cfg = dict(vars(args), arch=arch, mask_weight=args.mask_weight if arch == "add" else 0.0)
    genotype = load_genotype(args.genotype) if arch == "add" else None
    model = prepare_model(build_model(cfg, genotype), device, args.compile)
    folded = prepare_model(fold_batchnorm(build_model(cfg, genotype), args.image_size), device, args.compile)
    optimizer, _ = make_optimizer(model, args)
    batch, run = random_batch(args.batch_size, args.image_size), argparse.Namespace(**cfg)
    x = to_device(batch, device)[0]

    def infer():
        with torch.no_grad():
            folded(x)
    train_step = lambda: train_epoch(model, [batch], optimizer, device, run)
    return [lambda: time_steps(train_step, device, steps), lambda: time_steps(infer, device, steps)], count_parameters(model)


def benchmark(args, device, steps=10, rounds=3):
    """--benchmark: training and inference images/s of --arch on random batches; with
    --benchmark-against, of that architecture too, timed alternately in this one process (A, B, A, B,
    ...; best of each), so that their ratio is measured in one run on the same machine."""
    archs = [args.arch] + [a for a in [args.benchmark_against] if a and a != args.arch]
    timers = {a: benchmark_timers(args, a, device, steps) for a in archs}
    best, warm = {a: [math.inf, math.inf] for a in archs}, {a: [0.0, 0.0] for a in archs}
    for r in range(rounds):
        for a in archs:
            for j, timer in enumerate(timers[a][0]):
                seconds, warm_up = timer()
                best[a][j], warm[a][j] = min(best[a][j], seconds), warm_up if r == 0 else warm[a][j]
    b, result = args.batch_size, {}
    for a in archs:
        result[a] = dict(train=b / best[a][0], inference=b / best[a][1])
        print(f"{a} ({timers[a][1] / 1e6:.2f} M parameters), batch {b}, {args.image_size} px, on {device}: training "
              f"{result[a]['train']:.1f} images/s, inference {result[a]['inference']:.1f} images/s (BatchNorm folded)"
              + (f"; compilation {warm[a][0]:.0f} s + {warm[a][1]:.0f} s" if args.compile else ""))
    if len(archs) == 2:
        (a, ra), (o, ro) = result.items()
        print(f"{a} / {o}: training {ra['train'] / ro['train']:.2f}x, inference {ra['inference'] / ro['inference']:.2f}x "
              f"(best of {rounds} alternating rounds); peak memory {peak_memory_mib(device):.0f} MiB")
    return result


def parse_args(argv=None):
    p = Parser(usage="python train.py [options]", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the paper's network and training (Sec. III-B to III-D, IV-B; on the built-in data: the "
                             "demo's sizes)")
    g.add_argument("--genotype", help="g.json from search.py (needed for --arch add)")
    g.add_argument("--arch", default="add", choices=("add",) + BASELINES, help="ADD, or a torchvision network trained "
                   "from scratch in the same harness (Table IV: resnet18, resnet152, vgg16; and small ones of the field)")
    g.add_argument("--channels", type=bounded(int, 1), help="C of the first block; 48 gives ~5 M parameters (paper: 5.6 M); "
                   "demo: 16")
    g.add_argument("--cells-per-block", type=bounded(int, 1), help="N normal cells per D^2 block (paper: 4, Sec. IV-D); demo: 1")
    g.add_argument("--blocks", type=bounded(int, 1), default=3, help="D^2 blocks, a reduction cell between consecutive ones")
    g.add_argument("--mask-weight", type=bounded(float, 0), default=1.0,
                   help="alpha of Eq. 7 (paper: 1; 0: Table V's 'alpha = 0', the mask branch kept, m unsupervised)")
    g.add_argument("--batch-size", type=bounded(int, 1), help="global batch (paper: 96; demo: 32)")
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="paper: Adam with momentum 0.9")
    g.add_argument("--momentum", type=bounded(float, 0, 1), default=0.9, help="paper: 0.9")
    g.add_argument("--weight-decay", type=bounded(float, 0), default=5e-4, help="paper: 5e-4")
    g.add_argument("--epochs", type=bounded(int, 1), help="paper: 300; demo: 12")
    g.add_argument("--milestones", type=bounded(int, 1), nargs="+",
                   help="lr / 10 at these epochs of 300, scaled to --epochs (paper: 80 140; demo: 200 280)")
    g.add_argument("--test-data", choices=tuple(METHODS), help="test on another dataset (Table III: celeb-df)")
    g.add_argument("--test-methods", help="test on other manipulations (Table II: FaceSwap)")
    g = p.add_argument_group("departures from the paper (README, Departures)")
    g.add_argument("--lr", type=bounded(float, 0), help="paper: 0.5, read as 0.5e-3 for Adam (real data: 5e-4; demo: 1e-3)")
    g.add_argument("--stem-reductions", type=bounded(int, 0), help="stride-2 stem layers, not described by the paper (3: 256 "
                   "-> 32 px; demo: 2, 64 -> 16 px)")
    g.add_argument("--small-input", action=argparse.BooleanOptionalAction, help="hand-designed networks: the first stride-2 "
                   "layer at stride 1, a 64 px face ending on 4x4 as in ADD (default: on for the built-in data, off on real)")
    g.add_argument("--grad-clip", type=bounded(float, 0), default=5.0, help="clip the gradient norm (paper: unstated; "
                   "DARTS: 5; 0: off)")
    g.add_argument("--no-flips", action="store_true", help="no random horizontal flips of the training batches (paper: "
                   "unstated)")
    g = p.add_argument_group("running: data, device, resume, checkpoints")
    add_data_arguments(g)
    g.add_argument("--test-root", help="prepared folder of --test-data (default: data/<name>)")
    g.add_argument("--seed", type=bounded(int, 0), default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    g.add_argument("--out", help="run folder (default runs/train, runs/eval, runs/predict, runs/compare; a new one beside "
                   "it if it exists)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt with its saved configuration")
    g.add_argument("--log-every", type=bounded(int, 0), default=50, help="progress line every N steps (0: per epoch only)")
    g.add_argument("--check-every", type=bounded(int, 1), default=50, help="read the device's non-finite-loss count every "
                   "N steps")
    g.add_argument("--sync-bn", action="store_true", help="DDP: batch norm statistics over all processes")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (inductor; minutes of compilation)")
    g.add_argument("--deterministic", action="store_true", help="CUDA: deterministic algorithms, no cuDNN autotuning "
                   "(the CPU is deterministic anyway)")
    g = p.add_argument_group("extras: evaluation, prediction, comparison, speed")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on a test split (its run's by default)")
    g.add_argument("--checkpoint", help="with --eval-only or --predict: a best.pt or last.pt written by train.py")
    g.add_argument("--predict", nargs="+", metavar="PATH", help="score videos, folders of frames or photos with --checkpoint")
    g.add_argument("--threshold", type=bounded(float, 0, 1), default=0.5, help="--predict: p(fake) above which the verdict "
                   "is fake")
    g.add_argument("--detect-size", type=bounded(int, 64), default=640, help="--predict: detect faces on a copy of at most "
                   "this many px")
    g.add_argument("--visualize", type=bounded(int, 0), default=8, metavar="K", help="picture of K test faces and masks, as "
                   "Fig. 9 (0: none)")
    g.add_argument("--no-mask-branch", action="store_true", help="build ADD without the mask branch (Eq. 4 alone)")
    g.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="finished runs, grouped by all but their seed: one "
                   "table (compare.csv) and pareto.png, test AUC against parameters")
    g.add_argument("--benchmark", action="store_true", help="time training and inference steps and exit")
    g.add_argument("--benchmark-against", choices=("add",) + BASELINES, help="--benchmark: time this architecture "
                   "too, alternately in the same process, and print the ratio (e.g. resnet18)")
    args = p.parse_args(argv)
    return check_args(resolve_defaults(args, REAL_DATA, DEMO, keep=CHECKPOINT_KEYS if args.eval_only or args.predict else ()))


def check_args(args):
    if "add" in (args.arch, args.benchmark_against) and not args.genotype and not (args.resume or args.eval_only or
                                                                                    args.predict or args.compare):
        raise InputError("--genotype: needed for --arch add; write one with: python search.py --out g.json")
    if (args.eval_only or args.predict) and not args.checkpoint:
        raise InputError(f"--{'eval-only' if args.eval_only else 'predict'} needs --checkpoint PATH "
                         f"(a best.pt or last.pt written by train.py)")
    if args.arch != "add" or args.no_mask_branch:
        args.mask_weight = 0.0  # no mask branch: nothing for Eq. 5 to supervise
    if args.predict:
        args.frames = args.frames or 32  # evenly spaced frames per video
    mode = "predict" if args.predict else "eval" if args.eval_only else "compare" if args.compare else "train"
    args.out = args.out or os.path.join("runs", mode)
    args.genotype_origin = genotype_origin(args.genotype) if args.arch == "add" and args.genotype else None  # --compare's kind
    return args


def print_config(args):
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # weights decaying to 0 (a run at chance) go subnormal: x86 steps 8x slower
    if args.compare:
        return compare(args)
    rank, world, local_world, device = init_distributed(args.device, args.batch_size)
    torch.manual_seed(args.seed)
    try:
        if args.benchmark:
            return benchmark(args, device)
        if args.predict:
            return predict_files(args, device)
        if not args.resume and rank == 0:
            args.out = new_run_dir(args.out)
        if rank == 0:
            print(f"run folder: {args.out}", flush=True)
        return eval_only(args, device) if args.eval_only else fit(args, rank, world, local_world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (InputError, Diverged) as e:  # one line, from one process (under torchrun every rank stops)
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    except Stopped as e:
        sys.exit(str(e) if os.environ.get("RANK", "0") == "0" else 1)
