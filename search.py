"""Architecture search for ADD: Algorithm 1 (Sec. III-A, III-B), first-order DARTS.

Batch by batch, a training batch updates the operation weights w, then a validation batch updates
the architecture alpha (Adam; lr / 10 at epochs 60 and 150 of 300); both minimise the loss of Eq. 7
with the heads of add.py (Sec. IV-B has the settings). Each epoch the genotype is derived (Sec.
III-A: for each node the two strongest incoming edges, each with its strongest non-zero operation)
and written to g.json, with a picture of both cells as in Fig. 8 and of alpha over the epochs.

The paper's w setting (momentum SGD at lr 0.1 for batches of 8, alpha moving from the first step)
leaves the one-shot network at chance on the demo data, so alpha is then chosen by the mask term
alone. The defaults do what the DARTS family does to make a search learn: w's lr at DARTS's rate
per sample (0.025 per 64, scaled to the batch), w-only warm-up epochs, alpha's Adam with betas
(0.5, 0.999). README (Search) has the measurements; the paper's values are one flag away:
--w-lr 0.1 --w-lr-batch 0 --warmup-epochs 0 --alpha-betas 0.9 0.999.

    python search.py                      # built-in synthetic data, demo configuration (~5 min, 2 CPU cores)
    python search.py --data ff++          # real data: 256 px, batch 8, 300 epochs
    python search.py --resume             # continue a killed search from runs/search/search.pt
    python search.py --random-genotype 3 --out r.json    # a random architecture (the NAS baseline)
    python search.py --benchmark          # images/s and peak memory of search steps
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from add import (ADD, Diverged, FiniteCheck, add_loss, autocast, count_parameters, d2_layout, epoch_generator,
                 load_checkpoint, load_state, loss_terms, new_run_dir, peak_memory_mib, pick_device, prepare_model,
                 random_batch, save_checkpoint, scale_milestones, time_steps, to_device)
from masks import add_data_arguments, loader_workers, open_split, parse_methods, resolve_defaults
from ops import PRIMITIVES, STEPS, Genotype, InputError, atomic_write, save_genotype, search_edges
from train import DEMO as TRAIN_DEMO, PAPER as TRAIN_PAPER, figure, save_figure

# Settings that differ between a real dataset (the paper's, Sec. IV-B; DARTS's where it is silent)
# and the built-in synthetic data (a demo sized for 2 CPU cores). Flags override both.
PAPER = dict(image_size=256, stem_reductions=3, channels=16, cells=8, batch_size=8, epochs=300, alpha_milestones=[60, 150],
             warmup_epochs=90)
DEMO = dict(image_size=64, stem_reductions=2, channels=8, cells=5, batch_size=32, epochs=5, alpha_milestones=[200, 280],
            videos=160, frames=4, warmup_epochs=2)
RUN_KEYS = ("resume", "workers", "device", "log_every", "check_every", "run_dir")  # what a resumed search may change


class SearchNetwork(nn.Module):
    """The one-shot network of Algorithm 1: ADD with every edge a MixedOp, reduction cells at 1/3
    and 2/3 of the depth, and the architecture parameters alpha (one row per edge, one column per
    operation; shared by all normal cells, and by all reduction cells). alpha are nn.Parameters, so
    state_dict and the checkpoint carry them."""
    def __init__(self, C, cells, stem_reductions, mask):
        super().__init__()
        layout = [i in (cells // 3, 2 * cells // 3) for i in range(cells)]
        self.net = ADD(None, C, layout, stem_reductions, mask)
        shape = (len(search_edges()), len(PRIMITIVES))  # (14, 11)
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape))

    def forward(self, x):
        return self.net(x, (self.alpha_normal.softmax(-1), self.alpha_reduce.softmax(-1)))

    def arch_parameters(self):
        return [self.alpha_normal, self.alpha_reduce]

    def genotype(self):
        return Genotype(derive_cell(self.alpha_normal.softmax(-1)), derive_cell(self.alpha_reduce.softmax(-1)))


def derive_cell(weights):
    """The DARTS rule on the softmax of alpha (n_edges, n_ops): an edge's strength is its strongest
    non-zero operation; each node keeps its two strongest incoming edges with that operation.
    -> ((op, input), ...) two per node, inputs in increasing order."""
    weights = weights.detach().clone()
    weights[:, PRIMITIVES.index("none")] = -1  # the zero op never wins
    pairs, row = [], 0
    for node in range(STEPS):
        strength, best = weights[row:row + node + 2].max(dim=1)  # over the ops of each incoming edge
        for inp in sorted(strength.topk(2).indices.tolist()):
            pairs.append((PRIMITIVES[best[inp]], inp))
        row += node + 2
    return tuple(pairs)


# ----------------------------------------------------------------------------------------------
# The picture of both cells (Fig. 8)

def draw_genotype(genotype, path):
    panels = [_draw_cell(genotype.normal, "normal cell"), _draw_cell(genotype.reduce, "reduction cell")]
    canvas = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * panel.width, 0))
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def _draw_cell(cell, title, width=620, height=380):
    """Inputs c_{k-2}, c_{k-1} on the left, nodes 0-3 in the middle, their concat c_{k} on the right;
    each chosen edge drawn with its operation's name."""
    image, font = Image.new("RGB", (width, height), "white"), ImageFont.load_default(size=13)
    draw = ImageDraw.Draw(image)
    # inputs left, nodes zig-zag (no edge passes through a node), the concat right
    pos = [(60, 110), (60, 290), (210, 60), (290, 345), (420, 150), (530, 290), (width - 45, 190)]
    for k in range(STEPS):
        _arrow(draw, pos[k + 2], pos[-1], (190, 190, 190), 2)
    edges = [(op, pos[inp], pos[k // 2 + 2], 0.42 + 0.2 * (k % 2)) for k, (op, inp) in enumerate(cell)]
    for op, a, b, _ in edges:
        _arrow(draw, a, b, _colour(op), 3)
    for op, (x0, y0), (x1, y1), t in edges:  # labels after all lines; a node's two labels staggered
        tx, ty = x0 + t * (x1 - x0), y0 + t * (y1 - y0) - 8
        draw.rectangle(draw.textbbox((tx, ty), op, font=font, anchor="mm"), fill="white")
        draw.text((tx, ty), op, fill=_colour(op), font=font, anchor="mm")
    for i, name in enumerate(["c_{k-2}", "c_{k-1}"] + [str(k) for k in range(STEPS)] + ["c_{k}"]):
        (x, y), r = pos[i], 24
        fill = (200, 230, 200) if i < 2 else (240, 220, 170) if i == len(pos) - 1 else (180, 205, 240)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline="black")
        draw.text((x, y), name, fill="black", font=font, anchor="mm")
    draw.text((width / 2, 20), title, fill="black", font=ImageFont.load_default(size=18), anchor="mm")
    return image


def _arrow(draw, a, b, fill, width, r=24, head=11):
    """A line from node a to node b with an arrowhead where it meets b's circle (radius r)."""
    (x0, y0), (x1, y1) = a, b
    length = math.hypot(x1 - x0, y1 - y0)
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    tip = (x1 - r * ux, y1 - r * uy)
    draw.line(a + tip, fill=fill, width=width)
    back = (tip[0] - head * ux, tip[1] - head * uy)
    draw.polygon([tip, (back[0] - 0.5 * head * uy, back[1] + 0.5 * head * ux),
                  (back[0] + 0.5 * head * uy, back[1] - 0.5 * head * ux)], fill=fill)


def _colour(op):
    palette = [(0, 0, 0), (90, 90, 90), (0, 140, 140), (0, 100, 200), (200, 60, 0), (220, 120, 0),
               (160, 90, 0), (30, 150, 30), (0, 110, 60), (150, 40, 170), (200, 0, 110)]
    return palette[PRIMITIVES.index(op)]


# ----------------------------------------------------------------------------------------------
# The random baseline (Li & Talwalkar 2019; Yang et al. 2020): a genotype drawn without search

def random_genotype(seed):
    """Uniform over the search space: per node two distinct inputs among its predecessors, each edge
    one of the ten non-zero operations; the normal and the reduction cell drawn independently."""
    rng, ops = random.Random(seed), [p for p in PRIMITIVES if p != "none"]
    cell = lambda: tuple((rng.choice(ops), inp) for node in range(STEPS) for inp in sorted(rng.sample(range(node + 2), 2)))
    return Genotype(cell(), cell())


def network_sizes(genotype):
    """Parameters of the ADD network this genotype makes at the paper's size and at the demo's."""
    return [count_parameters(ADD(genotype, c["channels"], d2_layout(3, c["cells_per_block"]), c["stem_reductions"]))
            for c in (TRAIN_PAPER, TRAIN_DEMO)]


def write_genotype(genotype, path):
    """g.json and its picture, g.png."""
    save_genotype(genotype, path)
    draw_genotype(genotype, os.path.splitext(path)[0] + ".png")


def describe(genotype, path):
    """The line that names the files and the sizes of the network the genotype makes."""
    paper, demo = network_sizes(genotype)
    return (f"wrote {path} and {os.path.splitext(path)[0]}.png: an ADD network of {paper / 1e6:.2f} M parameters at "
            f"the paper's size (C {TRAIN_PAPER['channels']}, N {TRAIN_PAPER['cells_per_block']}), {demo / 1e6:.2f} M "
            f"at the demo's (C {TRAIN_DEMO['channels']}, N {TRAIN_DEMO['cells_per_block']})")


def draw_alpha(log_path, path):
    """alpha.png from log.jsonl: each operation's softmax weight (mean over a cell's 14 edges) per
    epoch, for the normal and the reduction cell."""
    with open(log_path) as f:
        log = [json.loads(line) for line in f]
    fig, ax = figure(1, 2, (12, 4))
    for a, kind in zip(ax[0], ("normal", "reduce")):
        weights = torch.tensor([e["softmax_alpha"][kind] for e in log]).mean(1)  # (epochs, ops)
        for j, op in enumerate(PRIMITIVES):
            a.plot([e["epoch"] for e in log], weights[:, j], marker="o", color=[c / 255 for c in _colour(op)], label=op,
                   linestyle="--" if j % 2 else "-")
        a.set(xlabel="epoch", ylabel="softmax(alpha), mean over edges", title=f"{kind} cell")
    ax[0, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Algorithm 1

def gradient_step(model, optimizer, params, batch, device, mask_weight, grad_clip, flips=None):
    """One update of `params` on one batch (Algorithm 1, lines 2-4 for w, 5-7 for alpha) -> the
    detached (CE, MSE, loss) on the device. Only the gradients of `params` are computed, so the
    alpha step does not pay for w's."""
    x, M, y = to_device(batch, device, flips)
    with autocast(device):
        logits, m = model(x)
    ce, mse = loss_terms(logits, m, y, M)
    loss = add_loss(ce, mse, mask_weight)
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return torch.stack([ce, ce * 0 if mse is None else mse, loss]).detach()


def build(args, device):
    """The search network, the two optimizers and their schedulers (Sec. IV-B and the options)."""
    model = prepare_model(SearchNetwork(args.channels, args.cells, args.stem_reductions, not args.no_mask_branch),
                          device, args.compile)
    w_lr = args.w_lr * (args.batch_size / args.w_lr_batch if args.w_lr_batch else 1)
    if args.w_optimizer == "sgd":
        w_opt = torch.optim.SGD(model.net.parameters(), w_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        w_opt = torch.optim.Adam(model.net.parameters(), w_lr, betas=(args.momentum, 0.999), weight_decay=args.weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), args.alpha_lr, betas=tuple(args.alpha_betas),
                             weight_decay=args.weight_decay)
    w_sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, args.epochs, eta_min=w_lr * args.w_lr_min)
    alpha_epochs = args.epochs - args.warmup_epochs  # alpha's schedule spans the epochs in which it moves
    a_sched = torch.optim.lr_scheduler.MultiStepLR(a_opt, scale_milestones(args.alpha_milestones, alpha_epochs), 0.1)
    return model, w_opt, a_opt, w_sched, a_sched


def loaders(args):
    """Training split for w, validation split for alpha (Algorithm 1: D_train, D_val). Each epoch's
    order of both depends on (seed, epoch) only: a resumed search sees the batches an uninterrupted
    one would."""
    methods = parse_methods(args.data, args.methods)
    sets = [open_split(args.data, args.root, s, methods, args.image_size, True, args.videos, args.frames)
            for s in ("train", "val")]
    for s, name in zip(sets, ("train", "val")):
        if len(s) < args.batch_size:
            raise InputError(f"--batch-size {args.batch_size}: the {name} split has only {len(s)} samples")
    kw = dict(batch_size=args.batch_size, drop_last=True, num_workers=args.workers,
              pin_memory=torch.cuda.is_available(), persistent_workers=args.workers > 0)
    train_sampler = DistributedSampler(sets[0], 1, 0, shuffle=True, seed=args.seed, drop_last=True)
    steps = len(train_sampler) // args.batch_size
    val_sampler = RandomSampler(sets[1], num_samples=steps * args.batch_size)  # a validation batch per training batch
    return DataLoader(sets[0], sampler=train_sampler, **kw), DataLoader(sets[1], sampler=val_sampler, **kw)


def search(args, device, state=None):
    """Algorithm 1, then the derived genotype: g.json (--out) and its pictures, every epoch."""
    # 1) data, network, optimizers; resume from the last checkpoint if asked
    train_loader, val_loader = loaders(args)
    model, w_opt, a_opt, w_sched, a_sched = build(args, device)
    start = restore(state, args.run_dir, model, w_opt, a_opt, w_sched, a_sched) if state else 0
    print(f"search network: {count_parameters(model.net) / 1e6:.2f} M weights, alpha 2 x {tuple(model.alpha_normal.shape)}")
    w_params, a_params = list(model.net.parameters()), model.arch_parameters()
    alpha_mask_weight = args.mask_weight if args.alpha_loss == "eq7" else 0.0
    for epoch in range(start, args.epochs):
        # 2) alternate: a w step on a training batch, an alpha step on a validation batch (after the warm-up)
        model.train()
        train_loader.sampler.set_epoch(epoch)
        val_loader.sampler.generator = epoch_generator(args.seed, epoch, 1)
        flips, moving = epoch_generator(args.seed, epoch), epoch >= args.warmup_epochs
        check = FiniteCheck(device, args.check_every, "the last checkpoint is intact: lower --w-lr or --alpha-lr")
        tic, sums = time.time(), torch.zeros(2, 3, device=device)  # (w, alpha) x (CE, MSE, loss)
        val_batches = iter(val_loader) if moving else None
        for step, batch in enumerate(train_loader):
            w = gradient_step(model, w_opt, w_params, batch, device, args.mask_weight, args.grad_clip, flips)
            a = gradient_step(model, a_opt, a_params, next(val_batches), device, alpha_mask_weight, None, flips) \
                if moving else torch.zeros_like(w)
            sums += torch.stack([w, a])
            check.add(w[2] + a[2], step, step + 1 == len(train_loader), f"epoch {epoch + 1}")
            if args.log_every and (step + 1) % args.log_every == 0:
                print(f"  epoch {epoch + 1} step {step + 1}/{len(train_loader)}: "
                      f"{(step + 1) * args.batch_size / (time.time() - tic):.1f} training images/s")
        w_sched.step()
        if moving:
            a_sched.step()
        # 3) derive, log, write g.json + pictures, checkpoint
        (train_ce, train_mse, _), (val_ce, val_mse, _) = (sums / len(train_loader)).tolist()
        genotype = model.genotype()
        write_genotype(genotype, args.out)
        log_epoch(args, model, genotype, epoch, dict(train_ce=train_ce, train_mse=train_mse, val_ce=val_ce if moving else None,
                                                    val_mse=val_mse if moving else None), time.time() - tic)
        save_checkpoint(dict(model=model.state_dict(), w_opt=w_opt.state_dict(), a_opt=a_opt.state_dict(),
                             w_sched=w_sched.state_dict(), a_sched=a_sched.state_dict(), epoch=epoch + 1,
                             rng=torch.get_rng_state(), config=vars(args)), os.path.join(args.run_dir, "search.pt"))
    print(describe(model.genotype(), args.out))
    return model


def restore(state, run_dir, model, w_opt, a_opt, w_sched, a_sched):
    path = os.path.join(run_dir, "search.pt")
    load_state(model, state["model"], path)
    for module, key in ((w_opt, "w_opt"), (a_opt, "a_opt"), (w_sched, "w_sched"), (a_sched, "a_sched")):
        load_state(module, state[key], path, key)
    torch.set_rng_state(state["rng"])
    print(f"resumed {path} at epoch {state['epoch']}")
    return state["epoch"]


def log_epoch(args, model, genotype, epoch, losses, seconds):
    """Prints the losses and the genotype; appends them and the softmax of alpha to log.jsonl and
    redraws alpha.png."""
    alpha = {k: getattr(model, f"alpha_{k}").softmax(-1).tolist() for k in ("normal", "reduce")}
    line = dict(epoch=epoch + 1, **losses, seconds=seconds, primitives=PRIMITIVES, genotype=genotype._asdict(),
                softmax_alpha=alpha)
    log = os.path.join(args.run_dir, "log.jsonl")
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")
    draw_alpha(log, os.path.join(args.run_dir, "alpha.png"))
    strongest = model.alpha_normal.softmax(-1).max().item()
    val = "alpha still (warm-up)" if losses["val_ce"] is None else f"val CE {losses['val_ce']:.4f} MSE {losses['val_mse']:.4f}"
    print(f"epoch {epoch + 1}/{args.epochs}  train CE {losses['train_ce']:.4f} MSE {losses['train_mse']:.4f}  {val}  "
          f"{seconds:.1f} s  (strongest normal-cell op weight {strongest:.3f})", flush=True)
    for name in ("normal", "reduce"):
        cell = getattr(genotype, name)
        print(f"  {name:6s} " + "  ".join(f"{k // 2}<-{inp}:{op}" for k, (op, inp) in enumerate(cell)))


def benchmark(args, device, steps=10):
    """Times full search steps (a w step and an alpha step) on random batches of the configuration."""
    model, w_opt, a_opt, _, _ = build(args, device)
    w_params, a_params = list(model.net.parameters()), model.arch_parameters()
    batch = random_batch(args.batch_size, args.image_size)

    def step():
        gradient_step(model, w_opt, w_params, batch, device, args.mask_weight, args.grad_clip)
        gradient_step(model, a_opt, a_params, batch, device, args.mask_weight, None)
    seconds, warm = time_steps(step, device, steps)
    b, s = args.batch_size, args.image_size
    print(f"search step (w + alpha, batch {b}, {s} px, C={args.channels}, {args.cells} cells) on {device}: "
          f"{seconds * 1000:.0f} ms, {b / seconds:.1f} training images/s, peak memory {peak_memory_mib(device):.0f} MiB"
          + (f"; compilation (warm-up) {warm:.1f} s" if args.compile else ""))
    return seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--channels", type=int, help="C of the first cells (DARTS: 16; demo: 8)")
    p.add_argument("--cells", type=int, help="search cells, reductions at 1/3 and 2/3 (DARTS: 8; demo: 5)")
    p.add_argument("--stem-reductions", type=int, help="stride-2 stem layers (3: 256 -> 32 px; demo: 2, 64 -> 16 px)")
    p.add_argument("--batch-size", type=int, help="paper: 8 (Sec. IV-B); demo: 32")
    p.add_argument("--epochs", type=int, help="paper: 300; demo: 5")
    p.add_argument("--warmup-epochs", type=int, help="first epochs train w only, alpha still (paper: 0; real data: 90, "
                   "PC-DARTS's 15 of 50; demo: 2)")
    p.add_argument("--w-optimizer", default="sgd", choices=("sgd", "adam"), help="paper: momentum SGD")
    p.add_argument("--w-lr", type=float, default=0.025, help="lr of w for --w-lr-batch samples, cosine schedule "
                   "(DARTS: 0.025 at 64; paper: 0.1 at batch 8, i.e. --w-lr 0.1 --w-lr-batch 0)")
    p.add_argument("--w-lr-batch", type=int, default=64, help="--w-lr is for this batch and scales linearly to "
                   "--batch-size (0: --w-lr as given, the paper)")
    p.add_argument("--w-lr-min", type=float, default=0.01, help="end of the cosine schedule, a fraction of the lr "
                   "(DARTS: 0.001 / 0.025 = 0.04)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, or Adam's beta1 for w (paper: 0.9)")
    p.add_argument("--alpha-lr", type=float, default=0.02, help="Adam lr of alpha (paper: 0.02)")
    p.add_argument("--alpha-betas", type=float, nargs=2, default=[0.5, 0.999], help="Adam betas of alpha (DARTS: "
                   "0.5 0.999; paper: unstated, Adam's default 0.9 0.999)")
    p.add_argument("--alpha-loss", default="eq7", choices=("eq7", "ce"), help="the loss that moves alpha: Eq. 7 "
                   "(paper: Eq. 3 with the network's loss) or its cross-entropy alone")
    p.add_argument("--alpha-milestones", type=int, nargs="+",
                   help="alpha lr / 10 at these epochs of 300, scaled to --epochs (paper: 60 150; demo: 200 280)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="both optimizers (paper: 5e-4)")
    p.add_argument("--grad-clip", type=float, default=5.0, help="clip w's gradient norm (DARTS: 5; 0: off)")
    p.add_argument("--mask-weight", type=float, default=1.0, help="alpha of Eq. 7 (paper: 1; 0: m unsupervised)")
    p.add_argument("--no-mask-branch", action="store_true", help="search without the mask branch (Eq. 4 alone)")
    p.add_argument("--compile", action="store_true", help="torch.compile the search network (long on the CPU)")
    p.add_argument("--random-genotype", type=int, metavar="SEED", help="write a random genotype (no search) and exit")
    p.add_argument("--out", default="g.json", help="the genotype to write (and its picture, .png)")
    p.add_argument("--run-dir", default="runs/search", help="checkpoint, log.jsonl, alpha.png (a new one beside it "
                   "if it exists, unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/search.pt with its saved configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--log-every", type=int, default=0, help="print throughput every N steps (0: per epoch only)")
    p.add_argument("--check-every", type=int, default=50, help="read the device's non-finite-loss count every N steps")
    p.add_argument("--benchmark", action="store_true", help="time search steps and exit")
    args = resolve_defaults(p.parse_args(argv), PAPER, DEMO)
    if args.no_mask_branch:
        args.mask_weight = 0.0
    if args.warmup_epochs >= args.epochs and not (args.benchmark or args.resume or args.random_genotype is not None):
        raise InputError(f"--warmup-epochs {args.warmup_epochs}: alpha would never move in {args.epochs} epochs")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.random_genotype is not None:
        genotype = random_genotype(args.random_genotype)
        write_genotype(genotype, args.out)
        return print(describe(genotype, args.out))
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if args.benchmark:
        return benchmark(args, device)
    state = load_checkpoint(os.path.join(args.run_dir, "search.pt")) if args.resume else None
    if state:  # the saved configuration, but for what a resumed run may change
        args = argparse.Namespace(**{**state["config"], **{k: getattr(args, k) for k in RUN_KEYS}})
    else:
        args.run_dir = new_run_dir(args.run_dir)
    args.workers = loader_workers(args.data) if args.workers is None else args.workers
    print(f"run folder: {args.run_dir}\nconfig: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    atomic_write(os.path.join(args.run_dir, "config.json"), lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
    return search(args, device, state)


if __name__ == "__main__":
    try:
        main()
    except (InputError, Diverged) as e:
        sys.exit(f"error: {e}")
