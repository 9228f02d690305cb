"""Train and evaluate ADD (Sec. III-B to III-D, IV-B, IV-C): the network built from a searched
genotype, trained with Eq. 7 (CE' + alpha * MSE), evaluated by ACC and ROC AUC at frame and video
level, with the protocols of Tables I-V and torchvision baselines in the same harness (Table IV).

    python train.py --genotype g.json                                       # built-in synthetic data (demo)
    python train.py --genotype g.json --data ff++ --methods Face2Face       # inner-dataset (Table I)
    python train.py --genotype g.json --data ff++ --methods Face2Face --test-methods FaceSwap   # Table II
    python train.py --genotype g.json --data ff++ --test-data celeb-df      # cross-dataset (Table III)
    python train.py --genotype g.json --mask-weight 0                       # without L_MSE (Table V)
    python train.py --arch resnet18 --data celeb-df                         # baseline (Table IV)
    python train.py --eval-only --checkpoint runs/train/best.pt --data celeb-df
    torchrun --nproc_per_node 4 train.py --genotype g.json --data ff++      # several GPUs (DDP)
    python train.py --genotype g.json --benchmark                           # images/s, peak memory
A run folder (--out) holds config.json, log.jsonl, last.pt, best.pt, metrics.json and masks.png.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import accuracy_score, roc_auc_score
from torch.utils.data import DataLoader, DistributedSampler

from add import (ADD, Diverged, add_loss, autocast, count_parameters, d2_layout, load_checkpoint, load_state,
                 peak_memory_mib, pick_device, prepare_model, random_batch, save_checkpoint, scale_milestones, sync,
                 to_device)
from masks import METHODS, add_data_arguments, open_split, parse_methods, resolve_defaults
from ops import InputError, atomic_write, genotype_from_dict, load_genotype

# Settings that differ between a real dataset (the paper's, Sec. IV-B) and the built-in synthetic
# data (a demo sized for 2 CPU cores). Flags override both.
PAPER = dict(image_size=256, stem_reductions=3, channels=48, cells_per_block=4, batch_size=96, lr=5e-4, epochs=300,
             milestones=[80, 140])
DEMO = dict(image_size=64, stem_reductions=2, channels=16, cells_per_block=1, batch_size=32, lr=1e-3, epochs=12,
            milestones=[200, 280], videos=160)
BASELINES = ("resnet18", "resnet152", "vgg16")
RUN_KEYS = ("resume", "workers", "device", "log_every", "out")  # what a resumed run may change


class Baseline(nn.Module):
    """A torchvision classifier from scratch (weights=None: nothing is downloaded) in ADD's harness:
    returns (logits, None), so it trains with Eq. 4 alone."""
    def __init__(self, arch):
        super().__init__()
        self.net = getattr(torchvision.models, arch)(weights=None, num_classes=2)

    def forward(self, x):
        return self.net(x), None


def build_model(cfg, genotype):
    if cfg["arch"] != "add":
        return Baseline(cfg["arch"])
    layout = d2_layout(cfg["blocks"], cfg["cells_per_block"])
    return ADD(genotype, cfg["channels"], layout, cfg["stem_reductions"], mask=cfg["mask_weight"] > 0)


def genotype_dict(genotype):
    return None if genotype is None else {k: [list(p) for p in v] for k, v in genotype._asdict().items()}


# ----------------------------------------------------------------------------------------------
# Evaluation: ACC and ROC AUC (Sec. IV-B), per frame and per video

@torch.no_grad()
def predict(model, loader, device):
    """-> fake probabilities (N,), labels (N,), video ids [N] for every sample of the loader."""
    model.eval()
    probs, labels, videos = [], [], []
    for x, _, y, v in loader:
        with autocast(device):
            logits, _ = model(to_device(x, device))
        probs.append(logits.float().softmax(-1)[:, 1].cpu())
        labels.append(y)
        videos += list(v)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), videos


def video_level(probs, labels, videos):
    """One prediction per video: the mean of its frames' fake probabilities (and its label)."""
    _, index = np.unique(np.asarray(videos), return_inverse=True)
    counts = np.bincount(index)
    return np.bincount(index, probs) / counts, np.bincount(index, labels) / counts


def acc_auc(labels, probs):
    """ACC at threshold 0.5 and ROC AUC (None when the labels hold one class only)."""
    auc = roc_auc_score(labels, probs) if len(np.unique(labels)) == 2 else None
    return float(accuracy_score(labels, probs > 0.5)), None if auc is None else float(auc)


def evaluate(model, loader, device):
    probs, labels, videos = predict(model, loader, device)
    video_probs, video_labels = video_level(probs, labels, videos)
    frame_acc, frame_auc = acc_auc(labels, probs)
    video_acc, video_auc = acc_auc(video_labels.round(), video_probs)
    return dict(frames=len(labels), videos=len(video_labels), frame_acc=frame_acc, frame_auc=frame_auc,
                video_acc=video_acc, video_auc=video_auc)


def print_table(rows):
    """rows: {name: metrics} -> one line each."""
    cols = ("frames", "videos", "frame_acc", "frame_auc", "video_acc", "video_auc")
    width = max(len(name) for name in rows) + 2
    print(" " * width + "".join(f"{c:>11s}" for c in cols))
    for name, m in rows.items():
        cells = [f"{m[c]:>11d}" if isinstance(m[c], int) else f"{'n/a':>11s}" if m[c] is None else f"{m[c]:>11.4f}"
                 for c in cols]
        print(f"{name:<{width}s}" + "".join(cells))


def visualize(model, dataset, k, path, device):
    """Fig. 9: K faces with their predicted mask m, the hull mask M and p(fake), in a grid."""
    model.eval()
    idx = np.linspace(0, len(dataset) - 1, k).round().astype(int)
    x, M, y, _ = (list(t) for t in zip(*(dataset[i] for i in idx)))
    with torch.no_grad():
        logits, m = model(torch.stack(x).to(device))
    p, tile, font = logits.float().softmax(-1)[:, 1].cpu(), 128, ImageFont.load_default(size=12)
    columns = 3 if m is not None else 2
    per_row = max(1, min(4, k))
    canvas = Image.new("RGB", (per_row * columns * tile, ((k + per_row - 1) // per_row) * (tile + 18)), "white")
    for i in range(k):
        tiles = [x[i], *([m[i].float().cpu().expand(3, -1, -1)] if m is not None else []), M[i].expand(3, -1, -1)]
        left, top = (i % per_row) * columns * tile, (i // per_row) * (tile + 18)
        for j, t in enumerate(tiles):
            picture = Image.fromarray(np.uint8(t.permute(1, 2, 0).numpy() * 255)).resize((tile, tile), Image.NEAREST)
            canvas.paste(picture, (left + j * tile, top))
        caption = f"p(fake) {p[i]:.2f}, {'fake' if y[i] else 'real'}" + ("  | m | M" if m is not None else "  | M")
        ImageDraw.Draw(canvas).text((left + 4, top + tile + 2), caption, fill="black", font=font)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------
# Data and distribution

def init_distributed(device_name):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: one process per GPU (nccl), or per CPU slot (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def datasets(args):
    """Train and validation splits of --data/--methods."""
    methods = parse_methods(args.data, args.methods)
    return [open_split(args.data, args.root, split, methods, args.image_size, split == "train", args.videos, args.frames)
            for split in ("train", "val")]


def test_split(args):
    """The test split of --test-data/--test-methods (by default: --data/--methods) and its name."""
    test_data = args.test_data or args.data
    same = test_data == args.data
    methods = parse_methods(test_data, args.test_methods or (args.methods if same else None))
    root = args.test_root or (args.root if same else None)
    return (open_split(test_data, root, "test", methods, args.image_size, False, args.videos, args.frames),
            f"{test_data}:{','.join(methods)}")


def loader(dataset, batch_size, args, device, shuffle=False, sampler=None, generator=None):
    return DataLoader(dataset, batch_size, shuffle=shuffle and sampler is None, sampler=sampler, drop_last=shuffle,
                      generator=generator, num_workers=args.workers, pin_memory=device.type == "cuda",
                      persistent_workers=args.workers > 0)


# ----------------------------------------------------------------------------------------------
# Training

def make_optimizer(model, args):
    """Sec. IV-B: "an Adam optimizer with a momentum value of 0.9" (beta1) "and a weight decay of
    0.0005", lr 0.5. Adam diverges at 0.5 and momentum SGD does not learn there (README,
    Interpretations: measured), so lr 0.5 is read as 0.5e-3. --optimizer sgd is the other reading."""
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), args.lr, betas=(args.momentum, 0.999), weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, scale_milestones(args.milestones, args.epochs), 0.1)


class Progress:
    """Prints loss, images/s and the time left every `every` steps."""
    def __init__(self, total_steps, every):
        self.total, self.every, self.done, self.start = total_steps, every, 0, time.time()

    def step(self, epoch, step, steps, loss, images):  # loss: a 0-dim tensor
        self.done += 1
        if self.every and self.done % self.every == 0:
            elapsed = time.time() - self.start
            left = elapsed / self.done * (self.total - self.done)
            print(f"  epoch {epoch + 1} step {step + 1}/{steps}  loss {loss.item():.4f}  "
                  f"{images * self.done / elapsed:.1f} images/s  {left / 60:.1f} min left", flush=True)


def train_epoch(model, data, optimizer, device, args, epoch, progress):
    """One pass over the training split with Eq. 7; -> mean loss. Stops on a non-finite loss."""
    model.train()
    total = torch.zeros((), device=device)
    for step, (x, M, y, _) in enumerate(data):
        x, M, y = to_device(x, device), to_device(M, device), to_device(y, device)
        with autocast(device):
            logits, m = model(x)
        loss = add_loss(logits, m, y, M, args.mask_weight)
        if not torch.isfinite(loss):
            raise Diverged(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}; the last good "
                           f"checkpoint is intact: lower --lr, or --resume from it")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        total += loss.detach()
        progress.step(epoch, step, len(data), loss.detach(), len(x))  # .item() only when it prints
    return (total / max(1, len(data))).item()


def fit(args, rank, world, device):
    """The whole run: resume or start, epochs with validation and checkpoints, then the test split."""
    # 1) configuration, genotype, data
    state = load_checkpoint(os.path.join(args.out, "last.pt")) if args.resume else None
    if state:
        args = argparse.Namespace(**{**state["config"], **{k: getattr(args, k) for k in RUN_KEYS}})
    genotype = (genotype_from_dict(state["genotype"], "checkpoint") if state and state["genotype"]
                else load_genotype(args.genotype) if args.arch == "add" else None)
    (train_set, val_set), (test_set, test_name) = datasets(args), test_split(args)
    # 2) model, optimizer, scheduler (Sec. IV-B), the distributed wrapper
    model = prepare_model(build_model(vars(args), genotype), device)
    optimizer, scheduler = make_optimizer(model, args)
    start, best = 0, -1.0
    if state:
        start, best = restore(state, model, optimizer, scheduler, args.out)
    net = nn.parallel.DistributedDataParallel(model, [device.index] if device.type == "cuda" else None) if world > 1 else model
    sampler = DistributedSampler(train_set, world, rank, seed=args.seed) if world > 1 else None
    order = torch.Generator()
    train_data = loader(train_set, args.batch_size // world, args, device, True, sampler, order)
    val_data = loader(val_set, args.batch_size, args, device)
    if not len(train_data):
        raise InputError(f"--batch-size {args.batch_size}: the train split has only {len(train_set)} samples "
                         f"({len(train_set) // world} per process)")
    if rank == 0:
        print(f"{args.arch}: {count_parameters(model) / 1e6:.2f} M parameters; train {len(train_set)}, "
              f"val {len(val_set)}, test {len(test_set)} ({test_name}) samples; {world} process(es) on {device}")
        atomic_write(os.path.join(args.out, "config.json"), lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
    progress = Progress((args.epochs - start) * len(train_data), args.log_every if rank == 0 else 0)
    # 3) epochs: train, validate, checkpoint (rank 0 only logs, evaluates and saves)
    for epoch in range(start, args.epochs):
        order.manual_seed(args.seed + epoch)  # the shuffle depends on the epoch only: resumable
        if sampler:
            sampler.set_epoch(epoch)  # a different shard order each epoch
        tic = time.time()
        loss = train_epoch(net, train_data, optimizer, device, args, epoch, progress)
        scheduler.step()
        if rank == 0:
            best = end_of_epoch(args, model, optimizer, scheduler, genotype, val_data, device, epoch, loss, best, tic)
        if world > 1:
            dist.barrier()
    # 4) the test split, with the best checkpoint
    if rank == 0:
        return test(args, model, val_data, test_set, test_name, device)


def end_of_epoch(args, model, optimizer, scheduler, genotype, val_data, device, epoch, loss, best, tic):
    val = evaluate(model, val_data, device)
    auc = val["frame_auc"] if val["frame_auc"] is not None else val["frame_acc"]
    best_now = max(best, auc)
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 epoch=epoch + 1, rng=torch.get_rng_state(), config=vars(args), genotype=genotype_dict(genotype),
                 best_auc=best_now)
    if auc > best:
        save_checkpoint(state, os.path.join(args.out, "best.pt"))
    save_checkpoint(state, os.path.join(args.out, "last.pt"))
    seconds = time.time() - tic
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(dict(epoch=epoch + 1, train_loss=loss, lr=scheduler.get_last_lr()[0], seconds=seconds, val=val)) + "\n")
    print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  val ACC {val['frame_acc']:.4f} AUC "
          f"{val['frame_auc'] or float('nan'):.4f}  {seconds:.1f} s" + ("  (best)" if auc > best else ""), flush=True)
    return best_now


def restore(state, model, optimizer, scheduler, where):
    path = os.path.join(where, "last.pt")
    load_state(model, state["model"], path)
    load_state(optimizer, state["optimizer"], path, "optimizer")
    load_state(scheduler, state["scheduler"], path, "scheduler")
    torch.set_rng_state(state["rng"])
    print(f"resumed {path} at epoch {state['epoch']}")
    return state["epoch"], state["best_auc"]


def test(args, model, val_data, test_set, test_name, device):
    """Best checkpoint -> metrics.json (val and test), the table, and the --visualize picture."""
    best = load_checkpoint(os.path.join(args.out, "best.pt"))
    load_state(model, best["model"], os.path.join(args.out, "best.pt"))
    rows = {f"val  {args.data}:{','.join(parse_methods(args.data, args.methods))}": evaluate(model, val_data, device),
            f"test {test_name}": evaluate(model, loader(test_set, args.batch_size, args, device), device)}
    return report(args, model, rows, test_set, device, "metrics.json", best["epoch"])


def report(args, model, rows, test_set, device, name, epoch):
    metrics = dict(arch=args.arch, parameters=count_parameters(model), epoch=epoch, mask_weight=args.mask_weight,
                   **{k.split()[0]: dict(data=k.split()[1], **v) for k, v in rows.items()})
    atomic_write(os.path.join(args.out, name), lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    print_table(rows)
    if args.visualize:
        visualize(model, test_set, args.visualize, os.path.join(args.out, "masks.png"), device)
    print(f"wrote {os.path.join(args.out, name)}" + (f" and {args.out}/masks.png" if args.visualize else ""))
    return metrics


def eval_only(args, device):
    """--eval-only --checkpoint PATH: the checkpoint's network on the test split of the data flags."""
    state = load_checkpoint(args.checkpoint)
    cfg = state.get("config") if isinstance(state, dict) else None
    if not cfg or "model" not in state:
        raise InputError(f"{args.checkpoint}: not a train.py checkpoint (no model or config inside)")
    genotype = genotype_from_dict(state["genotype"], args.checkpoint) if state.get("genotype") else None
    model = prepare_model(build_model(cfg, genotype), device)
    load_state(model, state["model"], args.checkpoint)
    args.image_size, args.arch, args.mask_weight = cfg["image_size"], cfg["arch"], cfg["mask_weight"]
    test_set, test_name = test_split(args)
    rows = {f"test {test_name}": evaluate(model, loader(test_set, args.batch_size, args, device), device)}
    return report(args, model, rows, test_set, device, "eval.json", state["epoch"])


def benchmark(args, device, steps=10):
    """Times training steps (forward, Eq. 7, backward, update) of --arch on random batches."""
    genotype = load_genotype(args.genotype) if args.arch == "add" else None
    model = prepare_model(build_model(vars(args), genotype), device)
    optimizer, _ = make_optimizer(model, args)
    s, b = args.image_size, args.batch_size
    batch = [random_batch(b, s)]
    progress = Progress(steps, 0)
    train_epoch(model, batch * 2, optimizer, device, args, 0, progress)  # warm-up
    sync(device)
    tic = time.time()
    train_epoch(model, batch * steps, optimizer, device, args, 0, progress)  # ends with .item(): synchronised
    seconds = (time.time() - tic) / steps
    print(f"{args.arch} ({count_parameters(model) / 1e6:.2f} M parameters), batch {b}, {s} px, on {device}: "
          f"{seconds * 1000:.0f} ms/step, {b / seconds:.1f} images/s, peak memory {peak_memory_mib(device):.0f} MiB")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--genotype", help="g.json from search.py (needed for --arch add)")
    p.add_argument("--arch", default="add", choices=("add",) + BASELINES, help="ADD, or a torchvision baseline (Table IV)")
    p.add_argument("--channels", type=int, help="C of the first block; 48 gives ~5 M parameters (paper: 5.6 M); demo: 16")
    p.add_argument("--cells-per-block", type=int, help="N normal cells per D^2 block (paper: 4, Sec. IV-D); demo: 1")
    p.add_argument("--blocks", type=int, default=3, help="D^2 blocks, a reduction cell between consecutive ones")
    p.add_argument("--stem-reductions", type=int, help="stride-2 stem layers (3: 256 -> 32 px; demo: 2, 64 -> 16 px)")
    p.add_argument("--mask-weight", type=float, default=1.0, help="alpha of Eq. 7 (paper: 1; 0: no mask branch, Table V)")
    p.add_argument("--batch-size", type=int, help="global batch (paper: 96, Sec. IV-B; demo: 32)")
    p.add_argument("--lr", type=float, help="paper: 0.5 read as 0.5e-3 for Adam (Sec. IV-B, see Interpretations); demo: 1e-3")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="paper: Adam with momentum 0.9 (Sec. IV-B)")
    p.add_argument("--momentum", type=float, default=0.9, help="paper: 0.9")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="paper: 5e-4")
    p.add_argument("--epochs", type=int, help="paper: 300; demo: 12")
    p.add_argument("--milestones", type=int, nargs="+",
                   help="lr / 10 at these epochs of 300, scaled to --epochs (paper: 80 140; demo: 200 280)")
    p.add_argument("--grad-clip", type=float, default=5.0, help="clip the gradient norm (DARTS: 5; 0: off)")
    p.add_argument("--test-data", choices=tuple(METHODS), help="test on another dataset (Table III: celeb-df)")
    p.add_argument("--test-root", help="prepared folder of --test-data (default: data/<name>)")
    p.add_argument("--test-methods", help="test on other manipulations (Table II: FaceSwap)")
    p.add_argument("--out", default="runs/train", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt with its saved configuration")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split only")
    p.add_argument("--checkpoint", help="with --eval-only: a checkpoint written by train.py")
    p.add_argument("--visualize", type=int, default=8, metavar="K", help="picture of K test faces and masks (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    p.add_argument("--log-every", type=int, default=50, help="progress line every N steps (0: per epoch only)")
    p.add_argument("--benchmark", action="store_true", help="time training steps and exit")
    args = resolve_defaults(p.parse_args(argv), PAPER, DEMO)
    if args.arch == "add" and not args.genotype and not (args.resume or args.eval_only):
        raise InputError("--genotype: needed for --arch add; write one with: python search.py --out g.json")
    if args.eval_only and not args.checkpoint:
        raise InputError("--eval-only needs --checkpoint PATH (a best.pt or last.pt written by train.py)")
    if args.arch != "add":
        args.mask_weight = 0.0  # the baselines have no mask branch
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    if rank == 0:
        print("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    try:
        if args.benchmark:
            return benchmark(args, device)
        if args.eval_only:
            return eval_only(args, device)
        return fit(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (InputError, Diverged) as e:
        sys.exit(f"error: {e}")
