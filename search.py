"""Architecture search for ADD: Algorithm 1 (Sec. III-A, III-B), first-order DARTS.

Batch by batch, a training batch updates the operation weights w, then a validation batch updates
the architecture alpha (Adam; lr / 10 at epochs 60 and 150 of 300, scaled to the epochs after the
warm-up); both minimise the loss of Eq. 7
with the heads of add.py (Sec. IV-B has the settings). Each epoch the genotype is derived (Sec.
III-A: for each node the two strongest incoming edges, each with its strongest non-zero operation)
and written to g.json, with a picture of both cells as in Fig. 8 and of alpha over the epochs.

The paper's w setting (momentum SGD at lr 0.1 for batches of 8, alpha moving from the first step)
leaves the one-shot network at chance on the demo data, so alpha is then chosen by the mask term
alone. The defaults do what the DARTS family does to make a search learn: w's lr at DARTS's rate
per sample (0.025 per 64, scaled to the batch), a w-only warm-up (a fraction of the steps), alpha's
Adam with betas (0.5, 0.999). On real data the search is PC-DARTS-sized (partial channels, K = 4)
and draws a fixed budget of steps per epoch (60,000 steps in 300 epochs). README
(Search, Interpretations) has the measurements; the paper's values are one flag away:
--w-lr 0.1 --w-lr-batch 0 --warmup 0 --alpha-betas 0.9 0.999 --partial-channels 1 --steps-per-epoch 0
--param-weight 0.

Choosing the cell: alpha's magnitude alone (the paper's rule) favours big operations, plain 5x5 and
7x7 convolutions (28 M parameters on average at the paper's width). The default adds an
expected-parameter term to alpha's loss (--param-weight 0.1, ProxylessNAS-style, a hinge at the
paper's 5.6 M): on the hard synthetic benchmark its genotypes are the best detectors per parameter
(README, "Choosing the cell"); --param-weight 0 is the paper's. --select pt chooses by what removing
an operation costs (DARTS-PT, Wang et al., ICLR 2021).

    python search.py                      # built-in synthetic data, demo configuration (~5 min, 2 CPU cores)
    python search.py --data ff++          # real data: 256 px, batch 8, 300 epochs of 200 steps
    python search.py --resume             # continue a killed search from runs/search/search.pt, at its step
    python search.py --random-genotype 3 --out r.json    # a random architecture (the NAS baseline)
    python search.py --benchmark          # ms per search step and peak memory
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
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Sampler

from add import (ADD, Diverged, FiniteCheck, StopSignals, Stopped, add_loss, autocast, count_parameters, d2_layout,
                 epoch_generator, ignore_stop_signals, load_checkpoint, load_state, loss_terms, new_run_dir, peak_memory_mib,
                 pick_device, prepare_model, random_batch, resumed_config, save_checkpoint, scale_milestones, sync,
                 time_steps, to_device, trim_log)
from masks import add_data_arguments, loader_workers, open_split, parse_methods, resolve_defaults
from ops import (OPS, PRIMITIVES, STEPS, Genotype, InputError, Parser, atomic_write, bounded, node_softmax, save_genotype,
                 search_edges)
from train import DEMO as TRAIN_DEMO, PAPER as TRAIN_PAPER, figure, save_figure

# Settings that differ between a real dataset (the paper's, Sec. IV-B; DARTS's and PC-DARTS's where
# it is silent or measurably fails) and the built-in synthetic data (a demo sized for 2 CPU cores).
# Flags override both.
PAPER = dict(image_size=256, stem_reductions=3, channels=16, cells=8, batch_size=8, epochs=300, alpha_milestones=[60, 150],
             warmup=0.3, partial_channels=4, steps_per_epoch=200)
DEMO = dict(image_size=64, stem_reductions=2, channels=8, cells=5, batch_size=32, epochs=5, alpha_milestones=[200, 280],
            videos=160, frames=4, warmup=0.4, partial_channels=1, steps_per_epoch=0)
RUN_KEYS = ("resume", "workers", "device", "log_every", "check_every", "checkpoint_every", "run_dir", "benchmark",
            "profile")  # what a resumed search may change
AFTER_SEARCH = dict(select="alpha", pt_batches=2, pt_tune_steps=5, out="g.json")  # defaults; a resume may change them
# when given (e.g. --resume --select pt --out g-pt.json: DARTS-PT on a finished search)
CELL_TYPES = ("normal", "reduce")


class SearchNetwork(nn.Module):
    """The one-shot network of Algorithm 1: ADD with every edge a MixedOp, reduction cells at 1/3
    and 2/3 of the depth, and the architecture parameters alpha (one row per edge, one column per
    operation; shared by all normal cells, and by all reduction cells). With partial channels
    (K > 1, PC-DARTS) also beta, one weight per edge, normalised over each node's inputs. alpha and
    beta are nn.Parameters, so state_dict and the checkpoint carry them."""
    def __init__(self, C, cells, stem_reductions, mask, partial=1):
        super().__init__()
        layout = [i in (cells // 3, 2 * cells // 3) for i in range(cells)]
        self.net = ADD(None, C, layout, stem_reductions, mask, partial=partial)
        shape = (len(search_edges()), len(PRIMITIVES))  # (14, 11)
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape))
        self.partial = partial
        if partial > 1:
            self.beta_normal = nn.Parameter(1e-3 * torch.randn(shape[0]))
            self.beta_reduce = nn.Parameter(1e-3 * torch.randn(shape[0]))

    def cell_weights(self):
        """(normal, reduce), each (softmax of alpha (n_edges, n_ops), normalised beta (n_edges,) or None)."""
        return tuple((getattr(self, f"alpha_{kind}").softmax(-1),
                      node_softmax(getattr(self, f"beta_{kind}")) if self.partial > 1 else None) for kind in CELL_TYPES)

    def forward(self, x, weights=None):
        return self.net(x, self.cell_weights() if weights is None else weights)

    def arch_parameters(self):
        return [p for name, p in self.named_parameters() if name.startswith(("alpha_", "beta_"))]

    def genotype(self):
        """The DARTS rule; with beta, on alpha x beta (PC-DARTS)."""
        return Genotype(*(derive_cell(w if e is None else w * e[:, None]) for w, e in self.cell_weights()))


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
    epoch, for the normal and the reduction cell; with partial channels (K > 1) a second row: each
    edge's normalised beta (PC-DARTS's edge weight, a softmax over each node's inputs)."""
    with open(log_path) as f:
        log = [json.loads(line) for line in f]
    epochs, beta = [e["epoch"] for e in log], "edge_weights" in log[0]
    fig, ax = figure(2 if beta else 1, 2, (12, 8 if beta else 4))
    for a, kind in zip(ax[0], CELL_TYPES):
        weights = torch.tensor([e["softmax_alpha"][kind] for e in log]).mean(1)  # (epochs, ops)
        for j, op in enumerate(PRIMITIVES):
            a.plot(epochs, weights[:, j], marker="o", color=[c / 255 for c in _colour(op)], label=op,
                   linestyle="--" if j % 2 else "-")
        a.set(xlabel="epoch", ylabel="softmax(alpha), mean over edges", title=f"{kind} cell")
    ax[0, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    if beta:
        names = [f"{node}<-{inp}" for node, inp, _ in search_edges()]
        for a, kind in zip(ax[1], CELL_TYPES):
            weights = torch.tensor([e["edge_weights"][kind] for e in log])  # (epochs, edges)
            for k, name in enumerate(names):
                a.plot(epochs, weights[:, k], marker=".", label=name, linestyle="--" if k % 2 else "-")
            a.set(xlabel="epoch", ylabel="edge weight (beta, softmax over a node's inputs)", title=f"{kind} cell: edges")
        ax[1, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), ncol=2)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# The expected size of the network a genotype makes (--param-weight: a term of alpha's loss)

def parameter_costs(cfg=TRAIN_PAPER):
    """The parameters of the ADD network a genotype makes at the paper's size (C 48, N 4, Table IV's
    5.6 M), split into what every genotype has (stem, the cells' 1x1 pre-processing, the heads) and,
    per cell type, a table (n_edges, n_ops): what operation o on search edge k adds, summed over the
    cells of that type. -> (base, {"normal": table, "reduce": table})."""
    layout = d2_layout(3, cfg["cells_per_block"])
    empty = Genotype(*[(("none", 0), ("none", 1)) * STEPS] * 2)  # no operation on any edge
    base = count_parameters(ADD(empty, cfg["channels"], layout, cfg["stem_reductions"]))
    sizes, tables = {}, {kind: torch.zeros(len(search_edges()), len(PRIMITIVES)) for kind in CELL_TYPES}
    width = cfg["channels"]
    for reduction in layout:
        width *= 2 if reduction else 1
        for k, (_, inp, _) in enumerate(search_edges()):
            stride = 2 if reduction and inp < 2 else 1
            for o, name in enumerate(PRIMITIVES):
                if (name, width, stride) not in sizes:
                    sizes[name, width, stride] = count_parameters(OPS[name](width, stride, True))
                tables[CELL_TYPES[reduction]][k, o] += sizes[name, width, stride]
    return base, tables


def expected_parameters(weights, costs):
    """E[parameters of the derived network at the paper's size] under the architecture weights
    (cell_weights()): each node's two edges taken as equally likely among its i + 2 inputs (each
    edge chosen with probability 2 / (i + 2)), each edge's operation drawn from the softmax of alpha
    without the zero operation (which is never chosen). Differentiable in alpha; a 0-dim tensor."""
    base, tables = costs
    device = weights[0][0].device
    chosen = torch.tensor([2 / (node + 2) for node, _, _ in search_edges()], device=device)[:, None]  # (n_edges, 1)
    nonzero = torch.tensor([name != "none" for name in PRIMITIVES], dtype=torch.float32, device=device)
    total = torch.tensor(float(base), device=device)
    for (w, _), kind in zip(weights, CELL_TYPES):
        p = w.float() * nonzero
        total = total + (chosen * p / p.sum(-1, keepdim=True) * tables[kind].to(device)).sum()
    return total


# ----------------------------------------------------------------------------------------------
# Choosing the cell by perturbation (--select pt; DARTS-PT, Wang et al., ICLR 2021)

def node_edges(node):
    """The rows of alpha that feed node `node` (its i + 2 incoming edges)."""
    first = sum(n + 2 for n in range(node))
    return range(first, first + node + 2)


def projected(weights, chosen, kept):
    """The architecture weights with the decisions taken so far: an edge whose operation is chosen
    becomes that operation alone (one-hot, the row's total kept); a node whose edges are chosen keeps
    only those. -> ((w, e), (w, e)) as cell_weights() gives them: with partial channels the edge
    weights e (normalised beta) stay separate and scale each whole edge, bypass channels included,
    as in the search."""
    out = []
    for (w, e), kind in zip(weights, CELL_TYPES):
        w, e = w.detach().clone(), None if e is None else e.detach().clone()  # (n_edges, n_ops), (n_edges,)
        for k, o in chosen[kind].items():
            total, w[k] = w[k].sum(), 0
            w[k, o] = total
        for node, edges in kept[kind].items():
            for k in set(node_edges(node)) - set(edges):
                remove((w, e), k)
        out.append((w, e))
    return tuple(out)


def remove(cell_weights, k, o=None):
    """In place: operation o of edge k gets weight 0; o None: the whole edge (its op weights and, with
    partial channels, its edge weight, so that its bypass channels go too)."""
    w, e = cell_weights
    if o is not None:
        w[k, o] = 0
        return
    w[k] = 0
    if e is not None:
        e[k] = 0


@torch.no_grad()
def validation_ce(model, weights, batches, device):
    """Mean cross-entropy of the search network with these weights on fixed validation batches
    (BatchNorm on batch statistics, as in the search)."""
    model.train()
    total = 0.0
    for batch in batches:
        x, _, y = to_device(batch, device)
        with autocast(device):
            logits, _ = model(x, weights)
        total += F.cross_entropy(logits.float(), y).item()
    return total / len(batches)


def select_by_perturbation(model, batches, tune, device, seed):
    """DARTS-PT's selection, on the validation cross-entropy (its --proj_crit loss):
    1) operations: edge by edge in a seeded random order (a normal and a reduction edge per round),
       the operation whose removal raises the validation CE most is chosen for the edge;
    2) topology: node by node, the incoming edge whose removal raises it least is dropped until two
       are left;
    after each round, tune(weights) trains w with the decisions so far. -> the genotype."""
    rng, chosen = random.Random(seed), {kind: {} for kind in CELL_TYPES}
    kept = {kind: {0: list(node_edges(0))} for kind in CELL_TYPES}  # node 0 has two inputs: nothing to decide
    ops = [o for o, name in enumerate(PRIMITIVES) if name != "none"]

    def ce_without(c, k, o=None):  # cell type c, edge k without operation o (o None: without the edge)
        weights = projected(model.cell_weights(), chosen, kept)
        remove(weights[c], k, o)
        return validation_ce(model, weights, batches, device)
    # 1) operations
    for _ in range(len(search_edges())):
        for c, kind in enumerate(CELL_TYPES):
            k = rng.choice([k for k in range(len(search_edges())) if k not in chosen[kind]])
            costs = {o: ce_without(c, k, o) for o in ops}
            chosen[kind][k] = max(costs, key=costs.get)
        tune(projected(model.cell_weights(), chosen, kept))
    # 2) topology
    for _ in range(1, STEPS):
        for c, kind in enumerate(CELL_TYPES):
            node = rng.choice([n for n in range(STEPS) if n not in kept[kind]])
            edges = list(node_edges(node))
            while len(edges) > 2:
                costs = {k: ce_without(c, k) for k in edges}
                edges.remove(min(costs, key=costs.get))
            kept[kind][node] = edges
        tune(projected(model.cell_weights(), chosen, kept))
    inputs = [inp for _, inp, _ in search_edges()]
    return Genotype(*(tuple((PRIMITIVES[chosen[kind][k]], inputs[k]) for node in range(STEPS) for k in sorted(kept[kind][node]))
                      for kind in CELL_TYPES))


def perturbation_genotype(args, model, loaders, device):
    """--select pt after the search: fixed validation batches (--pt-batches) to compare the removals
    on, and --pt-tune-steps w steps between rounds at a tenth of w's lr (as DARTS-PT's tuning)."""
    train_loader, val_loader = loaders
    val_loader.sampler.set_epoch(args.epochs)  # the validation split in an order the search never drew
    batches = [b for _, b in zip(range(args.pt_batches), val_loader)]
    train_batches = endless(train_loader, args.epochs)
    w_params = list(model.net.parameters())
    optimizer = torch.optim.SGD(w_params, w_learning_rate(args) / 10, momentum=args.momentum, weight_decay=args.weight_decay)

    def tune(weights):
        for _ in range(args.pt_tune_steps):
            gradient_step(model, optimizer, w_params, next(train_batches), device, args.mask_weight, args.grad_clip,
                          weights=weights)
    tic = time.time()
    genotype = select_by_perturbation(model, batches, tune, device, args.seed)
    print(f"DARTS-PT selection: {time.time() - tic:.1f} s (324 evaluations on {len(batches)} validation batches, "
          f"17 rounds of {args.pt_tune_steps} tuning steps)")
    return genotype


def endless(loader, epoch):
    """The loader's batches, epoch after epoch, from `epoch` on."""
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------------------------------
# Algorithm 1

def gradient_step(model, optimizer, params, batch, device, mask_weight, grad_clip, flips=None, weights=None,
                  penalty=None):
    """One update of `params` on one batch (Algorithm 1, lines 2-4 for w, 5-7 for alpha) -> the
    detached (CE, MSE, loss) on the device. Only the gradients of `params` are computed, so the
    alpha step does not pay for w's. weights: the architecture's (None: the network's own);
    penalty: a function giving a term added to the loss (the expected-parameter term)."""
    x, M, y = to_device(batch, device, flips)
    with autocast(device):
        logits, m = model(x, weights)
    ce, mse = loss_terms(logits, m, y, M)
    loss = add_loss(ce, mse, mask_weight) + (penalty() if penalty else 0)
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return torch.stack([ce, ce * 0 if mse is None else mse, loss]).detach()


def w_learning_rate(args):
    return args.w_lr * (args.batch_size / args.w_lr_batch if args.w_lr_batch else 1)


def warmup_steps(args, steps):
    """Steps of w alone before alpha moves: --warmup-epochs if given, else --warmup of all steps
    (scales with the run, as the milestones do; never all of them)."""
    total = args.epochs * steps
    return args.warmup_epochs * steps if args.warmup_epochs is not None else min(round(args.warmup * total), total - 1)


def build(args, device, steps):
    """The search network, the two optimizers and their schedulers (Sec. IV-B and the options), and
    the warm-up in steps."""
    model = prepare_model(SearchNetwork(args.channels, args.cells, args.stem_reductions, not args.no_mask_branch,
                                        args.partial_channels), device, args.compile)
    w_lr = w_learning_rate(args)
    if args.w_optimizer == "sgd":
        w_opt = torch.optim.SGD(model.net.parameters(), w_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        w_opt = torch.optim.Adam(model.net.parameters(), w_lr, betas=(args.momentum, 0.999), weight_decay=args.weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), args.alpha_lr, betas=tuple(args.alpha_betas),
                             weight_decay=args.weight_decay)
    w_sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, args.epochs, eta_min=w_lr * args.w_lr_min)
    warmup = warmup_steps(args, steps)
    alpha_epochs = args.epochs - warmup // steps  # alpha's schedule spans the epochs in which it moves
    a_sched = torch.optim.lr_scheduler.MultiStepLR(a_opt, scale_milestones(args.alpha_milestones, alpha_epochs), 0.1)
    return model, (w_opt, a_opt, w_sched, a_sched), warmup


class EpochOrder(Sampler):
    """The samples of one epoch, in an order that depends on (seed, epoch, stream) only: permutations
    of the split, as many as `length` needs, cut to it (with a step budget: a fresh random subset
    each epoch), from position `start` on (a resumed epoch continues where its checkpoint was)."""
    def __init__(self, n, length, seed, stream):
        self.n, self.length, self.seed, self.stream, self.epoch, self.start = n, length, seed, stream, 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch, self.stream)
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(-(-self.length // self.n))])
        return iter(order[self.start:self.length].tolist())

    def __len__(self):
        return self.length - self.start


def loaders(args):
    """Training split for w, validation split for alpha (Algorithm 1: D_train, D_val), one batch of
    each per step; an epoch is one pass over the training split, or --steps-per-epoch steps of it if
    fewer (a fresh random subset each epoch). -> (train loader, val loader), steps per epoch, steps
    of one pass."""
    methods = parse_methods(args.data, args.methods)
    sets = [open_split(args.data, args.root, s, methods, args.image_size, True, args.videos, args.frames,
                       args.synthetic) for s in ("train", "val")]
    for s, name in zip(sets, ("train", "val")):
        if len(s) < args.batch_size:
            raise InputError(f"--batch-size {args.batch_size}: the {name} split has only {len(s)} samples")
    one_pass = len(sets[0]) // args.batch_size
    steps = min(args.steps_per_epoch, one_pass) if args.steps_per_epoch else one_pass
    kw = dict(batch_size=args.batch_size, drop_last=True, num_workers=args.workers, worker_init_fn=ignore_stop_signals,
              pin_memory=torch.cuda.is_available(), persistent_workers=args.workers > 0)
    return [DataLoader(s, sampler=EpochOrder(len(s), steps * args.batch_size, args.seed, k), **kw)
            for k, s in enumerate(sets)], steps, one_pass


def search(args, device, state=None):
    """Algorithm 1, then the chosen genotype: g.json (--out) and its pictures, every epoch.
    Checkpoints every --checkpoint-every steps, at each epoch's end and on SIGTERM or SIGINT; a resumed search
    continues at the saved step with the same batches, flips, optimiser states and schedules."""
    # 1) data, network, optimizers, the warm-up in steps; resume from the last checkpoint if asked
    (train_loader, val_loader), steps, one_pass = loaders(args)
    model, optimizers, warmup = build(args, device, steps)
    w_opt, a_opt, w_sched, a_sched = optimizers
    at = restore(state, args.run_dir, model, optimizers) if state else dict(epoch=0, step=0, sums=torch.zeros(2, 4))
    w_params, a_params = list(model.net.parameters()), model.arch_parameters()
    alpha_mask_weight = args.mask_weight if args.alpha_loss == "eq7" else 0.0
    penalty = parameter_penalty(args, model) if args.param_weight else None
    total, done = args.epochs * steps, at["epoch"] * steps + at["step"]
    budget = (f" (--steps-per-epoch {args.steps_per_epoch}; one pass is {one_pass})" if steps < one_pass else
              f" (one pass over the training split{', capping --steps-per-epoch ' + str(args.steps_per_epoch) if args.steps_per_epoch else ''})")
    print(f"search network: {count_parameters(model.net) / 1e6:.2f} M weights, alpha 2 x {tuple(model.alpha_normal.shape)}"
          f"{', beta 2 x (14,)' if args.partial_channels > 1 else ''}; {args.epochs} epochs x {steps} steps{budget} = "
          f"{total} steps of {args.batch_size} training + {args.batch_size} validation images, alpha still for the first "
          f"{warmup}; {total - done} to do", flush=True)
    clock = Estimate(device, max(0, warmup - done), total - max(done, warmup))
    with StopSignals() as stop:
        for epoch in range(at["epoch"], args.epochs):
            # 2) alternate: a w step on a training batch, an alpha step on a validation batch (after the warm-up)
            first = at["step"] if epoch == at["epoch"] else 0
            sums = (at["sums"] if epoch == at["epoch"] else torch.zeros(2, 4)).to(device)  # (w, alpha) x (CE, MSE, loss, steps)
            for loader in (train_loader, val_loader):
                loader.sampler.set_epoch(epoch, first * args.batch_size)
            model.train()
            check = FiniteCheck(device, args.check_every, "the last checkpoint is intact: lower --w-lr or --alpha-lr")
            where = f"epoch {epoch + 1}"
            tic = time.time()
            for step, (batch, val_batch) in enumerate(zip(train_loader, val_loader), start=first):
                moving = epoch * steps + step >= warmup
                clock.tick(moving)
                w = gradient_step(model, w_opt, w_params, batch, device, args.mask_weight, args.grad_clip,
                                  epoch_generator(args.seed, epoch, step, 2))
                sums[0] += torch.cat([w, w.new_ones(1)])
                if moving:
                    a = gradient_step(model, a_opt, a_params, val_batch, device, alpha_mask_weight, None,
                                      epoch_generator(args.seed, epoch, step, 3), penalty=penalty)
                    sums[1] += torch.cat([a, a.new_ones(1)])
                check.add(w[2] + (a[2] if moving else 0), step - first, step + 1 == steps, where)
                if args.log_every and (step + 1) % args.log_every == 0:
                    print(f"  epoch {epoch + 1} step {step + 1}/{steps}: "
                          f"{(step + 1 - first) * args.batch_size / (time.time() - tic):.1f} training images/s", flush=True)
                if step + 1 < steps and ((step + 1) % args.checkpoint_every == 0 or stop):
                    check.read(step - first, where)  # no checkpoint after a non-finite loss
                    save_search(args, model, optimizers, epoch, step + 1, sums)
                    if stop:
                        raise Stopped(stopped_message(stop, epoch, step + 1, args.run_dir))
            # 3) end of epoch: schedules, derive, write g.json + pictures, log line, then the checkpoint
            w_sched.step()
            if sums[1, 3] > 0:
                a_sched.step()
            genotype = model.genotype()
            write_genotype(genotype, args.out)
            (train_ce, train_mse, _), moved = (sums[0, :3] / steps).tolist(), int(sums[1, 3])
            val_ce, val_mse, _ = (sums[1, :3] / max(1, moved)).tolist()
            log_epoch(args, model, genotype, epoch, dict(train_ce=train_ce, train_mse=train_mse, val_ce=val_ce if moved else None,
                                                        val_mse=val_mse if moved else None, alpha_steps=moved), time.time() - tic)
            save_search(args, model, optimizers, epoch + 1, 0, torch.zeros(2, 4))
            if stop and epoch + 1 < args.epochs:
                raise Stopped(stopped_message(stop, epoch + 1, 0, args.run_dir))
    genotype = model.genotype()
    if args.select == "pt":
        genotype = perturbation_genotype(args, model, (train_loader, val_loader), device)
        write_genotype(genotype, args.out)
        print("  chosen by DARTS-PT:")
        print_genotype(genotype)
    print(describe(genotype, args.out))
    return model


def stopped_message(stop, epoch, step, run_dir):
    return (f"stopped by {stop.name} at epoch {epoch + 1}, step {step}; its checkpoint is written: continue with "
            f"python search.py --resume --run-dir {run_dir}")


class Estimate:
    """How long the rest of the search takes, printed once `after` steps of each kind ran here:
    warm-up steps (w alone) and steps that also move alpha (a w and an alpha step)."""
    def __init__(self, device, left_warm, left_moving, after=20):
        self.device, self.left, self.after = device, {False: left_warm, True: left_moving}, after
        self.count, self.start, self.rate = {False: 0, True: 0}, {}, {}

    def tick(self, moving):  # before each step
        if self.count[moving] in (0, self.after):
            sync(self.device)
            if self.count[moving] == 0:
                self.start[moving] = time.time()
            else:
                self.rate[moving] = (time.time() - self.start[moving]) / self.after
                self.report(moving)
        self.count[moving] += 1
        self.left[moving] -= 1

    def report(self, moving):
        rate_moving = self.rate.get(True, 2 * self.rate.get(False, 0))  # until measured: w + alpha ~ 2x w alone
        left = self.left[False] * self.rate.get(False, 0) + self.left[True] * rate_moving  # this step included
        kind = "steps that move alpha (w + alpha)" if moving else "warm-up steps (w alone)"
        guess = "" if True in self.rate or not self.left[True] else ", alpha's steps guessed at 2x until measured"
        print(f"  time: {self.rate[moving]:.2f} s a step over the first {self.after} {kind} on {self.device}; "
              f"the rest takes about {duration(left)}{guess}", flush=True)


def duration(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.1f} min"


def parameter_penalty(args, model):
    """The --param-weight term of alpha's loss: weight * max(0, E[parameters] / target - 1), E at
    the paper's size (expected_parameters): zero once the expected network is within the target."""
    base, tables = parameter_costs()
    costs = base, {kind: table.to(next(model.parameters()).device) for kind, table in tables.items()}
    return lambda: args.param_weight * F.relu(expected_parameters(model.cell_weights(), costs) / args.param_target - 1)


def save_search(args, model, optimizers, epoch, step, sums):
    """search.pt: everything a resumed search needs to continue at (epoch, step) as if never stopped."""
    w_opt, a_opt, w_sched, a_sched = optimizers
    save_checkpoint(dict(model=model.state_dict(), w_opt=w_opt.state_dict(), a_opt=a_opt.state_dict(),
                         w_sched=w_sched.state_dict(), a_sched=a_sched.state_dict(), epoch=epoch, step=step,
                         sums=sums.cpu(), rng=torch.get_rng_state(), config=vars(args)),
                    os.path.join(args.run_dir, "search.pt"))


def restore(state, run_dir, model, optimizers):
    path = os.path.join(run_dir, "search.pt")
    load_state(model, state["model"], path)
    for module, key in zip(optimizers, ("w_opt", "a_opt", "w_sched", "a_sched")):
        load_state(module, state[key], path, key)
    torch.set_rng_state(state["rng"])
    print(f"resumed {path} at epoch {state['epoch'] + 1}, step {state['step']}")
    return dict(epoch=state["epoch"], step=state["step"], sums=state["sums"])


def log_epoch(args, model, genotype, epoch, losses, seconds):
    """Prints the losses and the genotype; appends them and the softmax of alpha to log.jsonl and
    redraws alpha.png."""
    weights = dict(zip(CELL_TYPES, model.cell_weights()))
    line = dict(epoch=epoch + 1, **losses, seconds=seconds, primitives=PRIMITIVES, genotype=genotype._asdict(),
                softmax_alpha={k: w.tolist() for k, (w, _) in weights.items()})
    if model.partial > 1:  # the cell is chosen by alpha x beta: both are logged
        line["edge_weights"] = {k: e.tolist() for k, (_, e) in weights.items()}
    log = os.path.join(args.run_dir, "log.jsonl")
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")
    draw_alpha(log, os.path.join(args.run_dir, "alpha.png"))
    strongest = model.alpha_normal.softmax(-1).max().item()
    val = "alpha still (warm-up)" if losses["val_ce"] is None else f"val CE {losses['val_ce']:.4f} MSE {losses['val_mse']:.4f}"
    print(f"epoch {epoch + 1}/{args.epochs}  train CE {losses['train_ce']:.4f} MSE {losses['train_mse']:.4f}  {val}  "
          f"{seconds:.1f} s  (strongest normal-cell op weight {strongest:.3f})", flush=True)
    print_genotype(genotype)


def print_genotype(genotype):
    for name in CELL_TYPES:
        cell = getattr(genotype, name)
        print(f"  {name:6s} " + "  ".join(f"{k // 2}<-{inp}:{op}" for k, (op, inp) in enumerate(cell)))


def benchmark(args, device, steps=10):
    """Times full search steps (a w step and an alpha step) on random batches of the configuration."""
    model, (w_opt, a_opt, _, _), _ = build(args, device, 1)
    w_params, a_params = list(model.net.parameters()), model.arch_parameters()
    batch = random_batch(args.batch_size, args.image_size)

    def step():
        gradient_step(model, w_opt, w_params, batch, device, args.mask_weight, args.grad_clip)
        gradient_step(model, a_opt, a_params, batch, device, args.mask_weight, None)
    before = peak_memory_mib(device)  # the model's, optimisers' and the batch's
    seconds, warm = time_steps(step, device, steps)
    b, s, peak = args.batch_size, args.image_size, peak_memory_mib(device)
    print(f"search step (w + alpha, batch {b}, {s} px, C={args.channels}, {args.cells} cells, partial channels "
          f"K={args.partial_channels}) on {device}: {seconds * 1000:.0f} ms, {b / seconds:.1f} training images/s, "
          f"peak memory {peak:.0f} MiB ({peak - before:.0f} MiB for the steps)"
          + (f"; compilation (warm-up) {warm:.1f} s" if args.compile else ""))
    if args.profile:
        profile_step(step, device)
    return seconds


def profile_step(step, device, rows=12):
    """--profile: torch.profiler over one more step: how many operator calls a step makes and where
    its time goes (a step of many small operators is bound by their per-call cost, not arithmetic)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    total, calls = sum(e.self_cpu_time_total for e in events), sum(e.count for e in events)
    print(f"profile of one step: {total / 1e3:.0f} ms of operator time (host) in {calls} operator calls, "
          f"{total / calls:.1f} us each on average")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--channels", type=bounded(int, 1), help="C of the first cells (DARTS: 16; demo: 8)")
    p.add_argument("--cells", type=bounded(int, 3), help="search cells, reductions at 1/3 and 2/3 (DARTS: 8; demo: 5)")
    p.add_argument("--stem-reductions", type=bounded(int, 0), help="stride-2 stem layers (3: 256 -> 32 px; demo: 2, 64 -> 16 px)")
    p.add_argument("--partial-channels", type=bounded(int, 1), metavar="K", help="PC-DARTS: 1/K of each edge's channels go through "
                   "its operations, with edge normalisation (paper: 1, DARTS; real data: 4, PC-DARTS's CIFAR value; demo: 1)")
    p.add_argument("--batch-size", type=bounded(int, 1), help="paper: 8 (Sec. IV-B); demo: 32")
    p.add_argument("--epochs", type=bounded(int, 1), help="paper: 300; demo: 5")
    p.add_argument("--steps-per-epoch", type=bounded(int, 0), help="w + alpha steps an epoch, each epoch a fresh random subset of "
                   "the training split (0: all of it, the paper; real data: 200, 60,000 steps in all: README, Search cost)")
    p.add_argument("--warmup", type=bounded(float, 0, 1), help="the first fraction of the steps trains w only, alpha still (paper: 0; "
                   "real data: 0.3, PC-DARTS's 15 of 50 epochs; demo: 0.4)")
    p.add_argument("--warmup-epochs", type=bounded(int, 0), help="the warm-up in epochs instead of --warmup")
    p.add_argument("--w-optimizer", default="sgd", choices=("sgd", "adam"), help="paper: momentum SGD")
    p.add_argument("--w-lr", type=bounded(float, 0), default=0.025, help="lr of w for --w-lr-batch samples, cosine schedule "
                   "(DARTS: 0.025 at 64; paper: 0.1 at batch 8, i.e. --w-lr 0.1 --w-lr-batch 0)")
    p.add_argument("--w-lr-batch", type=bounded(int, 0), default=64, help="--w-lr is for this batch and scales linearly to "
                   "--batch-size (0: --w-lr as given, the paper)")
    p.add_argument("--w-lr-min", type=bounded(float, 0), default=0.01, help="end of the cosine schedule, a fraction of the lr "
                   "(DARTS: 0.001 / 0.025 = 0.04)")
    p.add_argument("--momentum", type=bounded(float, 0, 1), default=0.9, help="SGD momentum, or Adam's beta1 for w (paper: 0.9)")
    p.add_argument("--alpha-lr", type=bounded(float, 0), default=0.02, help="Adam lr of alpha (paper: 0.02)")
    p.add_argument("--alpha-betas", type=bounded(float, 0, 1), nargs=2, default=[0.5, 0.999], help="Adam betas of alpha (DARTS: "
                   "0.5 0.999; paper: unstated, Adam's default 0.9 0.999)")
    p.add_argument("--alpha-loss", default="eq7", choices=("eq7", "ce"), help="the loss that moves alpha: Eq. 7 "
                   "(paper: Eq. 3 with the network's loss) or its cross-entropy alone")
    p.add_argument("--alpha-milestones", type=bounded(int, 1), nargs="+",
                   help="alpha lr / 10 at these epochs of 300, scaled to the epochs after the warm-up, in which alpha moves "
                   "(paper: 60 150; demo: 200 280)")
    p.add_argument("--weight-decay", type=bounded(float, 0), default=5e-4, help="both optimizers (paper: 5e-4)")
    p.add_argument("--grad-clip", type=bounded(float, 0), default=5.0, help="clip w's gradient norm (DARTS: 5; 0: off)")
    p.add_argument("--mask-weight", type=bounded(float, 0), default=1.0, help="alpha of Eq. 7 (paper: 1; 0: m unsupervised)")
    p.add_argument("--no-mask-branch", action="store_true", help="search without the mask branch (Eq. 4 alone)")
    p.add_argument("--param-weight", type=bounded(float, 0), default=0.1, help="add weight * max(0, E[parameters] / target - 1) to "
                   "alpha's loss, E at the paper's size (default 0.1: README, choosing the cell; paper: 0, no such term)")
    p.add_argument("--param-target", type=bounded(float, 1), default=5.6e6, help="the target of --param-weight (paper's network: 5.6 M)")
    p.add_argument("--select", choices=("alpha", "pt"), help="how the cell is chosen after the search: alpha, the "
                   "strongest softmax(alpha), times beta with partial channels (the default: paper, DARTS, PC-DARTS), or pt, "
                   "by removal (DARTS-PT)")
    p.add_argument("--pt-batches", type=bounded(int, 1), help="--select pt: validation batches each removal is scored on (2)")
    p.add_argument("--pt-tune-steps", type=bounded(int, 0), help="--select pt: w steps between its 17 rounds (5)")
    p.add_argument("--compile", action="store_true", help="torch.compile the search network (long on the CPU)")
    p.add_argument("--random-genotype", type=bounded(int, 0), metavar="SEED", help="write a random genotype (no search) and exit")
    p.add_argument("--out", help="the genotype to write (and its picture, .png; default g.json)")
    p.add_argument("--run-dir", default="runs/search", help="checkpoint, log.jsonl, alpha.png (a new one beside it "
                   "if it exists, unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/search.pt with its saved configuration "
                   "(--select, --pt-*, --out may change: a finished search then only chooses the cell again)")
    p.add_argument("--checkpoint-every", type=bounded(int, 1), default=100, help="also checkpoint every N steps inside an epoch "
                   "(a kill loses at most N steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--log-every", type=bounded(int, 0), default=0, help="print throughput every N steps (0: per epoch only)")
    p.add_argument("--check-every", type=bounded(int, 1), default=50, help="read the device's non-finite-loss count every N steps")
    p.add_argument("--benchmark", action="store_true", help="time search steps and exit")
    p.add_argument("--profile", action="store_true", help="with --benchmark: torch.profiler's table of one step")
    args = resolve_defaults(p.parse_args(argv), PAPER, DEMO)
    for key, value in AFTER_SEARCH.items():  # a resumed search takes its saved ones unless given
        if getattr(args, key) is None and not args.resume:
            setattr(args, key, value)
    return check_args(args)


def check_args(args):
    """Mistakes across flags, as one line each (each flag's own range is checked by its type)."""
    if args.no_mask_branch:
        args.mask_weight = 0.0
    if args.channels % args.partial_channels:
        raise InputError(f"--partial-channels {args.partial_channels}: must divide --channels {args.channels}")
    if args.image_size < 2 ** (args.stem_reductions + 2):
        raise InputError(f"--image-size {args.image_size}: the stem ({args.stem_reductions} halvings) and the two reduction "
                         f"cells need at least {2 ** (args.stem_reductions + 2)} px")
    if args.warmup_epochs is not None and args.warmup_epochs >= args.epochs and not (args.benchmark or args.resume):
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
    state = None
    if args.resume:  # the saved configuration, but for what a resumed run may change
        path = os.path.join(args.run_dir, "search.pt")
        state = load_checkpoint(path)
        given = {k: getattr(args, k) for k in AFTER_SEARCH if getattr(args, k) is not None}
        args = resumed_config(state, args, RUN_KEYS, path, ("epoch", "step", "sums", "w_opt", "a_opt"))
        vars(args).update(given)
        trim_log(os.path.join(args.run_dir, "log.jsonl"), state["epoch"])
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
    except Stopped as e:
        sys.exit(str(e))
