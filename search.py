"""Architecture search for ADD: Algorithm 1 (Sec. III-A, III-B), first-order DARTS.

Read top to bottom, this file is the paper's search:
- SearchNetwork: ADD with every edge a MixedOp (Eq. 2) and the architecture alpha, one row of
  weights per edge and one column per operation of OP_df.
- derive_cell: the cell chosen after the search (end of Sec. III-A): the strongest operations.
- gradient_step: one update of w (Algorithm 1, lines 2-4) or of alpha (lines 5-7) on the loss of
  Eq. 3, which is the network's own, Eq. 7.
- search: Algorithm 1's loop; each epoch it derives the cell and writes it to g.json with a picture
  as in Fig. 8.
Below the divider: the settings (the paper's, and the departures from them: README, Departures) and
what the paper does not describe: data loading with a step budget, checkpoints, resume and stop
signals, the expected-parameter term, DARTS-PT's selection, the pictures, --benchmark, the command
line.

The paper's own search (Sec. IV-B: momentum SGD at lr 0.1 for w, alpha moving from the first step,
every edge on all channels, every training face each epoch) is `--paper`. Its w learning rate
leaves the one-shot network at chance on the demo data, and its budget is ~235 days on FF++ at
this CPU's step time (README, Speed); the defaults do what the DARTS family does instead (README, Departures).

    python search.py                      # built-in synthetic data, demo configuration (~5 min, 2 CPU cores)
    python search.py --data ff++          # real data: 256 px, batch 8, 300 epochs of at most 200 steps
    python search.py --data ff++ --paper  # the paper's own settings (Sec. IV-B)
    python search.py --resume             # continue a stopped search from runs/search/search.pt, at its step
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
from torch.utils.data import Sampler

from add import (ADD, Diverged, FiniteCheck, StoppableRun, Stopped, add_loss, autocast, count_parameters, d2_layout,
                 epoch_generator, load_checkpoint, loader, loss_terms, new_run_dir, peak_memory_mib, pick_device,
                 prepare_model, random_batch, restore, resumed_config, save_checkpoint, scale_milestones,
                 sync, time_steps, to_device, trim_log)
from masks import add_data_arguments, loader_workers, open_split, parse_methods, resolve_defaults
from ops import (OPS, PRIMITIVES, STEPS, Genotype, InputError, Parser, atomic_write, bounded, draw_genotype, node_softmax,
                 op_colour, random_genotype, save_genotype, search_edges)
from train import DEMO as TRAIN_DEMO, REAL_DATA as TRAIN_REAL_DATA, figure, save_figure

CELL_TYPES = ("normal", "reduce")


class SearchNetwork(nn.Module):
    """The one-shot network of Algorithm 1: ADD with every edge a MixedOp, reduction cells at 1/3
    and 2/3 of the depth, and the architecture alpha (one row per edge, one column per operation;
    shared by all normal cells, and by all reduction cells). With partial channels (K > 1, PC-DARTS;
    not in the paper) also beta, one weight per edge, normalised over each node's inputs. alpha and
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
        """(normal, reduce), each (the softmax of alpha (n_edges, n_ops): Eq. 2's weights, the
        normalised beta (n_edges,) or None)."""
        return tuple((getattr(self, f"alpha_{kind}").softmax(-1),
                      node_softmax(getattr(self, f"beta_{kind}")) if self.partial > 1 else None) for kind in CELL_TYPES)

    def forward(self, x, weights=None):
        return self.net(x, self.cell_weights() if weights is None else weights)

    def arch_parameters(self):
        return [p for name, p in self.named_parameters() if name.startswith(("alpha_", "beta_"))]

    def genotype(self):
        """The cells by the paper's rule (derive_cell); with beta, on alpha x beta (PC-DARTS)."""
        return Genotype(*(derive_cell(chosen_by(w, e)) for w, e in self.cell_weights()))


def chosen_by(w, e):
    """The weights a cell is chosen by: the softmax of alpha (n_edges, n_ops); with partial channels
    times the normalised beta (n_edges,), as PC-DARTS."""
    return w if e is None else w * e[:, None]


def derive_cell(weights):
    """The end of Sec. III-A, as DARTS does it, on the softmax of alpha (n_edges, n_ops): an edge's
    strength is its strongest operation other than zero; each node keeps its two strongest incoming
    edges (Eq. 1's two inputs), each with that operation. -> ((op, input), ...) two per node."""
    weights = weights.detach().clone()
    weights[:, PRIMITIVES.index("none")] = -1  # the zero op never wins
    pairs, row = [], 0
    for node in range(STEPS):
        strength, best = weights[row:row + node + 2].max(dim=1)  # Sec. III-A: the maximum over each edge's ops
        for inp in sorted(strength.topk(2).indices.tolist()):
            pairs.append((PRIMITIVES[best[inp]], inp))
        row += node + 2
    return tuple(pairs)


def gradient_step(model, optimizer, params, batch, device, mask_weight, grad_clip, flips=None, weights=None,
                  penalty=None):
    """One update of `params` on one batch: w on a training batch (Algorithm 1, lines 2-4) or alpha
    on a validation batch (lines 5-7) -> the detached (CE, MSE, loss) on the device. Only the
    gradients of `params` are computed, so the alpha step does not pay for w's. weights: the
    architecture's (None: the network's own); penalty: a term added to the loss (--param-weight)."""
    x, M, y = to_device(batch, device, flips)
    with autocast(device):
        logits, m = model(x, weights)
    ce, mse = loss_terms(logits, m, y, M)
    loss = add_loss(ce, mse, mask_weight)  # Eq. 3: L(y; F(x, alpha, w)), the network's own loss (Eq. 7)
    if penalty:
        loss = loss + penalty()  # --param-weight's term (not in the paper)
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()  # w = w - grad_w L (line 4), or alpha = alpha - grad_alpha L (line 7), by the optimizer's rule
    return torch.stack([ce, ce * 0 if mse is None else mse, loss]).detach()


def build(args, device, steps):
    """The search network, the two optimizers and their schedulers (Sec. IV-B and the departures),
    and the warm-up in steps."""
    model = prepare_model(SearchNetwork(args.channels, args.cells, args.stem_reductions, not args.no_mask_branch,
                                        args.partial_channels), device, args.compile, args.deterministic)
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


def search(args, device, state=None):
    """Algorithm 1 -> the search network. "While not converged" is --epochs of at most one pass
    each; a step is a w update on a training batch, then (after the warm-up) an alpha update on a
    validation batch. w's lr follows a cosine, alpha's drops at its milestones (Sec. IV-B). The
    bookkeeping (resume, checkpoints, stop signals, losses, the clock, g.json and the log) is
    SearchRun's, below the divider."""
    (train_loader, val_loader), steps, one_pass = loaders(args)  # D_train, D_val
    model, (w_opt, a_opt, w_sched, a_sched), warmup = build(args, device, steps)
    w_params, a_params = list(model.net.parameters()), model.arch_parameters()
    alpha_mask_weight = args.mask_weight if args.alpha_loss == "eq7" else 0.0
    penalty = parameter_penalty(args, model) if args.param_weight else None
    with SearchRun(args, model, (w_opt, a_opt, w_sched, a_sched), (train_loader, val_loader), device, steps, one_pass,
                   warmup, state) as run:
        for epoch in run.epochs():  # Algorithm 1, line 1
            for step, batch, val_batch in run.batches(epoch):
                w = gradient_step(model, w_opt, w_params, batch, device, args.mask_weight, args.grad_clip,
                                  run.flips(epoch, step, 2))  # Algorithm 1, lines 2-4
                a = None
                if run.alpha_moves(epoch, step):
                    a = gradient_step(model, a_opt, a_params, val_batch, device, alpha_mask_weight, None,
                                      run.flips(epoch, step, 3), penalty=penalty)  # Algorithm 1, lines 5-7
                run.after_step(epoch, step, w, a)
            w_sched.step()
            if run.alpha_moved():
                a_sched.step()
            run.after_epoch(epoch, model.genotype())  # Sec. III-A's rule, written to g.json each epoch
        genotype = model.genotype() if args.select == "alpha" else \
            perturbation_genotype(args, model, (train_loader, val_loader), device, run.stop)
        run.finish(genotype)  # g.json, its size, how decisive alpha's choices were
    return model


# ==============================================================================================
# Below: not the paper's method. Settings and departures, data, the bookkeeping of a run,
# the parameter term, DARTS-PT, pictures, --benchmark, the command line (with --random-genotype).

# The paper's own search (Sec. IV-B; DARTS's network where the paper is silent): --paper.
PAPER = dict(image_size=256, stem_reductions=3, channels=16, cells=8, batch_size=8, epochs=300, alpha_milestones=[60, 150],
             w_lr=0.1, w_lr_batch=0, warmup=0.0, alpha_betas=[0.9, 0.999], partial_channels=1, steps_per_epoch=0,
             param_weight=0.0)
# The defaults on real data: the paper's, but for the departures that make the search learn and fit a day
# (README, Departures: DARTS's w rate per sample, PC-DARTS's warm-up and partial channels, a budget of steps,
# the parameter term); --paper sets these keys back to the paper's.
REAL_DATA = dict(PAPER, w_lr=0.025, w_lr_batch=64, warmup=0.3, alpha_betas=[0.5, 0.999], partial_channels=4,
                 steps_per_epoch=200, param_weight=0.1)
DEPARTURES = [k for k in PAPER if PAPER[k] != REAL_DATA[k]]
# The built-in synthetic data: a demo sized for 2 CPU cores, the departures of real data but for partial channels
# and the budget (the demo's milestones are late: scaled to 3 epochs the paper's would cut alpha's lr at once)
DEMO = dict(REAL_DATA, image_size=64, stem_reductions=2, channels=8, cells=5, batch_size=32, epochs=5,
            alpha_milestones=[200, 280], videos=160, frames=4, warmup=0.4, partial_channels=1, steps_per_epoch=0)
RUN_KEYS = ("resume", "workers", "device", "log_every", "check_every", "checkpoint_every", "run_dir", "benchmark",
            "profile", "deterministic")  # what a resumed search may change
# Options added after some search.pt files were written, with the value such a checkpoint stands for (--paper's
# values are in the saved configuration anyway)
ADDED = dict(paper=False, no_flips=False, data_seed=0)
# Defaults a resumed search may change when given (--resume --select pt --out g-pt.json: DARTS-PT on a finished search)
AFTER_SEARCH = dict(select="alpha", pt_batches=2, pt_tune_steps=5, out="g.json")
NEAR_TIE = 0.01  # a choice whose runner-up is within this much softmax weight (of ~0.1-0.2) is a near-tie


def w_learning_rate(args):
    return args.w_lr * (args.batch_size / args.w_lr_batch if args.w_lr_batch else 1)


def warmup_steps(args, steps):
    """Steps of w alone before alpha moves: --warmup-epochs if given, else --warmup of all steps
    (scales with the run, as the milestones do; never all of them)."""
    total = args.epochs * steps
    return args.warmup_epochs * steps if args.warmup_epochs is not None else min(round(args.warmup * total), total - 1)


class SearchRun(StoppableRun):
    """The bookkeeping around Algorithm 1, so that search() shows the algorithm alone: resume, the
    plan and the clock, the epoch's running means, non-finite losses, checkpoints (every
    --checkpoint-every steps, at each epoch's end, and when a stop signal came: SIGTERM, SIGINT),
    g.json and its picture, the log line, alpha.png."""
    def __init__(self, args, model, optimizers, loaders, device, steps, one_pass, warmup, state):
        self.args, self.model, self.optimizers, self.loaders, self.device = args, model, optimizers, loaders, device
        self.steps, self.warmup, self.drawn, self.path = steps, warmup, -math.inf, os.path.join(args.run_dir, "search.pt")
        self.start = dict(epoch=0, step=0, means=None)
        if state:  # the network with alpha and beta, both optimizers and schedulers, the generators
            restore(state, dict(zip(("model", "w_opt", "a_opt", "w_sched", "a_sched"), (model, *optimizers))), self.path)
            self.start = {k: state[k] for k in self.start}
            print(f"resumed {self.path} at epoch {state['epoch'] + 1}, step {state['step']}")
        total, done = args.epochs * steps, self.start["epoch"] * steps + self.start["step"]
        budget = (f" (--steps-per-epoch {args.steps_per_epoch}; one pass is {one_pass})" if steps < one_pass else
                  f" (one pass over the training split{f', capping --steps-per-epoch {args.steps_per_epoch}' if args.steps_per_epoch else ''})")
        print(f"search network: {count_parameters(model.net) / 1e6:.2f} M weights, alpha 2 x {tuple(model.alpha_normal.shape)}"
              f"{', beta 2 x (14,)' if args.partial_channels > 1 else ''}; {args.epochs} epochs x {steps} steps{budget} = "
              f"{total} steps of {args.batch_size} training + {args.batch_size} validation images, alpha still for the first "
              f"{warmup}; {total - done} to do", flush=True)
        self.clock = Estimate(device, max(0, warmup - done), total - max(done, warmup))

    def epochs(self):
        return range(self.start["epoch"], self.args.epochs)

    def alpha_moves(self, epoch, step):
        """alpha is still for the warm-up's first steps (--warmup: not in the paper), then moves every step."""
        return epoch * self.steps + step >= self.warmup

    def flips(self, epoch, step, stream):
        """The random horizontal flips of a step's batch (add.random_flips; not in the paper: --no-flips),
        seeded by (seed, epoch, step, stream): a resumed search flips as an uninterrupted one."""
        return None if self.args.no_flips else epoch_generator(self.args.seed, epoch, step, stream)

    def alpha_moved(self):
        """Whether alpha moved in this epoch: its milestones count those epochs."""
        return self.means.alpha_steps > 0

    def batches(self, epoch):
        """(step, training batch, validation batch) for each step of the epoch, from the saved step on
        when the epoch is the resumed one; the batches depend on (seed, epoch) only."""
        resumed = epoch == self.start["epoch"]
        self.first = self.start["step"] if resumed else 0
        self.means = Means(self.device, self.start["means"] if resumed else None)
        for data in self.loaders:
            data.sampler.set_epoch(epoch, self.first * self.args.batch_size)
        self.model.train()
        self.check = FiniteCheck(self.device, self.args.check_every, "the last checkpoint is intact: lower --w-lr or --alpha-lr")
        self.check.start = self.first  # its windows count the epoch's steps
        self.tic = time.time()
        for step, (batch, val_batch) in enumerate(zip(*self.loaders), start=self.first):
            self.clock.tick(self.alpha_moves(epoch, step))
            yield step, batch, val_batch

    def after_step(self, epoch, step, w, a):
        """w, a: the (CE, MSE, loss) of the step's w and alpha updates (a None in the warm-up)."""
        self.means.add(w, a)
        where, last = f"epoch {epoch + 1}", step + 1 == self.steps
        self.check.add(w[2] + (a[2] if a is not None else 0), step, last, where)
        if self.args.log_every and (step + 1) % self.args.log_every == 0:
            print(f"  epoch {epoch + 1} step {step + 1}/{self.steps}: "
                  f"{(step + 1 - self.first) * self.args.batch_size / (time.time() - self.tic):.1f} training images/s", flush=True)
        if not last and ((step + 1) % self.args.checkpoint_every == 0 or self.stop):
            self.check.read(step, where)  # no checkpoint after a non-finite loss
            self.save(epoch, step + 1, self.means)
            if self.stop:
                raise Stopped(self.stopped(epoch, step + 1))

    def after_epoch(self, epoch, genotype):
        """g.json and g.png, the log line (before the checkpoint: add.trim_log), the checkpoint."""
        write_genotype(genotype, self.args.out, "search")
        self.log(epoch, genotype, time.time() - self.tic)
        self.save(epoch + 1, 0, None)
        if self.stop and epoch + 1 < self.args.epochs:
            raise Stopped(self.stopped(epoch + 1, 0))

    def stopped(self, epoch, step):
        return (f"stopped by {self.stop.name} at epoch {epoch + 1}, step {step}; its checkpoint is written: continue "
                f"with python search.py --resume --run-dir {self.args.run_dir}")

    def save(self, epoch, step, means):
        """search.pt: everything a resumed search needs to continue at (epoch, step) as if never stopped."""
        w_opt, a_opt, w_sched, a_sched = self.optimizers
        save_checkpoint(dict(model=self.model.state_dict(), w_opt=w_opt.state_dict(), a_opt=a_opt.state_dict(),
                             w_sched=w_sched.state_dict(), a_sched=a_sched.state_dict(), epoch=epoch, step=step,
                             means=means.state() if means else None, rng=torch.get_rng_state(), config=vars(self.args)),
                        self.path)

    def log(self, epoch, genotype, seconds):
        """Prints the losses and the genotype; appends them, the softmax of alpha, beta (K > 1) and the
        choices' margins to log.jsonl; redraws alpha.png (at most once a minute, and at the end)."""
        losses, weights = self.means.losses(), dict(zip(CELL_TYPES, self.model.cell_weights()))
        line = dict(epoch=epoch + 1, **losses, seconds=seconds, primitives=PRIMITIVES, genotype=genotype._asdict(),
                    softmax_alpha={k: w.tolist() for k, (w, _) in weights.items()},
                    margins={k: choice_margins(chosen_by(w, e)) for k, (w, e) in weights.items()})
        if self.model.partial > 1:  # the cell is chosen by alpha x beta: both are logged
            line["edge_weights"] = {k: e.tolist() for k, (_, e) in weights.items()}
        log = os.path.join(self.args.run_dir, "log.jsonl")
        with open(log, "a") as f:
            f.write(json.dumps(line) + "\n")
        if time.time() - self.drawn > 60 or epoch + 1 == self.args.epochs or self.stop:
            draw_alpha(log, os.path.join(self.args.run_dir, "alpha.png"))
            self.drawn = time.time()
        strongest = weights["normal"][0].max().item()
        val = "alpha still (warm-up)" if losses["val_ce"] is None else f"val CE {losses['val_ce']:.4f} MSE {losses['val_mse']:.4f}"
        print(f"epoch {epoch + 1}/{self.args.epochs}  train CE {losses['train_ce']:.4f} MSE {losses['train_mse']:.4f}  "
              f"{val}  {seconds:.1f} s  (strongest normal-cell op weight {strongest:.3f})", flush=True)
        print_genotype(genotype)

    def finish(self, genotype):
        """The last line: the files written, the network's size, and how decisive alpha's choices were
        (--select pt: how many of them DARTS-PT kept)."""
        write_genotype(genotype, self.args.out, "search" if self.args.select == "alpha" else "search (DARTS-PT)")
        if self.args.select == "pt":
            by_alpha = self.model.genotype()
            kept = sum(len(set(a[k:k + 2]) & set(b[k:k + 2])) for a, b in zip(genotype, by_alpha) for k in range(0, 8, 2))
            return print(f"{describe(genotype, self.args.out)}; DARTS-PT kept {kept} of alpha's 16 (operation, input) "
                         f"choices")
        margins = [choice_margins(chosen_by(w, e)) for w, e in self.model.cell_weights()]
        ops = sum(m < NEAR_TIE for cell in margins for m in cell["operation"])
        inputs = sum(m < NEAR_TIE for cell in margins for m in cell["inputs"] if m is not None)
        print(f"{describe(genotype, self.args.out)}; alpha's choices: {ops} of 16 operations and {inputs} of 6 input "
              f"pairs are near-ties (runner-up within {NEAR_TIE} of softmax weight)")


class Means:
    """The running sums of an epoch's loss terms (CE, MSE, loss), on the device (no host sync a step):
    w's on the training batches, alpha's on the validation batches."""
    def __init__(self, device, saved=None):
        saved = saved or dict(w=torch.zeros(3), alpha=torch.zeros(3), w_steps=0, alpha_steps=0)
        self.w, self.alpha = saved["w"].to(device), saved["alpha"].to(device)
        self.w_steps, self.alpha_steps = saved["w_steps"], saved["alpha_steps"]

    def add(self, w, a):
        self.w += w
        self.w_steps += 1
        if a is not None:
            self.alpha += a
            self.alpha_steps += 1

    def state(self):
        return dict(w=self.w.cpu(), alpha=self.alpha.cpu(), w_steps=self.w_steps, alpha_steps=self.alpha_steps)

    def losses(self):
        (train_ce, train_mse, _), moved = (self.w / self.w_steps).tolist(), self.alpha_steps
        val_ce, val_mse, _ = (self.alpha / max(1, moved)).tolist()
        return dict(train_ce=train_ce, train_mse=train_mse, val_ce=val_ce if moved else None,
                    val_mse=val_mse if moved else None, alpha_steps=moved)


def upgrade(state):
    """A search.pt of the version before commit 0e16673 in today's format, so that a search of days
    resumes: the epoch's running sums were one tensor (2, 4), (w, alpha) x (CE, MSE, loss, steps)."""
    if isinstance(state, dict) and "sums" in state and "means" not in state:
        sums = state.pop("sums")
        state["means"] = dict(w=sums[0, :3], alpha=sums[1, :3], w_steps=int(sums[0, 3]),
                              alpha_steps=int(sums[1, 3])) if state.get("step") else None
    return state


def node_edges(node):
    """The rows of alpha that feed node `node` (its i + 2 incoming edges)."""
    first = sum(n + 2 for n in range(node))
    return range(first, first + node + 2)


def choice_margins(weights):
    """How decisive the paper's rule (derive_cell) is on these weights (n_edges, n_ops): per kept edge,
    its operation's weight minus the runner-up operation's ("operation", 8); per node, its weaker kept
    edge's strength minus the strongest dropped edge's ("inputs", 4: None for node 0, which has two)."""
    w = weights.detach().clone()
    w[:, PRIMITIVES.index("none")] = -1
    top = w.topk(2, dim=1).values  # (n_edges, 2): each edge's strongest two operations
    margins = dict(operation=[], inputs=[])
    for node in range(STEPS):
        strength = top[list(node_edges(node)), 0]
        order = strength.argsort(descending=True).tolist()
        margins["operation"] += [float(top[node_edges(node)[k], 0] - top[node_edges(node)[k], 1]) for k in sorted(order[:2])]
        margins["inputs"].append(float(strength[order[1]] - strength[order[2]]) if node else None)
    return margins


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
    each per step, both balanced as training is (FF++'s real frames repeated); an epoch is one pass
    over the training split, or --steps-per-epoch steps of it if fewer (a fresh random subset each
    epoch). -> (train loader, val loader), steps per epoch, steps of one pass."""
    methods = parse_methods(args.data, args.methods)
    sets = [open_split(args.data, args.root, s, methods, args.image_size, True, args.videos, args.frames,
                       args.synthetic, args.data_seed) for s in ("train", "val")]
    for s, name in zip(sets, ("train", "val")):
        if len(s) < args.batch_size:
            raise InputError(f"--batch-size {args.batch_size}: the {name} split has only {len(s)} samples")
    one_pass = len(sets[0]) // args.batch_size
    steps = min(args.steps_per_epoch, one_pass) if args.steps_per_epoch else one_pass
    return [loader(s, args.batch_size, args.workers, EpochOrder(len(s), steps * args.batch_size, args.seed, k), True)
            for k, s in enumerate(sets)], steps, one_pass


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


# The expected size of the network a genotype makes: a term of alpha's loss (--param-weight; not in the paper)

def parameter_penalty(args, model):
    """The --param-weight term of alpha's loss: weight * max(0, E[parameters] / target - 1), E at
    the paper's size (expected_parameters): zero once the expected network is within the target."""
    base, tables = parameter_costs()
    costs = base, {kind: table.to(next(model.parameters()).device) for kind, table in tables.items()}
    return lambda: args.param_weight * F.relu(expected_parameters(model.cell_weights(), costs) / args.param_target - 1)


def parameter_costs(cfg=TRAIN_REAL_DATA):
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


# Choosing the cell by perturbation (--select pt; DARTS-PT, Wang et al., ICLR 2021; not in the paper)

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
    after each round but the last, tune(weights) trains w with the decisions so far. -> the genotype."""
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
    for round in range(1, STEPS):
        for c, kind in enumerate(CELL_TYPES):
            node = rng.choice([n for n in range(STEPS) if n not in kept[kind]])
            edges = list(node_edges(node))
            while len(edges) > 2:
                costs = {k: ce_without(c, k) for k in edges}
                edges.remove(min(costs, key=costs.get))
            kept[kind][node] = edges
        if round < STEPS - 1:  # after the last decision there is nothing left to tune for
            tune(projected(model.cell_weights(), chosen, kept))
    inputs = [inp for _, inp, _ in search_edges()]
    return Genotype(*(tuple((PRIMITIVES[chosen[kind][k]], inputs[k]) for node in range(STEPS) for k in sorted(kept[kind][node]))
                      for kind in CELL_TYPES))


def perturbation_genotype(args, model, loaders, device, stop):
    """--select pt after the search: fixed validation batches (--pt-batches) to compare the removals
    on, and --pt-tune-steps w steps between rounds at a tenth of w's lr, with the decisions so far
    (DARTS-PT tunes the supernet between its decisions too, alpha included; here w alone). A stop
    signal ends it between rounds (the search's checkpoint is complete: --resume --select pt again)."""
    train_loader, val_loader = loaders
    val_loader.sampler.set_epoch(args.epochs)  # the validation split in an order the search never drew
    batches = [b for _, b in zip(range(args.pt_batches), val_loader)]
    train_batches = endless(train_loader, args.epochs)
    w_params = list(model.net.parameters())
    optimizer = torch.optim.SGD(w_params, w_learning_rate(args) / 10, momentum=args.momentum, weight_decay=args.weight_decay)

    def tune(weights):
        if stop:
            raise Stopped(f"stopped by {stop.name} during DARTS-PT's selection; the search is complete: choose again "
                          f"with python search.py --resume --run-dir {args.run_dir} --select pt")
        for _ in range(args.pt_tune_steps):
            gradient_step(model, optimizer, w_params, next(train_batches), device, args.mask_weight, args.grad_clip,
                          weights=weights)
    tic = time.time()
    genotype = select_by_perturbation(model, batches, tune, device, args.seed)
    print(f"DARTS-PT selection: {time.time() - tic:.1f} s (324 evaluations on {len(batches)} validation batches in "
          f"17 rounds, {args.pt_tune_steps} tuning steps between them); chosen by DARTS-PT:")
    print_genotype(genotype)
    return genotype


def endless(loader, epoch):
    """The loader's batches, epoch after epoch, from `epoch` on."""
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# The genotype's files and size (its picture, Fig. 8: ops.draw_genotype), alpha's picture (alpha.png)

def network_sizes(genotype):
    """Parameters of the ADD network this genotype makes at the paper's size and at the demo's."""
    return [count_parameters(ADD(genotype, c["channels"], d2_layout(3, c["cells_per_block"]), c["stem_reductions"]))
            for c in (TRAIN_REAL_DATA, TRAIN_DEMO)]


def write_genotype(genotype, path, origin):
    """g.json and its picture, g.png."""
    save_genotype(genotype, path, origin)
    draw_genotype(genotype, os.path.splitext(path)[0] + ".png")


def describe(genotype, path):
    """The line that names the files and the sizes of the network the genotype makes."""
    paper, demo = network_sizes(genotype)
    return (f"wrote {path} and {os.path.splitext(path)[0]}.png: an ADD network of {paper / 1e6:.2f} M parameters at "
            f"the paper's size (C {TRAIN_REAL_DATA['channels']}, N {TRAIN_REAL_DATA['cells_per_block']}), {demo / 1e6:.2f} M "
            f"at the demo's (C {TRAIN_DEMO['channels']}, N {TRAIN_DEMO['cells_per_block']})")


def print_genotype(genotype):
    for name in CELL_TYPES:
        cell = getattr(genotype, name)
        print(f"  {name:6s} " + "  ".join(f"{k // 2}<-{inp}:{op}" for k, (op, inp) in enumerate(cell)))


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
            a.plot(epochs, weights[:, j], marker="o", color=[c / 255 for c in op_colour(op)], label=op,
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
    p = Parser(usage="python search.py [options]", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the paper's search (Algorithm 1, Sec. IV-B; on the built-in data: the demo's sizes)")
    g.add_argument("--epochs", type=bounded(int, 1), help="paper: 300; demo: 5")
    g.add_argument("--batch-size", type=bounded(int, 1), help="paper: 8; demo: 32")
    g.add_argument("--w-optimizer", default="sgd", choices=("sgd", "adam"), help="paper: momentum SGD")
    g.add_argument("--w-lr", type=bounded(float, 0), help="lr of w for --w-lr-batch samples, cosine schedule (paper: 0.1 for "
                   "batches of 8; default: DARTS's 0.025 for 64, see --w-lr-batch)")
    g.add_argument("--momentum", type=bounded(float, 0, 1), default=0.9, help="SGD momentum, or Adam's beta1 for w (paper: 0.9)")
    g.add_argument("--alpha-lr", type=bounded(float, 0), default=0.02, help="Adam lr of alpha (paper: 0.02)")
    g.add_argument("--alpha-milestones", type=bounded(int, 1), nargs="+", help="alpha's lr / 10 at these epochs of 300, "
                   "scaled to the epochs after the warm-up, in which alpha moves (paper: 60 150; demo: 200 280)")
    g.add_argument("--weight-decay", type=bounded(float, 0), default=5e-4, help="both optimizers (paper: 5e-4)")
    g.add_argument("--mask-weight", type=bounded(float, 0), default=1.0, help="alpha of Eq. 7 (paper: 1; 0: m unsupervised)")
    g.add_argument("--channels", type=bounded(int, 1), help="C of the first cells (DARTS: 16; demo: 8)")
    g.add_argument("--cells", type=bounded(int, 3), help="search cells, reductions at 1/3 and 2/3 (DARTS: 8; demo: 5)")
    g.add_argument("--stem-reductions", type=bounded(int, 0), help="stride-2 stem layers (3: 256 -> 32 px; demo: 2, 64 -> 16 px)")
    g = p.add_argument_group("departures from the paper (README, Departures)")
    g.add_argument("--paper", action="store_true", help="the paper's own values for every flag of this group: "
                   + " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                              for k, v in PAPER.items() if k in DEPARTURES) + " (README: what it costs)")
    g.add_argument("--w-lr-batch", type=bounded(int, 0), help="--w-lr is for this batch and scales linearly to "
                   "--batch-size (default: 64, DARTS's rate per sample; paper: 0, --w-lr as given)")
    g.add_argument("--w-lr-min", type=bounded(float, 0), default=0.01, help="end of w's cosine, a fraction of its lr "
                   "(paper: unstated; DARTS: 0.001 / 0.025 = 0.04)")
    g.add_argument("--warmup", type=bounded(float, 0, 1), help="the first fraction of the steps trains w alone, alpha still "
                   "(paper: 0; real data: 0.3, PC-DARTS's 15 of 50 epochs; demo: 0.4)")
    g.add_argument("--warmup-epochs", type=bounded(int, 0), help="the warm-up in epochs instead of --warmup")
    g.add_argument("--alpha-betas", type=bounded(float, 0, 1), nargs=2, help="Adam betas of alpha (paper: unstated, Adam's "
                   "0.9 0.999; default: DARTS's 0.5 0.999)")
    g.add_argument("--alpha-loss", default="eq7", choices=("eq7", "ce"), help="the loss that moves alpha: Eq. 7 (the "
                   "network's loss in Eq. 3) or its cross-entropy alone")
    g.add_argument("--partial-channels", type=bounded(int, 1), metavar="K", help="PC-DARTS: 1/K of each edge's channels "
                   "go through its operations, with edge normalisation (paper: 1; real data: 4; demo: 1)")
    g.add_argument("--steps-per-epoch", type=bounded(int, 0), help="at most this many steps an epoch, each epoch a fresh "
                   "random subset, never more than one pass (paper: 0, one pass; real data: 200, 60,000 steps in all)")
    g.add_argument("--param-weight", type=bounded(float, 0), help="add weight * max(0, E[parameters] / target - 1) to "
                   "alpha's loss, E at the paper's size (paper: 0, no such term; default: 0.1)")
    g.add_argument("--param-target", type=bounded(float, 1), default=5.6e6, help="the target of --param-weight (the "
                   "paper's network: 5.6 M)")
    g.add_argument("--grad-clip", type=bounded(float, 0), default=5.0, help="clip w's gradient norm (paper: unstated; "
                   "DARTS: 5; 0: off)")
    g.add_argument("--no-flips", action="store_true", help="no random horizontal flips of the batches (paper: unstated)")
    g = p.add_argument_group("running: data, device, resume, checkpoints")
    add_data_arguments(g)
    g.add_argument("--seed", type=bounded(int, 0), default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--out", help="the genotype to write (and its picture, .png; default g.json)")
    g.add_argument("--run-dir", default="runs/search", help="checkpoint, log.jsonl, alpha.png (a new one beside it "
                   "if it exists, unless --resume)")
    g.add_argument("--resume", action="store_true", help="continue from RUN_DIR/search.pt with its saved configuration "
                   "(--select, --pt-*, --out may change: a finished search then only chooses the cell again)")
    g.add_argument("--checkpoint-every", type=bounded(int, 1), default=100, help="also checkpoint every N steps inside an "
                   "epoch (a kill loses at most N steps; SIGTERM and SIGINT none)")
    g.add_argument("--log-every", type=bounded(int, 0), default=0, help="print throughput every N steps (0: per epoch only)")
    g.add_argument("--check-every", type=bounded(int, 1), default=50, help="read the device's non-finite-loss count every "
                   "N steps")
    g.add_argument("--compile", action="store_true", help="torch.compile the search network (long on the CPU)")
    g.add_argument("--deterministic", action="store_true", help="CUDA: deterministic algorithms, no cuDNN autotuning "
                   "(the CPU is deterministic anyway)")
    g = p.add_argument_group("extras")
    g.add_argument("--select", choices=("alpha", "pt"), help="how the cell is chosen: alpha, the paper's rule on "
                   "softmax(alpha) (times beta with partial channels; the default), or pt, DARTS-PT's removals")
    g.add_argument("--pt-batches", type=bounded(int, 1), help="--select pt: validation batches each removal is scored on (2)")
    g.add_argument("--pt-tune-steps", type=bounded(int, 0), help="--select pt: w steps between its 17 rounds (5)")
    g.add_argument("--random-genotype", type=bounded(int, 0), metavar="SEED", help="write a random genotype (no search) "
                   "and exit")
    g.add_argument("--no-mask-branch", action="store_true", help="search without the mask branch (Eq. 4 alone)")
    g.add_argument("--benchmark", action="store_true", help="time search steps and exit")
    g.add_argument("--profile", action="store_true", help="with --benchmark: torch.profiler's table of one step")
    args = p.parse_args(argv)
    paper = {k: PAPER[k] for k in DEPARTURES} if args.paper else {}
    args = resolve_defaults(args, dict(REAL_DATA, **paper), dict(DEMO, **paper))
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
    torch.set_flush_denormal(True)  # weights decaying to 0 (a run at chance) go subnormal: x86 steps 8x slower
    if args.random_genotype is not None:
        genotype = random_genotype(args.random_genotype)
        write_genotype(genotype, args.out, "random")
        return print(describe(genotype, args.out))
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if args.benchmark:
        return benchmark(args, device)
    state = None
    if args.resume:  # the saved configuration, but for what a resumed run may change
        path = os.path.join(args.run_dir, "search.pt")
        state = upgrade(load_checkpoint(path))
        given = {k: getattr(args, k) for k in AFTER_SEARCH if getattr(args, k) is not None}
        args = resumed_config(state, args, RUN_KEYS, path, ("epoch", "step", "means", "w_opt", "a_opt"), ADDED)
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
