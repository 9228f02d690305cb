"""Train and evaluate ADD (Sec. III-B to III-D, IV-B, IV-C), and point a trained detector at videos.

- build_model, make_optimizer: ADD from a genotype (Fig. 2) or a Table IV network; Sec. IV-B's
  optimizer.
- frame_scores, scores, evaluate: ACC and AUC (Sec. IV-B) per frame and video, with balanced ACC,
  AP, EER.
- datasets, test_split: the splits (Sec. IV-A) and the protocols of Tables I-III.
- fit: the training, Eq. 7 step by step; the epoch of the best validation AUC is tested at the end.
Below the divider: settings, the epoch's end, several processes, reports, Fig. 9, --eval-only,
--predict, --compare, --benchmark, the command line.

    python train.py --genotype g.json                                  # the built-in data (demo)
    python train.py --genotype g.json --data ff++ --methods Face2Face  # inner-dataset (Table I)
    python train.py --genotype g.json --data ff++ --methods Face2Face --test-methods FaceSwap
    python train.py --genotype g.json --data ff++ --test-data celeb-df # cross-dataset (Table III)
    python train.py --genotype g.json --mask-weight 0                  # without L_MSE (Table V)
    python train.py --arch resnet18 --data celeb-df                    # baseline (Table IV)
    python train.py --eval-only --checkpoint runs/train/best.pt --test-data celeb-df
    python train.py --predict clip.mp4 photo.jpg frames/ --checkpoint runs/train/best.pt
    python train.py --compare runs/train runs/train-2 ...              # one table and pareto.png
    torchrun --nproc_per_node 4 train.py --genotype g.json --data ff++ # several GPUs (DDP)
    python train.py --genotype g.json --benchmark                      # images/s against resnet18
A run folder (--out; a new one beside it when it exists, unless --resume) holds config.json,
log.jsonl, last.pt, best.pt, metrics.json, predictions.csv and masks.png.
"""
import argparse
import csv
import functools
import io
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler

from add import (ADD, BASELINES, BLOCKS, DEMO_SIZE, GRAD_CLIP, PAPER_SIZE, Baseline, Diverged, Run,
                 Stopped, add_data_arguments, all_ranks, append_log, autocast, count_parameters,
                 d2_layout, epoch_generator, figure, fold_batchnorm, gather_or_fail, gradient_step,
                 init_distributed, load_checkpoint, load_state, loader, loader_workers, new_run_dir,
                 one_process, open_split, peak_memory_mib, prepare_model, random_batch, rank_world,
                 resolve_defaults, restore, resume, run_main, save_checkpoint, save_figure,
                 scale_milestones, split_batch, time_alternately, to_device, write_config)
from masks import (CROP_SIZE, DETECT_SIZE, METHODS, READ_ERRORS, InputError, Parser, bounded,
                   parse_methods, read_faces, reason, write_text)
from ops import genotype_from_dict, genotype_origin, load_genotype

MOMENTUM = 0.9  # Sec. IV-B: "Adam with a momentum value of 0.9 and a weight decay of 0.0005"
WEIGHT_DECAY = 5e-4


def build_model(cfg, genotype):
    """ADD from the genotype (Fig. 2: D^2 blocks of N cells; the mask branch unless no_mask_branch,
    Eq. 4 alone), or a baseline (Table IV)."""
    if cfg["arch"] != "add":
        return Baseline(cfg["arch"], cfg.get("small_input"))  # Table IV: a hand-designed network
    layout = d2_layout(cfg.get("blocks", BLOCKS), cfg["cells_per_block"])
    return ADD(genotype, cfg["channels"], layout, cfg["stem_reductions"],
               mask=not cfg.get("no_mask_branch"))


def run_file(args, name):
    """A file of the run folder (--out)."""
    return f"{args.out}/{name}"


def make_optimizer(model, args):
    """Sec. IV-B: "an Adam optimizer with a momentum value of 0.9" (beta1) "and a weight decay of
    0.0005", lr 0.5, divided by 10 at epochs 80 and 140 of 300. Adam diverges at 0.5 and momentum
    SGD does not learn there (README, Departures: measured), so lr 0.5 is read as 0.5e-3;
    --optimizer sgd is the other reading."""
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), args.lr, betas=(MOMENTUM, 0.999),
                               weight_decay=WEIGHT_DECAY)
    else:
        opt = torch.optim.SGD(model.parameters(), args.lr, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)
    return opt, torch.optim.lr_scheduler.MultiStepLR(
        opt, scale_milestones(args.milestones, args.epochs), 0.1)


# ----------------------------------------------------------------------------------------------
# Evaluation (Sec. IV-B's ACC and AUC, and the field's AP and EER), per frame and per video

@torch.no_grad()
def part_scores(model, loader, device):
    """This process's part of a split (the loader's), in order, the body under training's autocast,
    the heads and scores in fp32 (bf16 scores would tie) -> arrays p (p(fake)), label, ce, mse
    (absent without a mask branch), copied to the host once; its video ids."""
    model.eval()
    out = dict(p=[], label=[], ce=[], mse=[])
    videos = []
    for batch in loader:
        x, M, y = to_device(batch, device)
        with autocast(device):
            logits, m = model(x)
        out["p"].append(logits.float().softmax(-1)[:, 1])
        out["ce"].append(F.cross_entropy(logits.float(), y, reduction="none"))
        if m is not None:
            out["mse"].append((m.float() - M).square().mean((1, 2, 3)))  # Eq. 5, per sample
        out["label"].append(y)
        videos += batch[3]
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items() if v}, videos


def frame_scores(model, loader, device, group):
    """Every process's part_scores, in rank order -> the whole split's arrays and video ids; a
    failure on one process (a frame that cannot be read) ends all (add.gather_or_fail)."""
    parts = gather_or_fail(lambda: part_scores(model, loader, device), group)
    arrays = {k: np.concatenate([a[k] for a, _ in parts if k in a])
              for k in ("p", "label", "ce", "mse") if any(k in a for a, _ in parts)}
    return arrays, [video for _, part in parts for video in part]


def video_level(probs, labels, videos):
    """One prediction per video: the mean of its frames' fake probabilities (and its label)."""
    _, index = np.unique(np.asarray(videos), return_inverse=True)
    counts = np.bincount(index)
    return np.bincount(index, probs) / counts, np.bincount(index, labels) / counts


def equal_error_rate(labels, probs):
    """EER: the error rate where the ROC's false-positive rate equals its false-negative rate,
    linearly interpolated between the two ROC points around the crossing."""
    # imported where used: ~1 s of every start that never scores
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, probs)
    gap = (1 - tpr) - fpr  # FNR - FPR, decreasing along the curve from 1 to -1
    i = int(np.argmax(gap <= 0))
    if i == 0:
        return float(fpr[0])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def scores(labels, probs):
    """ACC and AUC (Sec. IV-B): ACC at the threshold, ROC AUC; beside them balanced ACC (the mean of
    the per-class accuracies: FF++'s test split is 1 real to 4 fakes), AP (fake = positive) and EER.
    The ranking metrics are None when one class is missing."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    labels = np.asarray(labels).round()
    correct = (np.asarray(probs) > THRESHOLD) == labels
    classes = np.unique(labels)
    two = len(classes) == 2
    return dict(acc=float(correct.mean()),  # ACC
                bacc=float(np.mean([correct[labels == c].mean() for c in classes])),
                auc=float(roc_auc_score(labels, probs)) if two else None,  # AUC (Sec. IV-B)
                ap=float(average_precision_score(labels, probs)) if two else None,
                eer=equal_error_rate(labels, probs) if two else None)


def evaluate(model, loader, device, group):
    """Every process scores its part -> (metrics: frames, videos, frame_* and video_* scores, ce,
    mse; per-frame outputs). Scores that are not finite (outputs that overflow) end the run in one
    line."""
    out, videos = frame_scores(model, loader, device, group)
    if not np.isfinite(out["p"]).all():
        raise Diverged("the network's scores are not finite: its outputs overflow")
    video_probs, video_labels = video_level(out["p"], out["label"], videos)
    mse = out.get("mse")
    metrics = dict(frames=len(out["p"]), videos=len(video_labels),  # ACC and AUC, frame and video
                   **{f"frame_{k}": v for k, v in scores(out["label"], out["p"]).items()},
                   **{f"video_{k}": v for k, v in scores(video_labels, video_probs).items()},
                   ce=float(out["ce"].mean()), mse=None if mse is None else float(mse.mean()))
    return metrics, dict(out, videos=videos)


# ----------------------------------------------------------------------------------------------
# The protocols (Sec. IV-A, IV-C) and the whole training

def datasets(args):
    """Train and validation splits of --data/--methods (FF++'s official splits; Celeb-DF:
    masks.py)."""
    methods = parse_methods(args.data, args.methods)
    return [open_split(args, split, methods, split == "train") for split in ("train", "val")]


def test_split(args):
    """The test split and its name: --data/--methods' own (Table I), other manipulations of the
    same dataset (--test-methods: Table II), or another dataset (--test-data: Table III)."""
    test_data = args.test_data or args.data  # Table I: the training data's own test split
    same = test_data == args.data  # Table III when False: another dataset (--test-data)
    # Table II: other methods
    methods = parse_methods(test_data, args.test_methods or (args.methods if same else None))
    other = dict(data=test_data, root=args.test_root or (args.root if same else None))
    if not same:  # real data -> synthetic: the demo's
        other.update(videos=DEMO["videos"], frames=DEMO["frames"])
    return open_split(args, "test", methods, False, **other), f"{test_data}:{','.join(methods)}"


def fit(args, state, device, group):
    """Sec. IV-B's training: --epochs passes of Eq. 7, the lr / 10 at the milestones, validation
    after each epoch; the epoch of the best validation AUC is tested at the end. Stops, progress and
    the vote of several processes (group: torchrun's, DDP): add.Run; the epoch's end (checkpoints,
    the log): end_epoch."""
    rank, world = rank_world(group)
    genotype = None
    if state and state["genotype"]:  # a resumed run: the genotype it trains
        genotype = genotype_from_dict(state["genotype"], run_file(args, "last.pt"))
    elif args.arch == "add":
        genotype = load_genotype(args.genotype)
    (train_set, val_set), (test_set, test_name) = datasets(args), test_split(args)
    model = prepare_model(build_model(vars(args), genotype), device)
    optimizer, scheduler = make_optimizer(model, args)
    start, best = (state["epoch"], state["best_auc"]) if state else (0, -1.0)
    parts = dict(model=model, optimizer=optimizer, scheduler=scheduler)
    if state:  # a resumed run: the model, optimizer, scheduler and generator as they were
        restore(state, parts, run_file(args, "last.pt"))
    net = model
    if world > 1:  # gradients averaged; rank 0's BatchNorm statistics broadcast before each step
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, ids)
    sampler, data = training_loaders(args, (train_set, val_set, test_set), test_name, model,
                                     device, rank, world)
    train_data, val_data, test_data = data
    steps = len(train_data)
    advice = "the last good checkpoint is intact: lower --lr, or --resume from it"
    with Run(device, data, (args.epochs - start) * steps, group, advice) as run:
        for epoch in range(start, args.epochs):
            sampler.set_epoch(epoch)  # an epoch's order depends on (seed, epoch) only: resumable
            net.train()
            tic = time.time()
            lr = optimizer.param_groups[0]["lr"]
            sums = torch.zeros(3, device=device)  # (CE, MSE, loss) on the device
            flips = epoch_generator(args.seed, epoch, rank)  # random flips, the same when resumed
            for step, batch in enumerate(train_data):
                terms = gradient_step(net, optimizer, batch, device, args.mask_weight,
                                      flips)  # Eq. 7 (Table V: --mask-weight 0)
                sums += terms
                if run.step(terms[2], len(batch[2]), epoch, step, steps) and step + 1 < steps:
                    raise Stopped(stopped(args, run.signal, f"in epoch {epoch + 1}, after step "
                                          f"{step + 1} of {steps}", epoch))
            scheduler.step()
            run.check_weights(model, epoch)  # before the validation uses them
            if world > 1:  # each process's last step moved its own: rank 0's, as DDP broadcasts
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            ce, mse, _ = (all_ranks(sums, group).mean(0) / steps).tolist()
            line = dict(epoch=epoch + 1, train_ce=ce, train_mse=mse, lr=lr,
                        train_seconds=time.time() - tic, train_images=steps * args.batch_size)
            if args.arch != "add" or args.no_mask_branch:
                line["train_mse"] = None  # no mask branch
            val = evaluate(model, val_data, device, group)
            line["seconds"] = time.time() - tic
            best = run.on_rank0(lambda: end_epoch(args, parts, genotype, line, val[0], best))
            if run.vote(run.signal)[0]:  # came in its last step, or during the validation
                raise Stopped(stopped(args, run.signal, f"at the end of epoch {epoch + 1}",
                                      epoch + 1))
        run.stop_now(stopped(args, "{}", "during the final test", args.epochs))
        return test(args, model, val_data, (test_set, test_data, test_name), device, run)


# ==============================================================================================
# Below: not the paper's method.

# Real data: the paper's settings (Sec. IV-B) but for the lr (README, Departures); the built-in
# data: a demo for 2 cores
REAL_DATA = dict(PAPER_SIZE, image_size=256, batch_size=96, lr=5e-4, epochs=300,
                 milestones=[80, 140])
DEMO = dict(DEMO_SIZE, image_size=64, batch_size=32, lr=1e-3, epochs=12, milestones=[200, 280],
            videos=160, frames=4)
DEFAULTS = dict(arch="add", mask_weight=1.0, optimizer="adam", seed=0, device="auto",
                no_mask_branch=False, genotype_origin=None)
# px: ImageNet's strides (32x) would end a smaller face below 4x4 (--small-input's default)
SMALL_INPUT_BELOW = 128
FIG9_FACES = 8  # faces in masks.png (Fig. 9) and in --predict's picture
THRESHOLD = 0.5  # p(fake) above which an input is called fake (ACC, --predict)
# Options of earlier versions that are constants here (or gone): a checkpoint that set them
# otherwise cannot resume
BUILT_IN = dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, no_flips=False,
                blocks=BLOCKS, sync_bn=False, compile=False, deterministic=False,
                threshold=THRESHOLD, detect_size=DETECT_SIZE)
# What the restored optimizer and scheduler hold: a resumed run cannot change it
SCHEDULE = ("lr", "optimizer", "epochs", "milestones")
MODEL_KEYS = ("arch", "channels", "cells_per_block", "stem_reductions", "image_size", "mask_weight",
              "small_input")
# --eval-only and --predict: the checkpoint's run's unless given (the same batches give
# bit-identical metrics)
CHECKPOINT_KEYS = ("data", "root", "methods", "image_size", "videos", "frames", "batch_size",
                   "synthetic", "data_seed")


def training_loaders(args, sets, test_name, model, device, rank, world):
    """The loaders (in training each process its share of the global batch, in an order that
    depends on (seed, epoch) only; validation and test: each process a part) and the header."""
    train_set, val_set, test_set = sets
    workers = loader_workers(args.data) if args.workers is None else args.workers
    share = split_batch(args.batch_size, world)
    sampler = DistributedSampler(train_set, world, rank, seed=args.seed, drop_last=True)  # shuffled
    train_data = loader(train_set, share, workers, device, sampler, True)
    if not len(train_data):
        raise InputError(f"--batch-size {args.batch_size}: the train split has only "
                         f"{len(train_set)} samples ({len(train_set) // world} per process)")
    print(f"{args.arch}: {count_parameters(model) / 1e6:.2f} M parameters; train "
          f"{len(train_set)}, val {len(val_set)}, test {len(test_set)} ({test_name}) samples; "
          f"{world} process(es) on {device}")
    scored = (scoring_loader(s, args.batch_size, workers, device, rank, world)
              for s in (val_set, test_set))
    return sampler, (train_data, *scored)


def scoring_loader(dataset, batch_size, workers, device, rank, world):
    """A split every process scores a part of, at its share of the global batch: the rank-th of
    `world` contiguous parts, so that the parts in rank order are the split in order (no sample
    twice, none left out)."""
    n = len(dataset)
    part = range(rank * n // world, (rank + 1) * n // world)
    return loader(dataset, max(1, batch_size // world), workers, device, part)


def stopped(args, name, where, held):
    """The one line a stop ends with; held: the epochs the last checkpoint holds."""
    name = name or "a signal to another process"
    if not held:
        return (f"stopped by {name} {where}; no checkpoint yet (one is written at each epoch's "
                "end): start the run again")
    then = "" if held == args.epochs else f"trains epochs {held + 1}-{args.epochs} and "
    return (f"stopped by {name} {where}; the last checkpoint, {run_file(args, 'last.pt')}, "
            f"holds epoch {held}: python train.py --resume --out {args.out} {then}runs the test")


def end_epoch(args, parts, genotype, line, val, best):
    """Rank 0, after the validation (val: its metrics): the epoch's line of log.jsonl (line: its
    training CE and MSE, lr and times; written before the checkpoint: add.trim_log), best.pt (the
    best validation frame AUC so far), last.pt; the epoch printed -> the best AUC."""
    auc = val["frame_auc"] if val["frame_auc"] is not None else val["frame_acc"]
    append_log(run_file(args, "log.jsonl"), dict(line, val_ce=val["ce"], val_mse=val["mse"],
                                                 val=val))
    state = dict({k: part.state_dict() for k, part in parts.items()}, epoch=line["epoch"],
                 rng=torch.get_rng_state(), config=vars(args), genotype=genotype_dict(genotype),
                 best_auc=max(best, auc))
    if auc > best:
        save_checkpoint(state, run_file(args, "best.pt"))
    save_checkpoint(state, run_file(args, "last.pt"))
    mse = "" if line["train_mse"] is None else f" MSE {line['train_mse']:.4f}"
    val_mse = "" if val["mse"] is None else f" MSE {val['mse']:.4f}"
    print(f"epoch {line['epoch']}/{args.epochs}  train CE {line['train_ce']:.4f}{mse}  val CE "
          f"{val['ce']:.4f}{val_mse}  ACC {val['frame_acc']:.4f} AUC "
          f"{val['frame_auc'] or float('nan'):.4f}  {line['seconds']:.1f} s"
          + ("  (best)" if auc > best else ""), flush=True)
    return max(best, auc)


def test(args, model, val_data, split, device, run):
    """The best checkpoint on the validation and test splits -> metrics.json, predictions.csv, the
    table, masks.png (report)."""
    path = run_file(args, "best.pt")
    best = load_checkpoint(path)
    load_state(model, best["model"], path)
    val = evaluate(model, val_data, device, run.group)
    return report(args, model, split, device, "metrics.json", best, run, val)


def report(args, model, split, device, name, state, run, val=None):
    """The test split (split: its dataset, loader, name) scored by every process; rank 0 writes
    NAME (metrics, with the checkpoint's epoch and genotype, and val's: (metrics, outputs) or
    None), predictions.csv (a row a frame: it reproduces them), masks.png -> the metrics (rank 0's,
    on every process)."""
    test_set, test_data, test_name = split
    test = evaluate(model, test_data, device, run.group)

    def write():
        rows = {f"test {test_name}": test[0]}
        if val:
            methods = ",".join(parse_methods(args.data, args.methods))
            rows = {f"val  {args.data}:{methods}": val[0], **rows}
        metrics = dict(arch=args.arch, parameters=count_parameters(model), epoch=state["epoch"],
                       mask_weight=args.mask_weight, genotype=state.get("genotype"),
                       **{k.split()[0]: dict(data=k.split()[1], **v) for k, v in rows.items()})
        write_text(run_file(args, name), json.dumps(metrics, indent=1))
        out = test[1]
        lines = [[video, method, frame, int(label), f"{p:.6f}"] for (method, video, frame), label, p
                 in zip(test_set.samples, out["label"], out["p"])]
        text = io.StringIO()
        csv.writer(text).writerows([["video", "method", "frame", "label", "p_fake"]] + lines)
        write_text(run_file(args, "predictions.csv"), text.getvalue())
        print_table(rows)
        visualize(model, test_set, run_file(args, "masks.png"), device)
        print(f"wrote {args.out}: {name}, predictions.csv, masks.png")
        return metrics
    return run.on_rank0(write)


def eval_only(args, model, state, device, group):
    """--eval-only: the checkpoint's network on a test split, its own run's unless --test-data,
    --test-methods or --test-root say otherwise, into a new run folder (never the training
    run's); under torchrun every process scores a part."""
    if rank_world(group)[0] == 0:
        write_config(args, run_file(args, "config.json"))
    test_set, test_name = test_split(args)
    workers = loader_workers(args.data) if args.workers is None else args.workers
    data = scoring_loader(test_set, args.batch_size, workers, device, *rank_world(group))
    with Run(device, [data], group=group) as run:
        run.stop_now("stopped by {} during the evaluation; nothing is lost: run it again")
        return report(args, model, (test_set, data, test_name), device, "eval.json", state, run)


def print_table(rows):
    """rows: {name: metrics} -> one line each."""
    cols = ["frames", "videos"]
    cols += [f"{u}_{k}" for u in ("frame", "video") for k in ("acc", "bacc", "auc", "ap", "eer")]
    width = max(len(name) for name in rows) + 2
    print(" " * width + "".join(f"{c:>11s}" for c in cols))
    for name, m in rows.items():
        cells = [f"{'n/a':>11s}" if m[c] is None else f"{m[c]:>11d}" if isinstance(m[c], int)
                 else f"{m[c]:>11.4f}" for c in cols]
        print(f"{name:<{width}s}" + "".join(cells))


def draw_faces(path, faces, ms, captions, title, hulls=None):
    """A row of faces ((K, S, S, 3) uint8), each with the predicted region m over it as a heat map
    (ms (K, S, S) or None), the hull mask M's outline (hulls or None) and a caption: masks.png,
    --predict's."""
    fig, ax = figure(1, len(faces), (2.2 * len(faces), 2.6))
    for k, a in enumerate(ax[0]):
        a.imshow(faces[k])
        if ms is not None:
            a.imshow(ms[k], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        if hulls is not None:
            a.contour(hulls[k], levels=[0.5], colors="white", linewidths=0.8)
        a.set_title(captions[k], fontsize=9)
        a.axis("off")
    save_figure(fig, path, title)


def spread_out(n):
    """Up to FIG9_FACES indices spread evenly over range(n)."""
    return np.linspace(0, n - 1, min(FIG9_FACES, n)).round().astype(int)


def visualize(model, dataset, path, device):
    """masks.png, as Fig. 9: K test faces spread over the split, with m, M and p(fake)."""  # Fig. 9
    idx = spread_out(len(dataset))
    x, M, y, _ = zip(*(dataset[i] for i in idx))
    faces, hulls = torch.stack(x), torch.stack(M)
    with torch.no_grad():
        logits, m = model.eval()(to_device((faces, hulls, torch.tensor(y)), device)[0])
    p = logits.float().softmax(-1)[:, 1].cpu()
    draw_faces(path, faces.permute(0, 2, 3, 1).numpy(),
               None if m is None else m[:, 0].float().cpu().numpy(),
               [f"p(fake) {p[i]:.2f}, {'fake' if y[i] else 'real'}" for i in range(len(idx))],
               "predicted region m (heat), hull mask M (outline)", hulls[:, 0].numpy())


def genotype_dict(genotype):
    if genotype is not None:
        return {k: [list(pair) for pair in cell] for k, cell in genotype._asdict().items()}


def model_from_checkpoint(path, device):
    """A train.py checkpoint -> (its network for inference: BatchNorm folded; its configuration;
    its state)."""
    state = load_checkpoint(path)
    cfg = state.get("config") if isinstance(state, dict) else None
    if not isinstance(cfg, dict) or "model" not in state:
        raise InputError(f"{path}: not a train.py checkpoint (no model or config inside)")
    if "alpha_normal" in state["model"]:
        raise InputError(f"{path}: a search checkpoint (search.py's search.pt), not a trained "
                         "detector; train its genotype first: python train.py --genotype g.json")
    missing = [f"--{k.replace('_', '-')}" for k in MODEL_KEYS if k not in cfg]
    if "epoch" not in state:
        missing.append("epoch")
    if missing:
        raise InputError(f"{path}: written by another version of train.py (its configuration has "
                         f"no {', '.join(missing)}); train it again")
    genotype = genotype_from_dict(state["genotype"], path) if state.get("genotype") else None
    model = build_model(cfg, genotype)
    load_state(model, state["model"], path)
    return prepare_model(fold_batchnorm(model), device).eval(), cfg, state


# ----------------------------------------------------------------------------------------------
# --predict: is this video fake? (the preparation of training, then the checkpoint's network)

def score_input(model, path, args, device):
    """A video, folder of frames or photo -> dict(p_fake, verdict, frames_scored, frames, crops, m),
    or dict(reason) when it has no face or cannot be read."""
    try:
        found = list(read_faces(path, args.frames))
    except Exception as e:  # one input's failure is reported on its line; the others still run
        what = "unreadable" if isinstance(e, READ_ERRORS) else "failed"
        return dict(reason=f"{what} ({reason(e)})")
    faces = [f for f in found if f[1] is not None]
    if not faces:
        return dict(reason=f"no face found in {len(found)} frame(s)" if found
                    else "no frames decoded")
    s = args.image_size  # the CROP_SIZE crop resized as the loaders resize prepared faces
    crops = np.stack([np.asarray(Image.fromarray(c).resize((s, s), Image.BILINEAR))
                      if s != CROP_SIZE else c for _, c, _, _ in faces])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2)  # (K, 3, S, S) uint8
    x = x.to(device, memory_format=torch.channels_last).float() / 255
    with torch.no_grad(), autocast(device):  # as the evaluation scores
        logits, m = model(x)
    p = logits.float().softmax(-1)[:, 1].cpu().numpy()
    frames = [dict(frame=i, p_fake=float(q), box=[round(float(v), 1) for v in box])
              for (i, _, _, box), q in zip(faces, p)]
    return dict(p_fake=float(p.mean()), verdict="fake" if p.mean() > THRESHOLD else "real",
                frames_scored=len(faces), frames_read=len(found), frames=frames, crops=crops,
                m=None if m is None else m[:, 0].float().cpu().numpy())


def predict_files(args, model, device):
    """--predict: a line an input, OUT/predictions.json, and a picture of up to FIG9_FACES of
    each input's crops."""
    missing = [p for p in args.predict if not os.path.exists(p)]
    if missing:
        raise InputError(f"{missing[0]}: no such file or folder (expected a video, a folder of "
                         "frames or a photo)")
    torch.backends.cudnn.benchmark = False  # a batch of each size (faces an input): no tuning
    report = {}
    print(f"scoring {len(args.predict)} input(s) with {args.checkpoint} ({args.arch}, "
          f"{args.image_size} px); writing {args.out}")
    with Run(device) as run:
        run.stop_now(
            "stopped by {}: the inputs above were scored, predictions.json was not written")
        for n, path in enumerate(args.predict):
            result = score_input(model, path, args, device)
            crops, m = result.pop("crops", None), result.pop("m", None)  # the picture's
            if "reason" in result:
                print(f"{path}: {result['reason']}")
            else:
                name = os.path.basename(os.path.normpath(path))
                picture = run_file(args, f"{n:03d}_{name}.png")
                pick = spread_out(len(crops))
                draw_faces(picture, crops[pick], None if m is None else m[pick],
                           [f"frame {result['frames'][j]['frame']}\np(fake) "
                            f"{result['frames'][j]['p_fake']:.2f}" for j in pick],
                           f"{path}: p(fake) {result['p_fake']:.3f} ({result['verdict']})")
                print(f"{path}: p(fake) {result['p_fake']:.4f}  {result['verdict'].upper()} at "
                      f"threshold {THRESHOLD}  ({result['frames_scored']} of "
                      f"{result['frames_read']} frames scored)  {picture}")
            report[path] = result
    write_text(run_file(args, "predictions.json"), json.dumps(report, indent=1))
    print(f"wrote {args.out}/predictions.json")
    return report


# ----------------------------------------------------------------------------------------------
# --compare: runs grouped by what makes their network, data and training (but seeds and lr), and
# their cells
COMPARE_KEYS = MODEL_KEYS + ("no_mask_branch", "data", "methods", "synthetic", "videos", "frames",
                             "batch_size", "epochs", "milestones", "optimizer")
# a training CE at or above this in the last epoch: the network did not train (ln 2 = 0.693)
AT_CHANCE = 0.65


def compare(args):
    """--compare RUN_DIR...: finished runs grouped by all but their seeds (--seed, --data-seed) -> a
    row a group (parameters, lr, images/s, test frame and video AUC: mean and standard deviation
    over the seeds, validation AUC), printed and drawn as pareto.png (AUC against size); then the
    verdicts. A run whose training CE stayed at chance is marked and left out of the test AUCs, not
    of the validation AUC that picks an lr."""
    groups = {}
    for run in args.compare:
        cfg, metrics, log = read_run(run)
        same = dict({k: cfg.get(k) for k in COMPARE_KEYS}, cells=metrics.get("genotype"))
        key = json.dumps(same, sort_keys=True)
        groups.setdefault((key, cfg["lr"]), []).append((run, cfg, metrics, log))
    rows = sorted((dict(compare_row(runs), architecture=key) for (key, _), runs in groups.items()),
                  key=lambda r: (r["parameters"], r["name"], r["lr"]))
    print(f"{'name':28s} {'kind':13s} {'width':>7s} {'params':>8s} {'lr':>7s} {'img/s':>7s}  "
          f"{'test frame AUC':>15s}  {'video AUC':>15s}  {'val AUC':>7s}  n")
    for r in rows:
        chance = ""
        if r["at_chance"]:
            chance = f"  ({r['at_chance']} at chance, left out of the test AUCs: {r['failed']})"
        print(f"{r['name'][:28]:28s} {r['kind']:13s} {r['width']:>7s} "
              f"{r['parameters'] / 1e6:>7.2f}M {r['lr']:>7g} "
              f"{r['images_per_s'] or float('nan'):>7.1f}  {r['frame_auc']:.3f} ± "
              f"{r['frame_auc_std']:.3f}  {r['video_auc']:.3f} ± {r['video_auc_std']:.3f}  "
              f"{r['val_auc']:>7.3f}  {r['n']}{chance}")
    verdicts(rows)
    fig, axes = figure(1, 1, (8, 5.5))
    ax = axes[0, 0]
    for kind, mark in (("searched", "o"), ("random", "s"), ("hand-designed", "^"), ("ADD", "D")):
        picked = [r for r in rows if r["kind"] == kind and r["n"]]
        if picked:
            ax.errorbar([r["parameters"] for r in picked], [r["frame_auc"] for r in picked],
                        [r["frame_auc_std"] for r in picked], fmt=mark, capsize=3, label=kind)
        for r in picked:
            ax.annotate(f"{r['name']} {r['width'] if r['width'] != '-' else ''}".strip(),
                        (r["parameters"], r["frame_auc"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set(xscale="log", xlabel="parameters", title="AUC against size",
           ylabel="test frame AUC (mean ± std over seeds)")
    ax.legend()
    save_figure(fig, run_file(args, "pareto.png"))
    print(f"wrote {args.out}/pareto.png")
    return rows


def compare_row(runs):
    """One group of runs (the same but for their seeds) -> its row."""
    _, cfg, metrics, _ = runs[0]
    kind = "hand-designed"
    name = cfg["arch"]
    width = "-"
    if cfg["arch"] == "add":
        kind = {"random": "random", "search": "searched"}.get(cfg.get("genotype_origin"), "ADD")
        name = os.path.splitext(os.path.basename(cfg.get("genotype") or ""))[0]
        width = f"C{cfg['channels']} N{cfg['cells_per_block']}"
    failed = [run for run, _, _, log in runs if log[-1]["train_ce"] >= AT_CHANCE]
    kept = [(c, m) for run, c, m, _ in runs if run not in failed]
    frame, video = (np.array([m["test"][f"{level}_auc"] for _, m in kept], dtype=float)
                    for level in ("frame", "video"))
    # all: an lr that fails a seed is worse
    val = np.array([m["val"]["frame_auc"] for _, _, m, _ in runs], dtype=float)

    def mean(a):
        return float(a.mean()) if len(a) else float("nan")

    def spread(a):
        return float(a.std(ddof=1)) if len(a) > 1 else 0.0
    timed = [(e["train_images"], e["train_seconds"]) for _, _, _, log in runs for e in log
             if "train_seconds" in e]
    rate = sum(i for i, _ in timed) / sum(s for _, s in timed) if timed else None
    return dict(name=name, kind=kind, parameters=metrics["parameters"], lr=cfg["lr"],
                width=width,
                images_per_s=rate, frame_auc=mean(frame), frame_auc_std=spread(frame),
                video_auc=mean(video), video_auc_std=spread(video), val_auc=mean(val),
                n=len(kept), at_chance=len(failed), failed=" ".join(failed),
                seeds={f"{c['seed']}/{c.get('data_seed', 0)}": m["test"]["frame_auc"]
                       for c, m in kept})


def verdicts(rows):
    """The architecture (a row) as the unit: searched minus random and minus hand-designed, Welch's
    95% interval over the rows' mean test AUC; each searched row minus each hand-designed one paired
    by seed (Student's 95% interval). Rows that differ only in lr are a sweep: its pick (best
    validation AUC)."""
    from scipy.stats import ttest_1samp, ttest_ind
    architectures = {}
    for r in rows:
        architectures.setdefault(r["architecture"], []).append(r)
    sweeps = [s for s in architectures.values() if len(s) > 1]
    if sweeps:
        for sweep in sweeps:
            pick = max(sweep, key=lambda r: r["val_auc"])
            lrs = sorted(r["lr"] for r in sweep)
            edge = "; at the grid's edge: extend it" if pick["lr"] in (lrs[0], lrs[-1]) else ""
            print(f"lr pick, {pick['name']} {pick['width']}: {pick['lr']:g} of "
                  f"{', '.join(f'{lr:g}' for lr in lrs)} (mean validation frame AUC "
                  f"{pick['val_auc']:.3f}){edge}")
        return print(
            "(an architecture at several lrs: the comparisons take one lr an architecture)")
    kinds = {k: [r for r in rows if r["kind"] == k and r["n"]]
             for k in ("searched", "random", "hand-designed")}
    for other in ("random", "hand-designed"):
        a, b = [r["frame_auc"] for r in kinds["searched"]], [r["frame_auc"] for r in kinds[other]]
        if len(a) > 1 and len(b) > 1:
            ci = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
            print(f"searched - {other}: {np.mean(a) - np.mean(b):+.3f} [{ci.low:+.3f}, "
                  f"{ci.high:+.3f}] test frame AUC (Welch's 95% interval over architectures: "
                  f"{len(a)} and {len(b)})")
    for s in kinds["searched"]:
        for h in kinds["hand-designed"]:
            seeds = sorted(set(s["seeds"]) & set(h["seeds"]))
            if len(seeds) > 1:
                d = [s["seeds"][k] - h["seeds"][k] for k in seeds]
                ci = ttest_1samp(d, 0.0).confidence_interval(0.95)
                print(f"  {s['name']} {s['width']} - {h['name']}: {np.mean(d):+.3f} "
                      f"[{ci.low:+.3f}, {ci.high:+.3f}] (paired by seed, {len(seeds)} seeds)")


def read_run(run):
    """A finished train.py run folder -> (config, metrics, log lines); a one-line error
    otherwise."""
    try:
        files = [open(os.path.join(run, name)).read() for name in ("config.json", "metrics.json",
                                                                   "log.jsonl")]
        cfg, metrics = json.loads(files[0]), json.loads(files[1])
        log = [json.loads(line) for line in files[2].splitlines()]
    except (OSError, ValueError) as e:
        raise InputError(f"{run}: not a finished train.py run folder ({reason(e)})")
    if not (isinstance(cfg, dict) and "arch" in cfg and isinstance(metrics, dict)
            and isinstance(metrics.get("test"), dict)):
        raise InputError(f"{run}: not a finished train.py run folder (its config.json or "
                         "metrics.json is another file)")
    return cfg, metrics, log


# ----------------------------------------------------------------------------------------------
# --benchmark

def benchmark(args, device, calls=10, rounds=3):
    """--benchmark: training and inference images/s of --arch and of resnet18 (Table IV's pair) on
    random batches, timed alternately (add.time_alternately); inference with BatchNorm folded, as
    --predict."""
    steps, sizes, batch = {}, {}, random_batch(args.batch_size, args.image_size)
    x = to_device(batch, device)[0]  # the inference's faces
    for arch in dict.fromkeys((args.arch, "resnet18")):
        cfg = dict(vars(args), arch=arch)
        genotype = load_genotype(args.genotype) if arch == "add" else None
        model = prepare_model(build_model(cfg, genotype), device).train()
        folded = prepare_model(fold_batchnorm(build_model(cfg, genotype)), device)
        optimizer, _ = make_optimizer(model, args)
        steps[arch, "training"] = functools.partial(gradient_step, model, optimizer, batch, device,
                                                    args.mask_weight if arch == "add" else 0.0)
        steps[arch, "inference"] = functools.partial(torch.no_grad()(folded), x)
        sizes[arch] = count_parameters(model)
    seconds = time_alternately(steps, device, calls, rounds)
    result = {arch: {kind: args.batch_size / s for (a, kind), s in seconds.items() if a == arch}
              for arch in sizes}
    for arch, r in result.items():
        print(f"{arch} ({sizes[arch] / 1e6:.2f} M parameters), batch {args.batch_size}, "
              f"{args.image_size} px, on {device}: training {r['training']:.1f} images/s, "
              f"inference {r['inference']:.1f} images/s (BatchNorm folded)")
    if len(result) == 2:
        (a, ra), (o, ro) = result.items()
        print(f"{a} / {o}: training {ra['training'] / ro['training']:.2f}x, inference "
              f"{ra['inference'] / ro['inference']:.2f}x (best of {rounds} alternating rounds); "
              f"peak memory {peak_memory_mib(device):.0f} MiB")
    return result


def parse_args(argv=None):
    """The command line; every option left unset is None here, filled in by configure."""
    p = Parser(usage="python train.py [options]", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("the paper's network and training (Sec. III-B to IV-B; on the "
                             "built-in data: the demo's sizes)")
    g.add_argument("--genotype", help="g.json from search.py (needed for --arch add)")
    g.add_argument("--arch", choices=("add",) + BASELINES,
                   help="add (the default), or a network trained from scratch in the same harness "
                   "(Table IV: resnet18, resnet152, vgg16, xception; and small ones of the field)")
    g.add_argument("--channels", type=bounded(int, 1),
                   help="C of the first block (48: ~5 M parameters, paper: 5.6 M; demo: 16)")
    g.add_argument("--cells-per-block", type=bounded(int, 1),
                   help="N normal cells per D^2 block (paper: 4, Sec. IV-D); demo: 1")
    g.add_argument("--mask-weight", type=bounded(float, 0),
                   help="alpha of Eq. 7 (paper and default: 1; Fig. 5: 0.1, 10; 0: Table V's "
                   "'alpha = 0', the mask branch kept, m unsupervised)")
    g.add_argument("--batch-size", type=bounded(int, 1),
                   help="the global batch, split across processes (paper: 96; demo: 32)")
    g.add_argument("--epochs", type=bounded(int, 1), help="paper: 300; demo: 12")
    g.add_argument("--milestones", type=bounded(int, 1), nargs="+",
                   help="lr / 10 at these epochs of 300, scaled to --epochs (paper: 80 140; demo: "
                   "200 280)")
    g.add_argument("--test-data", choices=tuple(METHODS),
                   help="test on another dataset (Table III: celeb-df)")
    g.add_argument("--test-methods", help="test on other manipulations (Table II: FaceSwap)")
    g.add_argument("--no-mask-branch", action="store_true", default=None,
                   help="ADD without the mask branch (Eq. 4 alone)")
    g = p.add_argument_group("departures from the paper (README, Departures)")
    g.add_argument("--lr", type=bounded(float, 0),
                   help="paper: 0.5, read as 0.5e-3 for Adam (real data: 5e-4; demo: 1e-3)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), help="adam (the paper's, the default), "
                   "or momentum SGD: the other reading of the paper's lr 0.5")
    g.add_argument("--stem-reductions", type=bounded(int, 0),
                   help="stride-2 stem layers, not described by the paper (3: 256 -> 32 px; demo: "
                   "2, 64 -> 16 px)")
    g.add_argument("--small-input", action=argparse.BooleanOptionalAction,
                   help="hand-designed networks: the first stride-2 layer at stride 1, a 64 px "
                   f"face ending on 4x4 as in ADD (default: on below {SMALL_INPUT_BELOW} px)")
    g = p.add_argument_group("running: data, device, resume")
    add_data_arguments(g)
    g.add_argument("--test-root", help="prepared folder of --test-data (default: data/<name>)")
    g.add_argument("--seed", type=bounded(int, 0), help="default 0")
    g.add_argument("--device", help="auto (CUDA if present; the default), cpu, cuda, ...")
    g.add_argument("--out", help="run folder (default runs/train, runs/eval, ...; a new one beside "
                   "it if it exists, unless --resume)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt: the options given now, else its own")
    g = p.add_argument_group(
        "extras: evaluation, prediction, comparison, speed (the last three: one process)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --checkpoint on a test split (its run's by default)")
    g.add_argument("--checkpoint",
                   help="with --eval-only or --predict: a best.pt or last.pt written by train.py")
    g.add_argument("--predict", nargs="+", metavar="PATH",
                   help="score videos, folders of frames or photos with --checkpoint")
    g.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="finished runs grouped by all "
                   "but their seeds: a table, the verdicts, pareto.png (AUC against size)")
    g.add_argument("--benchmark", action="store_true",
                   help="training and inference images/s against resnet18, then exit")
    return p.parse_args(argv)


def configure(args, cfg=None):
    """Every option left unset from the demo's or the real data's settings; with a checkpoint's
    configuration cfg, its network and (--eval-only) its data unless given; the checks across
    options (of a resumed run: on the checkpoint's options merged with those given)."""
    mode = ("predict" if args.predict else "eval" if args.eval_only
            else "compare" if args.compare else "train")
    if mode in ("eval", "predict") and not args.checkpoint:
        raise InputError(f"--{'eval-only' if args.eval_only else 'predict'} needs --checkpoint "
                         "PATH (a best.pt or last.pt written by train.py)")
    for key in CHECKPOINT_KEYS:
        if cfg and mode == "eval" and getattr(args, key) is None:
            setattr(args, key, cfg.get(key, "easy" if key == "synthetic" else None))
    if mode == "predict":
        args.frames = args.frames or 32  # evenly spaced frames per video
    args = resolve_defaults(args, dict(REAL_DATA, **DEFAULTS), dict(DEMO, **DEFAULTS))
    if cfg:
        if mode == "eval" and args.image_size != cfg["image_size"]:
            raise InputError(f"--image-size {args.image_size}: {args.checkpoint} was trained at "
                             f"{cfg['image_size']} px")
        # what the printed config shows is used
        for key in MODEL_KEYS + ("no_mask_branch", "genotype", "epochs", "seed"):
            setattr(args, key, cfg.get(key))
    if args.arch == "add" and not args.genotype and mode == "train" and not args.resume:
        raise InputError(
            "--genotype: needed for --arch add; write one with: python search.py --out g.json")
    if args.arch != "add" or args.no_mask_branch:
        args.mask_weight = 0.0  # no mask branch: nothing for Eq. 5 to supervise
    if args.small_input is None:
        args.small_input = args.image_size < SMALL_INPUT_BELOW
    args.out = args.out or f"runs/{mode}"
    if args.arch == "add" and args.genotype and args.genotype_origin is None:  # --compare's kind
        args.genotype_origin = genotype_origin(args.genotype)
    return args


def main(argv=None):
    given = parse_args(argv)
    # weights decaying to 0 (a run at chance) go subnormal: x86 steps 8x slower
    torch.set_flush_denormal(True)
    args = configure(argparse.Namespace(**vars(given)))
    for flag in ("compare", "predict", "benchmark"):
        if getattr(args, flag):
            one_process(f"--{flag}")
    if args.compare:
        args.out = new_run_dir(args.out)
        return compare(args)
    rank, world, device, group = init_distributed(args.device)
    torch.manual_seed(args.seed)
    if args.eval_only or args.predict:  # the checkpoint's network, and its data unless given
        model, cfg, state = model_from_checkpoint(args.checkpoint, device)
        args = configure(argparse.Namespace(**vars(given)), cfg)
        args.out = new_run_dir(args.out, group)
        print(f"run folder: {args.out}", flush=True)
        if args.predict:
            return predict_files(args, model, device)
        return eval_only(args, model, state, device, group)
    if args.benchmark:
        return benchmark(args, device)
    state = None
    if args.resume:
        path = run_file(args, "last.pt")
        needed = ("optimizer", "scheduler", "epoch", "best_auc")
        args, state = resume(path, given, vars(args), needed, BUILT_IN, SCHEDULE, rank == 0)
        args = configure(args)
        complete = " (complete: the test runs)" if state["epoch"] == args.epochs else ""
        print(f"resumed {path} at epoch {state['epoch']}{complete}")
    else:
        args.out = new_run_dir(args.out, group)
    print(f"run folder: {args.out}", flush=True)
    if rank == 0:
        write_config(args, run_file(args, "config.json"))
    return fit(args, state, device, group)


if __name__ == "__main__":
    run_main(main)
