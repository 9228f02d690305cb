"""Architecture search for ADD: Algorithm 1 (Sec. III-A, III-B), first-order DARTS.

- SearchNetwork: ADD with every edge a MixedOp (Eq. 2) and alpha, a row an edge, a column an
  operation.
- derive_cell: the cell chosen after the search (end of Sec. III-A): the strongest operations.
- search: Algorithm 1's loop, a w step (lines 2-4) and an alpha step (lines 5-7) on Eq. 3's loss,
  the network's own Eq. 7; each epoch the cell goes to g.json and g.png (as Fig. 8).
Below the divider: the settings (the paper's and the departures: README) and what the paper does
not describe: a step budget, the checkpoint and the log, the parameter term, pictures, the CLI.

    python search.py                      # built-in synthetic data, the demo (~4 min, 2 cores)
    python search.py --data ff++          # real data: 256 px, batch 8, 300 epochs of <= 200 steps
    python search.py --data ff++ --paper  # the paper's own settings (Sec. IV-B)
    python search.py --resume             # continue runs/search/search.pt at its step
    python search.py --random-genotype 3 --out r.json    # a random architecture (NAS's baseline)
    torchrun --nproc_per_node 4 search.py --data ff++    # several GPUs: --batch-size split
    python search.py --benchmark          # ms per search step, peak memory, operator calls
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Sampler

from add import (ADD, BLOCKS, DEMO_SIZE, GRAD_CLIP, PAPER_SIZE, Run, Stopped, add_data_arguments,
                 all_ranks, append_log, count_parameters, d2_layout, epoch_generator, figure,
                 gradient_step, init_distributed, loader, loader_workers, new_run_dir, one_process,
                 open_split, peak_memory_mib, prepare_model, random_batch, rank_world,
                 resolve_defaults, restore, resume, run_main, save_checkpoint, save_figure,
                 scale_milestones, split_batch, sync, time_alternately, write_config)
from masks import InputError, Parser, bounded, parse_methods
from ops import (OPS, PRIMITIVES, STEPS, Genotype, node_softmax, random_genotype, save_genotype,
                 search_edges)

CELL_TYPES = ("normal", "reduce")


class SearchNetwork(nn.Module):
    """The one-shot network of Algorithm 1: ADD with every edge a MixedOp, reductions at 1/3 and 2/3
    of the depth, and alpha (shared by all normal cells, and by all reduction cells); with partial
    channels (PC-DARTS) also beta, a weight an edge. Both are nn.Parameters: the checkpoint carries
    them."""
    def __init__(self, C, cells, stem_reductions, partial=1):
        super().__init__()
        layout = [i in (cells // 3, 2 * cells // 3) for i in range(cells)]
        self.net = ADD(None, C, layout, stem_reductions, True, partial=partial)
        shape = (len(search_edges()), len(PRIMITIVES))  # (14, 11)
        for kind in CELL_TYPES:  # alpha_normal, alpha_reduce
            setattr(self, f"alpha_{kind}", nn.Parameter(1e-3 * torch.randn(shape)))
        self.partial = partial
        if partial > 1:
            for kind in CELL_TYPES:  # beta_normal, beta_reduce
                setattr(self, f"beta_{kind}", nn.Parameter(1e-3 * torch.randn(shape[0])))

    def cell_weights(self):
        """(normal, reduce), each (the softmax of alpha (n_edges, n_ops): Eq. 2's weights, the
        normalised beta (n_edges,) or None)."""
        return tuple((getattr(self, f"alpha_{kind}").softmax(-1),
                      node_softmax(getattr(self, f"beta_{kind}")) if self.partial > 1 else None)
                      for kind in CELL_TYPES)

    def forward(self, x):
        return self.net(x, self.cell_weights())

    def arch_parameters(self):
        return [p for name, p in self.named_parameters() if name.startswith(("alpha_", "beta_"))]

    def genotype(self):
        """The cells by the paper's rule (derive_cell); with beta, on alpha x beta (PC-DARTS)."""
        return Genotype(*(derive_cell(w if e is None else w * e[:, None])
                          for w, e in self.cell_weights()))


def derive_cell(weights):
    """The end of Sec. III-A, as DARTS does it, on the softmax of alpha (n_edges, n_ops): an edge's
    strength is its strongest operation other than zero; each node keeps its two strongest incoming
    edges (Eq. 1's two inputs), each with that operation. -> ((op, input), ...) two per node."""
    weights = weights.detach().clone()
    weights[:, 0] = -1  # the zero op (PRIMITIVES[0]) never wins
    pairs = []
    for edges in weights.split([node + 2 for node in range(STEPS)]):  # a node's incoming edges
        # the maximum over each edge's ops
        strength, best = edges.max(dim=1)  # Sec. III-A
        for inp in sorted(strength.topk(2).indices.tolist()):
            pairs.append((PRIMITIVES[best[inp]], inp))
    return tuple(pairs)


def search(args, device, state=None, group=None):
    """Algorithm 1 -> the search network. "While not converged" is --epochs of at most one pass
    each; a step is a w update on a training batch, then (after the warm-up) an alpha update on a
    validation batch. w's lr follows a cosine, alpha's drops at its milestones (Sec. IV-B). Each
    run of the loop: add.Run; checkpoints and the log: save and end_epoch, below the divider.
    group: several processes (torchrun), each a share of every batch, their gradients averaged."""
    rank, world = rank_world(group)
    data, steps, one_pass = loaders(args, device, rank, world)  # (D_train, D_val)
    model, optimizers, warmup = build(args, device, steps)
    w_opt, a_opt, w_sched, a_sched = optimizers
    alpha_mask_weight = MASK_WEIGHT if args.alpha_loss == "eq7" else 0.0
    penalty = parameter_penalty(args, model) if args.param_weight else None
    start = begin(args, model, optimizers, state, steps, one_pass, warmup)
    first_step = start["epoch"] * steps + start["step"]
    total = sum(1 + (k >= warmup) for k in range(first_step, args.epochs * steps))
    ranks = (rank,) if world > 1 else ()  # the flips' generators: one process's are every version's
    with Run(device, data, total, group, "the last checkpoint is intact: lower --w-lr") as run:
        for epoch in range(start["epoch"], args.epochs):  # Algorithm 1, line 1
            first, sums = epoch_start(args, model, data, start, epoch, device)
            tic = time.time()
            for step, (batch, val_batch) in enumerate(zip(*data), start=first):
                # random flips, the same when resumed
                flips = [epoch_generator(args.seed, epoch, step, k, *ranks) for k in (2, 3)]
                w_terms = gradient_step(model, w_opt, batch, device, MASK_WEIGHT, flips[0],
                                        world=world)  # Algorithm 1, lines 2-4
                sums.add("w", w_terms)
                loss = w_terms[2]
                moves = epoch * steps + step >= warmup  # after the warm-up (not in the paper)
                if moves:
                    alpha_terms = gradient_step(model, a_opt, val_batch, device, alpha_mask_weight,
                                                flips[1], penalty, clip=False,
                                                world=world)  # Algorithm 1, lines 5-7
                    sums.add("alpha", alpha_terms)
                    loss = loss + alpha_terms[2]
                stop = run.step(loss, len(batch[2]), epoch, step, steps, 1 + moves)
                if step + 1 < steps and ((step + 1) % CHECKPOINT_EVERY == 0 or stop):
                    means = sums.state(group)
                    run.on_rank0(lambda: save(args, model, optimizers, epoch, step + 1, means))
                    if stop:
                        raise Stopped(stopped(args, run.signal, epoch, step + 1))
            w_sched.step()
            if sums.counts["alpha"]:
                a_sched.step()
            run.check_weights(model, epoch)  # before a genotype is derived from them
            # g.json by Sec. III-A's rule, log, checkpoint
            end_epoch(args, model, optimizers, epoch, sums, time.time() - tic, run)
            if run.vote(run.signal)[0] and epoch + 1 < args.epochs:
                raise Stopped(stopped(args, run.signal, epoch + 1, 0))
        run.on_rank0(lambda: write_genotype(model.genotype(), args.out, "search"))
        print(describe(model.genotype(), args.out))
    return model


# ==============================================================================================
# Below: not the paper's method.

# The paper's own search (Sec. IV-B; DARTS's network where the paper is silent): --paper.
PAPER = dict(image_size=256, stem_reductions=3, channels=16, cells=8, batch_size=8, epochs=300,
             alpha_milestones=[60, 150], w_lr=0.8, warmup=0.0, alpha_betas=[0.9, 0.999],
             partial_channels=1, steps_per_epoch=0, param_weight=0.0)
# Real data: the paper's, but for the departures that make the search learn and fit a day
# (README, Departures)
REAL_DATA = dict(PAPER, w_lr=0.025, warmup=0.3, alpha_betas=[0.5, 0.999], partial_channels=4,
                 steps_per_epoch=200, param_weight=0.1)
DEPARTURES = [k for k in PAPER if PAPER[k] != REAL_DATA[k]]
# The built-in data: a demo for 2 CPU cores (late milestones: scaled to 3 epochs the paper's would
# cut alpha's lr at once)
DEMO = dict(REAL_DATA, image_size=64, stem_reductions=2, channels=8, cells=5, batch_size=32,
            epochs=5, alpha_milestones=[200, 280], videos=160, frames=4, warmup=0.4,
            partial_channels=1, steps_per_epoch=0)
DEFAULTS = dict(seed=0, device="auto", out="g.json", run_dir="runs/search", alpha_loss="eq7",
                paper=False)
W_LR_BATCH = 64  # --w-lr is for batches of 64, scaled linearly to --batch-size (DARTS: 0.025)
W_MOMENTUM = 0.9  # Sec. IV-B: momentum SGD for w
ALPHA_LR = 0.02  # Sec. IV-B: Adam at 0.02 for alpha
WEIGHT_DECAY = 5e-4  # of w and alpha (DARTS's)
W_LR_END = 0.01  # w's cosine ends at this fraction of its lr (the paper does not say; DARTS: 0.04)
MASK_WEIGHT = 1.0  # Eq. 7's alpha in the search (Sec. IV-C: 1)
PARAM_TARGET = 5.6e6  # the parameter term's target: Table IV's ADD
OPTIMIZERS = ("w_opt", "a_opt", "w_sched", "a_sched")  # their keys in search.pt
CHECKPOINT_EVERY = 100  # steps; also at each epoch's end and at the step a stop signal comes
# What the restored optimizers and schedules hold: a resumed run cannot change it
SCHEDULE = ("w_lr", "batch_size", "alpha_betas", "epochs", "warmup", "steps_per_epoch", "paper")
# Options of earlier versions that are constants here (or gone): a checkpoint that set them
# otherwise cannot resume
BUILT_IN = dict(w_optimizer="sgd", momentum=W_MOMENTUM, alpha_lr=ALPHA_LR,
                weight_decay=WEIGHT_DECAY, w_lr_batch=W_LR_BATCH, w_lr_min=W_LR_END,
                mask_weight=MASK_WEIGHT, param_target=PARAM_TARGET, grad_clip=GRAD_CLIP,
                warmup_epochs=None, no_flips=False, no_mask_branch=False, compile=False,
                deterministic=False, select="alpha")


def build(args, device, steps):
    """The search network, the two optimizers and their schedulers (Sec. IV-B and the departures),
    and the warm-up in steps: the first --warmup of all steps (never all of them)."""
    model = prepare_model(SearchNetwork(args.channels, args.cells, args.stem_reductions,
                                        args.partial_channels), device)
    w_lr = args.w_lr * (args.batch_size / W_LR_BATCH)
    w_opt = torch.optim.SGD(model.net.parameters(), w_lr, momentum=W_MOMENTUM,
                            weight_decay=WEIGHT_DECAY)
    a_opt = torch.optim.Adam(model.arch_parameters(), ALPHA_LR, betas=tuple(args.alpha_betas),
                             weight_decay=WEIGHT_DECAY)
    w_sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, args.epochs, w_lr * W_LR_END)
    warmup = min(round(args.warmup * args.epochs * steps), args.epochs * steps - 1)
    alpha_epochs = args.epochs - warmup // steps  # alpha's schedule spans the epochs it moves in
    milestones = scale_milestones(args.alpha_milestones, alpha_epochs)
    a_sched = torch.optim.lr_scheduler.MultiStepLR(a_opt, milestones, 0.1)
    return model, (w_opt, a_opt, w_sched, a_sched), warmup


class Sums:
    """The running sums of an epoch's (CE, MSE, loss) on the device (no host read a step), w's on
    the training batches and alpha's on the validation batches, each process its own. state() is
    the checkpoint's "means": every process's sums, (processes, 3), from which each resumes its
    own (another number of processes: their mean); losses() the means over steps and processes."""
    def __init__(self, device, saved, rank, world):
        saved = saved or dict(w=torch.zeros(3), alpha=torch.zeros(3), w_steps=0, alpha_steps=0)
        self.sums = {}
        self.counts = {}
        for k in ("w", "alpha"):
            rows = saved[k].reshape(-1, 3)  # (3,): one process's, as earlier versions saved it
            self.sums[k] = (rows[rank] if len(rows) == world else rows.mean(0)).to(device)
            self.counts[k] = saved[f"{k}_steps"]

    def add(self, kind, terms):
        self.sums[kind] += terms
        self.counts[kind] += 1

    def state(self, group):
        sums = {k: all_ranks(v, group) for k, v in self.sums.items()}
        return dict(**sums, **{f"{k}_steps": n for k, n in self.counts.items()})

    def losses(self, group):
        sums = {k: all_ranks(v, group).mean(0) for k, v in self.sums.items()}
        train_ce, train_mse, _ = (sums["w"] / self.counts["w"]).tolist()
        moved = self.counts["alpha"]
        val_ce, val_mse, _ = (sums["alpha"] / max(1, moved)).tolist()
        return dict(train_ce=train_ce, train_mse=train_mse, val_ce=val_ce if moved else None,
                    val_mse=val_mse if moved else None, alpha_steps=moved)


def begin(args, model, optimizers, state, steps, one_pass, warmup):
    """A resumed search's state (the network with alpha and beta, both optimizers and schedulers,
    the generator), and the plan's line. -> where the run starts: {epoch, step, means}."""
    start = dict(epoch=0, step=0, means=None)
    path = f"{args.run_dir}/search.pt"
    if state:
        restore(state, dict(zip(("model", *OPTIMIZERS), (model, *optimizers))), path)
        start = {k: state[k] for k in start}
        print(f"resumed {path} at epoch {state['epoch'] + 1}, step {state['step']}")
    total = args.epochs * steps
    done = start["epoch"] * steps + start["step"]
    budget = "one pass"
    if steps < one_pass:
        budget = f"--steps-per-epoch {args.steps_per_epoch}; one pass is {one_pass}"
    beta = ", beta 2 x (14,)" if args.partial_channels > 1 else ""
    print(f"search network: {count_parameters(model.net) / 1e6:.2f} M weights, alpha 2 x "
          f"{tuple(model.alpha_normal.shape)}{beta}; {args.epochs} epochs x {steps} steps "
          f"({budget}) = {total} steps of {args.batch_size} training + {args.batch_size} "
          f"validation images, alpha still for the first {warmup}; {total - done} to do",
          flush=True)
    return start


def epoch_start(args, model, loaders, start, epoch, device):
    """The epoch's first step (the saved one in the resumed epoch; its batches depend on (seed,
    epoch) only) and its running sums."""
    first, means = (start["step"], start["means"]) if epoch == start["epoch"] else (0, None)
    for data in loaders:
        data.sampler.set_epoch(epoch, first * args.batch_size)
    model.train()
    return first, Sums(device, means, loaders[0].sampler.rank, loaders[0].sampler.world)


def save(args, model, optimizers, epoch, step, means):
    """search.pt: everything a resumed search needs to continue at (epoch, step) as if never
    stopped (means: Sums.state(), None at an epoch's end). Rank 0's: every rank holds the same w,
    alpha and beta, and its own BatchNorm statistics, which the search never uses (it runs in
    training mode)."""
    optimizer_states = {k: o.state_dict() for k, o in zip(OPTIMIZERS, optimizers)}
    state = dict(model=model.state_dict(), **optimizer_states, epoch=epoch, step=step, means=means,
                 rng=torch.get_rng_state(), config=vars(args))
    save_checkpoint(state, f"{args.run_dir}/search.pt")


def stopped(args, signal_name, epoch, step):
    return (f"stopped by {signal_name or 'a signal to another process'} at epoch {epoch + 1}, "
            f"step {step}; its checkpoint is written: python search.py --resume --run-dir "
            f"{args.run_dir} continues there")


def end_epoch(args, model, optimizers, epoch, sums, seconds, run):
    """g.json and g.png; the log line (before the checkpoint: add.trim_log) with the losses (the
    mean over processes), the genotype, the softmax of alpha and beta (K > 1); the checkpoint:
    written by rank 0 (add.Run.on_rank0)."""
    genotype = model.genotype()
    weights = dict(zip(CELL_TYPES, model.cell_weights()))
    losses = sums.losses(run.group)
    line = dict(epoch=epoch + 1, **losses, seconds=seconds, primitives=PRIMITIVES,
                genotype=genotype._asdict(),
                softmax_alpha={k: w.tolist() for k, (w, _) in weights.items()})
    if model.partial > 1:  # the cell is chosen by alpha x beta: both are logged
        line["edge_weights"] = {k: e.tolist() for k, (_, e) in weights.items()}

    def write():
        write_genotype(genotype, args.out, "search")
        append_log(f"{args.run_dir}/log.jsonl", line)
        save(args, model, optimizers, epoch + 1, 0, None)
    run.on_rank0(write)
    strongest = weights["normal"][0].max().item()
    val = "alpha still (warm-up)"
    if losses["val_ce"] is not None:
        val = f"val CE {losses['val_ce']:.4f} MSE {losses['val_mse']:.4f}"
    print(f"epoch {epoch + 1}/{args.epochs}  train CE {losses['train_ce']:.4f} MSE "
          f"{losses['train_mse']:.4f}  {val}  {seconds:.1f} s  (strongest normal-cell op weight "
          f"{strongest:.3f})", flush=True)


class EpochOrder(Sampler):
    """An epoch's samples in an order that depends on (seed, epoch, stream) only: permutations of
    the split cut to `length` (a step budget: a fresh random subset each epoch), from `start` on (a
    resumed epoch). Under torchrun process r takes every world-th sample from the r-th: its share
    of each global batch."""
    def __init__(self, n, length, seed, stream, rank, world):
        self.n = n
        self.length = length
        self.seed = seed
        self.stream = stream
        self.rank = rank
        self.world = world
        self.set_epoch(0)

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch
        self.start = start

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch, self.stream)
        order = torch.cat([torch.randperm(self.n, generator=g)
                           for _ in range(-(-self.length // self.n))])
        return iter(order[self.start:self.length][self.rank::self.world].tolist())

    def __len__(self):
        return (self.length - self.start) // self.world


def loaders(args, device, rank=0, world=1):
    """Training split for w, validation split for alpha (Algorithm 1: D_train, D_val), a batch of
    each a step (under torchrun each process its share of it); an epoch is one pass, or
    --steps-per-epoch steps if fewer -> loaders, steps, steps of a pass."""
    methods = parse_methods(args.data, args.methods)
    sets = [open_split(args, split, methods, True) for split in ("train", "val")]
    share = split_batch(args.batch_size, world)
    for s, name in zip(sets, ("train", "val")):
        if len(s) < args.batch_size:
            raise InputError(f"--batch-size {args.batch_size}: the {name} split has only {len(s)} "
                             "samples")
    one_pass = len(sets[0]) // args.batch_size
    steps = min(args.steps_per_epoch or one_pass, one_pass)  # 0: one pass
    workers = loader_workers(args.data) if args.workers is None else args.workers
    return [loader(s, share, workers, device,
                   EpochOrder(len(s), steps * args.batch_size, args.seed, k, rank, world), True)
            for k, s in enumerate(sets)], steps, one_pass


# ----------------------------------------------------------------------------------------------
# The expected size of the network a genotype makes: a term of alpha's loss (--param-weight; not
# in the paper)

def parameter_penalty(args, model):
    """The --param-weight term of alpha's loss: weight * max(0, E[parameters] / target - 1), E at
    the paper's size: zero once the expected network is within the target. Its tables are on the
    device once: a step builds nothing from the host."""
    costs = [t.to(next(model.parameters()).device) for t in parameter_costs()]
    return lambda: args.param_weight * F.relu(
        expected_parameters(model.cell_weights(), costs) / PARAM_TARGET - 1)


def parameter_costs(cfg=PAPER_SIZE):
    """The parameters of the ADD network a genotype makes at the paper's size (C 48, N 4, Table
    IV's 5.6 M), as expected_parameters takes them: what every genotype has (stem, the cells' 1x1
    pre-processing, the heads), the probability that search edge k is chosen ((n_edges, 1): 2 of
    node i's i + 2 edges), which operations can be (not zero: (n_ops,)), and per cell type a table
    (n_edges, n_ops): what operation o on edge k adds, summed over the cells of that type."""
    layout = d2_layout(BLOCKS, cfg["cells_per_block"])
    empty = Genotype(*[(("none", 0), ("none", 1)) * STEPS] * 2)  # no operation on any edge
    base = count_parameters(ADD(empty, cfg["channels"], layout, cfg["stem_reductions"]))
    chosen = torch.tensor([2 / (node + 2) for node, _, _ in search_edges()])[:, None]
    nonzero = torch.tensor([name != "none" for name in PRIMITIVES], dtype=torch.float32)
    sizes = {}
    tables = [torch.zeros(len(search_edges()), len(PRIMITIVES)) for _ in CELL_TYPES]
    width = cfg["channels"]
    for reduction in layout:
        width *= 2 if reduction else 1
        for k, (_, inp, _) in enumerate(search_edges()):
            stride = 2 if reduction and inp < 2 else 1
            for o, name in enumerate(PRIMITIVES):
                key = (name, width, stride)
                if key not in sizes:
                    sizes[key] = count_parameters(OPS[name](width, stride, True))
                tables[reduction][k, o] += sizes[key]
    return torch.tensor(float(base)), chosen, nonzero, *tables  # normal, reduce


def expected_parameters(weights, costs):
    """E[parameters of the derived network at the paper's size] under the architecture weights
    (cell_weights()): each node's two edges taken as equally likely among its i + 2 inputs, each
    edge's operation drawn from the softmax of alpha without the zero operation (which is never
    chosen). costs: parameter_costs(). Differentiable in alpha; a 0-dim tensor."""
    total, chosen, nonzero, *tables = costs
    for (w, _), table in zip(weights, tables):
        p = w.float() * nonzero
        total = total + (chosen * p / p.sum(-1, keepdim=True) * table).sum()
    return total


# ----------------------------------------------------------------------------------------------
# The genotype's files and size

def write_genotype(genotype, path, origin):
    """g.json and its picture, g.png, as Fig. 8: per cell the inputs c_{k-2}, c_{k-1} left, nodes
    0-3, their concatenation c_{k} right, each chosen edge coloured and labelled with its
    operation."""
    save_genotype(genotype, path, origin)
    # c_{k-2}, c_{k-1}, nodes 0-3, c_{k}: placed so that no edge crosses a node
    pos = [(0.1, 0.71), (0.1, 0.24), (0.34, 0.84), (0.47, 0.09), (0.68, 0.61), (0.85, 0.24),
           (0.95, 0.5)]
    fig, ax = figure(1, 2, (12.4, 3.8))
    for a, cell, title in zip(ax[0], genotype, ("normal cell", "reduction cell")):  # Fig. 8
        for node in range(STEPS):
            arrow(a, pos[node + 2], pos[-1], "0.75", 1)
        for k, (op, inp) in enumerate(cell):
            arrow(a, pos[inp], pos[k // 2 + 2], colour(op), 2)
            t = 0.42 + 0.2 * (k % 2)  # a node's two labels apart
            (x0, y0), (x1, y1) = pos[inp], pos[k // 2 + 2]
            a.text(x0 + t * (x1 - x0), y0 + t * (y1 - y0), op, color=colour(op), ha="center",
                   va="center", fontsize=8, bbox=dict(fc="white", ec="none", pad=0.3))
        a.scatter(*zip(*pos), s=900, c=["#c8e6c8"] * 2 + ["#b4cdf0"] * STEPS + ["#f0dcaa"],
                  edgecolors="black", zorder=3)
        for (x, y), name in zip(pos, "c_{k-2} c_{k-1} 0 1 2 3 c_{k}".split()):
            a.text(x, y, name, ha="center", va="center", fontsize=8, zorder=4)
        a.set(title=title, xlim=(0, 1.03), ylim=(-0.05, 1))
        a.axis("off")
    save_figure(fig, os.path.splitext(path)[0] + ".png")


def arrow(a, start, end, colour, width):
    a.annotate("", end, start, arrowprops=dict(arrowstyle="-|>", color=colour, lw=width,
                                               shrinkA=16, shrinkB=16))


def colour(op):
    """One colour per operation, in g.png."""
    return ("black dimgray teal tab:blue orangered darkorange saddlebrown tab:green seagreen "
            "purple crimson").split()[PRIMITIVES.index(op)]


def describe(genotype, path):
    """The line naming the files and the sizes of the network the genotype makes (the paper's,
    the demo's)."""
    paper, demo = (count_parameters(ADD(genotype, c["channels"],
                                        d2_layout(BLOCKS, c["cells_per_block"]),
                                        c["stem_reductions"]))
                   for c in (PAPER_SIZE, DEMO_SIZE))
    return (f"wrote {path} and {os.path.splitext(path)[0]}.png: an ADD network of "
            f"{paper / 1e6:.2f} M parameters at the paper's size (C {PAPER_SIZE['channels']}, N "
            f"{PAPER_SIZE['cells_per_block']}), {demo / 1e6:.2f} M at the demo's (C "
            f"{DEMO_SIZE['channels']}, N {DEMO_SIZE['cells_per_block']})")


def benchmark(args, device, calls=10):
    """--benchmark: full search steps (a w and an alpha step) on a random batch of the
    configuration: ms per step, peak memory, and torch.profiler's count of the operators called
    on the host in one more step (a step of many small operators is bound by their per-call cost,
    not by arithmetic)."""
    model, (w_opt, a_opt, _, _), _ = build(args, device, 1)
    batch = random_batch(args.batch_size, args.image_size)

    def step():
        gradient_step(model, w_opt, batch, device, MASK_WEIGHT)
        gradient_step(model, a_opt, batch, device, MASK_WEIGHT, clip=False)
    before = peak_memory_mib(device)  # the model's, optimisers' and the batch's
    seconds = time_alternately(dict(step=step), device, calls, rounds=1)["step"]
    peak = peak_memory_mib(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        sync(device)
    # every operator call's (start, end) in ns, read raw: key_averages() takes 10 s for a real step
    spans = sorted((e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events())
    host, end = 0, 0
    for start, stop in spans:  # the union of the spans (a nested call lies inside its caller's)
        host += max(0, stop - max(start, end))
        end = max(end, stop)
    ops = len(spans)
    print(f"search step (w + alpha, batch {args.batch_size}, {args.image_size} px, "
          f"C={args.channels}, {args.cells} cells, partial channels K={args.partial_channels}) on "
          f"{device}: {seconds * 1000:.0f} ms, {args.batch_size / seconds:.1f} training images/s, "
          f"peak memory {peak:.0f} MiB ({peak - before:.0f} MiB for the steps); {ops} operator "
          f"calls a step, {host / ops / 1000:.1f} us of host time each")
    return seconds


def parse_args(argv=None):
    """The command line; every option left unset is None here, filled in by main (defaults)."""
    p = Parser(usage="python search.py [options]", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("the paper's search (Algorithm 1, Sec. IV-B; on the built-in data: "
                             "the demo's sizes)")
    g.add_argument("--epochs", type=bounded(int, 1), help="paper: 300; demo: 5")
    g.add_argument("--batch-size", type=bounded(int, 1),
                   help="the global batch, split across processes (paper: 8; demo: 32)")
    g.add_argument("--w-lr", type=bounded(float, 0),
                   help=f"lr of w (momentum SGD, cosine) for batches of {W_LR_BATCH}, scaled "
                   "linearly to --batch-size (default: DARTS's 0.025; the paper's 0.1 at batch 8 "
                   "is 0.8)")
    g.add_argument("--channels", type=bounded(int, 1),
                   help="C of the first cells (DARTS: 16; demo: 8)")
    g.add_argument("--cells", type=bounded(int, 3),
                   help="search cells, reductions at 1/3 and 2/3 (DARTS: 8; demo: 5)")
    g = p.add_argument_group("departures from the paper (README, Departures)")
    values = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in PAPER.items()}
    paper = " ".join(f"--{k.replace('_', '-')} {values[k]}" for k in DEPARTURES)
    g.add_argument("--paper", action="store_true", default=None,
                   help=f"the paper's own values: {paper} (README: what it costs)")
    g.add_argument("--warmup", type=bounded(float, 0, 1),
                   help="the first fraction of the steps trains w alone, alpha still (paper: 0; "
                   "real data: 0.3, PC-DARTS's 15 of 50 epochs; demo: 0.4)")
    g.add_argument("--alpha-betas", type=bounded(float, 0, 1), nargs=2,
                   help="Adam betas of alpha (paper: unstated, Adam's 0.9 0.999; default: DARTS's "
                   "0.5 0.999)")
    g.add_argument("--alpha-loss", choices=("eq7", "ce"),
                   help="the loss that moves alpha: Eq. 7 (the network's loss in Eq. 3; the "
                   "default) or its cross-entropy alone")
    g.add_argument("--partial-channels", type=bounded(int, 1), metavar="K",
                   help="PC-DARTS: 1/K of each edge's channels go through its operations, with "
                   "edge normalisation (paper: 1; real data: 4; demo: 1)")
    g.add_argument("--steps-per-epoch", type=bounded(int, 0),
                   help="at most this many steps an epoch, each epoch a fresh random subset, never "
                   "more than one pass (paper: 0, one pass; real data: 200, 60,000 steps in all)")
    g.add_argument("--param-weight", type=bounded(float, 0),
                   help="add weight * max(0, E[parameters] / 5.6 M - 1) to alpha's loss, E at "
                   "the paper's size (paper: 0, no such term; default: 0.1)")
    g = p.add_argument_group("running: data, device, resume")
    add_data_arguments(g)
    g.add_argument("--seed", type=bounded(int, 0), help="default 0")
    g.add_argument("--device", help="auto (CUDA if present; the default), cpu, cuda, cuda:1, ...")
    g.add_argument("--out", help="the genotype to write (and its picture, .png; default g.json)")
    g.add_argument("--run-dir", help="checkpoint and log.jsonl (default runs/search; a new one "
                   "beside it if it exists, unless --resume)")
    g.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/search.pt: the options given now, else its own")
    g = p.add_argument_group("extras (one process)")
    g.add_argument("--random-genotype", type=bounded(int, 0), metavar="SEED",
                   help="write a random genotype (no search) and exit")
    g.add_argument("--benchmark", action="store_true", help="time search steps and exit")
    return p.parse_args(argv)


def configure(args, check=True):
    """The configuration: every option left unset from the demo's settings (built-in data) or the
    real data's (--paper: the paper's for the departures); then, if check, the checks across
    options (of a resumed run: once the checkpoint's options are merged with those given)."""
    paper = {k: PAPER[k] for k in DEPARTURES} if args.paper else {}
    args = resolve_defaults(args, dict(REAL_DATA, **DEFAULTS, **paper),
                            dict(DEMO, **DEFAULTS, **paper))
    if not check:
        return args
    if args.channels % args.partial_channels:
        raise InputError(f"--partial-channels {args.partial_channels}: must divide --channels "
                         f"{args.channels}")
    if args.image_size < 2 ** (args.stem_reductions + 2):
        raise InputError(f"--image-size {args.image_size}: the stem ({args.stem_reductions} "
                         f"halvings) and the two reduction cells need at least "
                         f"{2 ** (args.stem_reductions + 2)} px")
    return args


def main(argv=None):
    given = parse_args(argv)
    # weights decaying to 0 (a run at chance) go subnormal: x86 steps 8x slower
    torch.set_flush_denormal(True)
    args = configure(argparse.Namespace(**vars(given)), check=given.benchmark or not given.resume)
    if args.random_genotype is not None:
        one_process("--random-genotype")
        genotype = random_genotype(args.random_genotype)
        write_genotype(genotype, args.out, "random")
        return print(describe(genotype, args.out))
    if args.benchmark:
        one_process("--benchmark")
    rank, world, device, group = init_distributed(args.device)
    torch.manual_seed(args.seed)
    if args.benchmark:
        return benchmark(args, device)
    state = None
    if args.resume:  # the saved configuration, but for the options given now
        path = f"{args.run_dir}/search.pt"
        needed = ("epoch", "step", "means", "w_opt", "a_opt")
        args, state = resume(path, given, vars(args), needed, BUILT_IN, SCHEDULE, rank == 0)
        args = configure(args)
    else:
        args.run_dir = new_run_dir(args.run_dir, group)
    print(f"run folder: {args.run_dir}")
    if rank == 0:
        write_config(args, f"{args.run_dir}/config.json")
    return search(args, device, state, group)


if __name__ == "__main__":
    run_main(main)
