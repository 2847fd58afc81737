"""Data-parallel ``fit`` across the processes of a ``torch.distributed`` group.

When ``fit`` runs in an initialised process group of two or more processes (a
script launched with ``torchrun``), each process passes its own rows and
:class:`DataParallel` keeps the processes in step:

- one seed (rank 0's) for everything that must agree: the model's construction
  and the Russian-roulette length of the log-det series; a per-rank generator
  for the split, the shuffling, the probes and the dequantisation noise;
- the flow (standardisation, ActNorm initialisation) is built on every rank from
  the same rows, a bounded subsample gathered from all ranks, then rank 0's
  weights and buffers are broadcast;
- every rank runs the same number of steps per epoch (the largest shard sets
  it; smaller shards are cycled) and the gradients are averaged every step
  between back-propagation and clipping;
- training and validation losses are summed over ranks (weighted), so early
  stopping and the kept epoch agree; rank 0's final model is broadcast.

No DistributedDataParallel wrapper: the flow is called through ``log_prob``
(not ``forward``), its log-det takes gradients inside the forward pass, and its
power-iteration buffers must not be overwritten by DDP's buffer broadcast; an
explicit average of the finished ``.grad`` tensors is exact whatever formed them.
"""

import os

import numpy as np
import torch
import torch.distributed as dist
from sklearn.utils import check_random_state

# Rows gathered from all ranks (in total) to build the flow: its standardisation
# and ActNorm statistics need a few thousand rows, not the whole data set.
SUBSAMPLE_ROWS = 8192


class DataParallel:
    """The process group of one ``fit``; :meth:`current` gives None outside one."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        self.local_generator, self.rows, self.rows_per_epoch = None, None, None

    @classmethod
    def current(cls):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls()
        return None

    # ----------------------------------------------------------------- set-up
    def setup(self, device, random_state):
        """``(device_, shared generator)``; ``"auto"`` picks ``cuda:LOCAL_RANK``."""
        from ._base import resolve_device  # _base imports this module

        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        device = resolve_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
        seed = torch.tensor([seed], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(seed, src=0)  # random_state=None differs between ranks
        return device, torch.Generator().manual_seed(int(seed.item()))

    @property
    def comm_device(self):
        """Where collectives run: NCCL needs this process's GPU, gloo the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def start(self, shared, device):
        """Per fit: use ``device``; a per-rank generator seeded from the shared one."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
        seed = int(torch.randint(2**31 - 1, (), generator=shared))
        self.local_generator = torch.Generator().manual_seed(
            seed * self.world_size + self.rank
        )

    def gather_rows(self, X, w):
        """The same bounded subsample of all ranks' rows, on every rank."""
        cap = -(-SUBSAMPLE_ROWS // self.world_size)
        idx = torch.randperm(X.shape[0], generator=self.local_generator)[:cap]
        parts = [None] * self.world_size
        dist.all_gather_object(parts, (X[idx], w[idx]))
        self.rows = tuple(torch.cat([p[i] for p in parts]) for i in (0, 1))
        return self.rows

    def broadcast_module(self, module):
        """Overwrite every parameter and buffer with rank 0's."""
        with torch.no_grad():
            for t in module.state_dict().values():
                buf = t.detach().to(self.comm_device).contiguous()
                dist.broadcast(buf, src=0)
                t.copy_(buf)
        return module

    # ----------------------------------------------------------------- epochs
    def epoch_plan(self, n_train, batch_size):
        """``(rows, batch, steps)`` per rank and epoch; ``batch_size`` is global."""
        sizes = self.gather([n_train])[:, 0]
        if sizes.min() < 1:
            raise ValueError(
                f"every process needs training rows; got {sizes.int().tolist()} "
                "training rows per rank."
            )
        self.rows_per_epoch = int(sizes.max())
        batch = min(-(-batch_size // self.world_size), self.rows_per_epoch)
        return self.rows_per_epoch, batch, -(-self.rows_per_epoch // batch)

    def epoch_order(self, n_rows):
        """This rank's row order: a shuffle, cycled up to ``rows_per_epoch``."""
        reps = -(-self.rows_per_epoch // n_rows)
        perms = [
            torch.randperm(n_rows, generator=self.local_generator) for _ in range(reps)
        ]
        return torch.cat(perms)[: self.rows_per_epoch]

    def generators(self, shared):
        """The ``(shared, local)`` pair the flow draws from (see core.logdet)."""
        return shared, self.local_generator

    # ------------------------------------------------------------ collectives
    def gather(self, values):
        """``(world_size, k)`` float64 array of every rank's ``values``."""
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return torch.stack(out).cpu()

    def sum(self, values):
        """Sum over ranks, in rank order, so every rank gets the same bits."""
        return [float(v) for v in self.gather(values).sum(0)]

    def union(self, values):
        """Sorted unique values (any dtype numpy can sort) over all ranks."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, np.asarray(values))
        return np.unique(np.concatenate(parts))

    def any(self, flag):
        return bool(self.gather([float(bool(flag))]).max())

    def sync_gradients(self, params, finite, weight):
        """Replace each gradient by the ``weight``-weighted mean over ranks.

        Returns whether every rank's loss was finite (else nothing is changed
        that matters: the step is skipped everywhere).
        """
        ok = finite and np.isfinite(weight) and weight > 0
        weight = float(weight) if ok else 0.0
        grads = [
            torch.zeros_like(p) if p.grad is None or not ok else p.grad * weight
            for p in params
        ]
        flags = torch.tensor([weight, float(not ok)], dtype=grads[0].dtype)
        flat = torch.cat([g.flatten() for g in grads] + [flags.to(grads[0].device)])
        flat = flat.to(self.comm_device)
        dist.all_reduce(flat)
        total, bad = float(flat[-2]), float(flat[-1])
        if bad or not total > 0:
            return False
        flat = (flat[:-2] / total).to(params[0].device)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        return True
