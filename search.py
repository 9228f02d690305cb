"""Architecture search for ADD: Algorithm 1 (Sec. III-A, III-B), first-order DARTS.

Batch by batch, a training batch updates the operation weights w (momentum SGD, cosine schedule),
then a validation batch updates the architecture alpha (Adam, lr / 10 at epochs 60 and 150 of 300);
both minimise the loss of Eq. 7 with the heads of add.py (Sec. IV-B has the settings). Each epoch
the genotype is derived (Sec. III-A: for each node the two strongest incoming edges, each with its
strongest non-zero operation) and written to g.json, with a picture of both cells as in Fig. 8.

    python search.py                      # built-in synthetic data, demo configuration (~3 min, 2 CPU cores)
    python search.py --data ff++          # the paper's settings: 256 px, batch 8, 300 epochs
    python search.py --resume             # continue a killed search from runs/search/search.pt
    python search.py --benchmark          # images/s and peak memory of search steps
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader

from add import (ADD, Diverged, add_loss, autocast, count_parameters, load_checkpoint, load_state, peak_memory_mib,
                 pick_device, prepare_model, random_batch, save_checkpoint, scale_milestones, sync, to_device)
from masks import add_data_arguments, open_split, parse_methods, resolve_defaults
from ops import PRIMITIVES, STEPS, Genotype, InputError, atomic_write, save_genotype, search_edges

# Settings that differ between a real dataset (the paper's, Sec. IV-B; DARTS's where it is silent)
# and the built-in synthetic data (a demo sized for 2 CPU cores). Flags override both.
PAPER = dict(image_size=256, stem_reductions=3, channels=16, cells=8, batch_size=8, epochs=300, alpha_milestones=[60, 150])
DEMO = dict(image_size=64, stem_reductions=2, channels=8, cells=5, batch_size=16, epochs=6, alpha_milestones=[200, 280],
            videos=48)


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
        draw.line(pos[k + 2] + pos[-1], fill=(190, 190, 190), width=2)
    edges = [(op, pos[inp], pos[k // 2 + 2], 0.42 + 0.2 * (k % 2)) for k, (op, inp) in enumerate(cell)]
    for op, a, b, _ in edges:
        draw.line(a + b, fill=_colour(op), width=3)
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


def _colour(op):
    palette = [(0, 0, 0), (90, 90, 90), (0, 140, 140), (0, 100, 200), (200, 60, 0), (220, 120, 0),
               (160, 90, 0), (30, 150, 30), (0, 110, 60), (150, 40, 170), (200, 0, 110)]
    return palette[PRIMITIVES.index(op)]


# ----------------------------------------------------------------------------------------------
# Algorithm 1

def endless(loader):
    """Batches forever from one loader: the iterator persists across steps (a fresh shuffle at
    each pass), instead of being rebuilt for every batch."""
    while True:
        yield from loader


def gradient_step(model, optimizer, params, batch, device, mask_weight, grad_clip):
    """One update of `params` on one batch (Algorithm 1, lines 2-4 for w, 5-7 for alpha). Only the
    gradients of `params` are computed, so the alpha step does not pay for w's."""
    x, M, y, _ = batch
    x, M, y = to_device(x, device), to_device(M, device), to_device(y, device)
    with autocast(device):
        logits, m = model(x)
    loss = add_loss(logits, m, y, M, mask_weight)
    if not torch.isfinite(loss):
        raise Diverged(f"non-finite search loss ({loss.item()}); the last checkpoint is intact: lower --w-lr or --alpha-lr")
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()


def build(args, device):
    """The search network, the two optimizers and their schedulers (Sec. IV-B)."""
    model = prepare_model(SearchNetwork(args.channels, args.cells, args.stem_reductions, args.mask_weight > 0), device)
    w_opt = torch.optim.SGD(model.net.parameters(), args.w_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), args.alpha_lr, weight_decay=args.weight_decay)
    w_sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, args.epochs, eta_min=args.w_lr_min)
    a_sched = torch.optim.lr_scheduler.MultiStepLR(a_opt, scale_milestones(args.alpha_milestones, args.epochs), 0.1)
    return model, w_opt, a_opt, w_sched, a_sched


def loaders(args, device):
    """Training split for w, validation split for alpha (Algorithm 1: D_train, D_val)."""
    methods = parse_methods(args.data, args.methods)
    kw = dict(batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
              pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    sets = [open_split(args.data, args.root, s, methods, args.image_size, True, args.videos, args.frames)
            for s in ("train", "val")]
    for s, name in zip(sets, ("train", "val")):
        if len(s) < args.batch_size:
            raise InputError(f"--batch-size {args.batch_size}: the {name} split has only {len(s)} samples")
    generator = torch.Generator()
    return DataLoader(sets[0], generator=generator, **kw), generator, DataLoader(sets[1], **kw)


def search(args, device):
    """Algorithm 1, then the derived genotype: g.json (--out) and its picture, every epoch."""
    # 1) data, network, optimizers; resume from the last checkpoint if asked
    train_loader, order, val_loader = loaders(args, device)
    model, w_opt, a_opt, w_sched, a_sched = build(args, device)
    checkpoint, start = os.path.join(args.run_dir, "search.pt"), 0
    if args.resume:
        start = restore(checkpoint, model, w_opt, a_opt, w_sched, a_sched)
        print(f"resumed {checkpoint} at epoch {start}")
    print(f"search network: {count_parameters(model.net) / 1e6:.2f} M weights, alpha 2 x {tuple(model.alpha_normal.shape)}")
    val_batches, w_params, a_params = endless(val_loader), list(model.net.parameters()), model.arch_parameters()
    picture = os.path.splitext(args.out)[0] + ".png"
    for epoch in range(start, args.epochs):
        # 2) alternate: a w step on a training batch, an alpha step on a validation batch
        model.train()
        order.manual_seed(args.seed + epoch)  # the shuffle depends on the epoch only: resumable
        tic, losses = time.time(), []
        for step, batch in enumerate(train_loader):
            w_loss = gradient_step(model, w_opt, w_params, batch, device, args.mask_weight, args.grad_clip)
            a_loss = gradient_step(model, a_opt, a_params, next(val_batches), device, args.mask_weight, None)
            losses.append(torch.stack([w_loss, a_loss]))
            if args.log_every and (step + 1) % args.log_every == 0:
                print(f"  epoch {epoch + 1} step {step + 1}/{len(train_loader)}: "
                      f"{(step + 1) * args.batch_size / (time.time() - tic):.1f} images/s")
        w_sched.step()
        a_sched.step()
        # 3) derive, log, write g.json + picture, checkpoint
        train_loss, val_loss = torch.stack(losses).mean(0).tolist()
        genotype = model.genotype()
        save_genotype(genotype, args.out)
        draw_genotype(genotype, picture)
        log_epoch(args, model, genotype, epoch, train_loss, val_loss, time.time() - tic)
        save_checkpoint(dict(model=model.state_dict(), w_opt=w_opt.state_dict(), a_opt=a_opt.state_dict(),
                             w_sched=w_sched.state_dict(), a_sched=a_sched.state_dict(), epoch=epoch + 1,
                             rng=torch.get_rng_state(), config=vars(args)), checkpoint)
    print(f"wrote {args.out} and {picture}")
    return model


def restore(path, model, w_opt, a_opt, w_sched, a_sched):
    state = load_checkpoint(path)
    load_state(model, state["model"], path)
    for module, key in ((w_opt, "w_opt"), (a_opt, "a_opt"), (w_sched, "w_sched"), (a_sched, "a_sched")):
        load_state(module, state[key], path, key)
    torch.set_rng_state(state["rng"])
    return state["epoch"]


def log_epoch(args, model, genotype, epoch, train_loss, val_loss, seconds):
    """Prints the genotype; appends it and the softmax of alpha to run_dir/log.jsonl."""
    alpha = {k: getattr(model, f"alpha_{k}").softmax(-1).tolist() for k in ("normal", "reduce")}
    line = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss, seconds=seconds, primitives=PRIMITIVES,
                genotype=genotype._asdict(), softmax_alpha=alpha)
    with open(os.path.join(args.run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    strongest = model.alpha_normal.softmax(-1).max().item()
    print(f"epoch {epoch + 1}/{args.epochs}  w-loss {train_loss:.4f}  alpha-loss {val_loss:.4f}  {seconds:.1f} s  "
          f"(strongest normal-cell op weight {strongest:.3f})")
    for name in ("normal", "reduce"):
        cell = getattr(genotype, name)
        print(f"  {name:6s} " + "  ".join(f"{k // 2}<-{inp}:{op}" for k, (op, inp) in enumerate(cell)))


def benchmark(args, device, steps=10):
    """Times full search steps (a w step and an alpha step) on random batches of the configuration."""
    model, w_opt, a_opt, _, _ = build(args, device)
    w_params, a_params = list(model.net.parameters()), model.arch_parameters()
    s, b = args.image_size, args.batch_size
    batch = random_batch(b, s)
    for i in range(steps + 2):
        if i == 2:  # after two warm-up steps
            sync(device)
            tic = time.time()
        gradient_step(model, w_opt, w_params, batch, device, args.mask_weight, args.grad_clip)
        gradient_step(model, a_opt, a_params, batch, device, args.mask_weight, None)
    sync(device)
    seconds = (time.time() - tic) / steps
    print(f"search step (w + alpha, batch {b}, {s} px, C={args.channels}, {args.cells} cells) on {device}: "
          f"{seconds * 1000:.0f} ms, {b / seconds:.1f} training images/s, peak memory {peak_memory_mib(device):.0f} MiB")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--channels", type=int, help="C of the first cells (DARTS: 16; demo: 8)")
    p.add_argument("--cells", type=int, help="search cells, reductions at 1/3 and 2/3 (DARTS: 8; demo: 5)")
    p.add_argument("--stem-reductions", type=int, help="stride-2 stem layers (3: 256 -> 32 px; demo: 2, 64 -> 16 px)")
    p.add_argument("--batch-size", type=int, help="paper: 8 (Sec. IV-B); demo: 16")
    p.add_argument("--epochs", type=int, help="paper: 300; demo: 6")
    p.add_argument("--w-lr", type=float, default=0.1, help="SGD lr of w (paper: 0.1), cosine schedule")
    p.add_argument("--w-lr-min", type=float, default=0.001, help="end of the cosine schedule (DARTS: 0.001)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    p.add_argument("--alpha-lr", type=float, default=0.02, help="Adam lr of alpha (paper: 0.02)")
    p.add_argument("--alpha-milestones", type=int, nargs="+",
                   help="alpha lr / 10 at these epochs of 300, scaled to --epochs (paper: 60 150; demo: 200 280)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="both optimizers (paper: 5e-4)")
    p.add_argument("--grad-clip", type=float, default=5.0, help="clip w's gradient norm (DARTS: 5; 0: off)")
    p.add_argument("--mask-weight", type=float, default=1.0, help="alpha of Eq. 7 (paper: 1; 0: cross-entropy alone)")
    p.add_argument("--out", default="g.json", help="the genotype to write (and its picture, .png)")
    p.add_argument("--run-dir", default="runs/search", help="checkpoint and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/search.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--log-every", type=int, default=0, help="print throughput every N steps (0: per epoch only)")
    p.add_argument("--benchmark", action="store_true", help="time search steps and exit")
    return resolve_defaults(p.parse_args(argv), PAPER, DEMO)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    if args.benchmark:
        return benchmark(args, device)
    atomic_write(os.path.join(args.run_dir, "config.json"), lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
    return search(args, device)


if __name__ == "__main__":
    try:
        main()
    except (InputError, Diverged) as e:
        sys.exit(f"error: {e}")
