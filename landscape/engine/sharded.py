"""The objective with the model's parameters sharded over the ranks by FSDP2 (`fully_shard`), under torchrun.

Every rank holds a piece of each parameter, of its gradient and of every solver vector; dot products and
norms are summed over the ranks (landscape.engine.inner), so no rank ever holds a whole vector. The
measurement set's batches are split round-robin over the ranks, as FSDP trains: each rank runs its own batches,
and FSDP reduce-scatters the gradients, summed, to the pieces.

Hessian-vector products are central differences of FSDP's ordinary gradients (landscape.engine.finite_difference):
in torch 2.13 FSDP2's reduce-scatter leaves the autograd graph (a `create_graph` gradient comes back with no
graph), and forward-mode AD through its DTensor parameters stops at an operator without a sharding rule, so
neither double backward nor forward-over-reverse passes through it (docs/how-to/sharded.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from landscape.engine import distributed as ranks
from landscape.engine import finite_difference as fd
from landscape.engine.hvp_check import HVPCheck
from landscape.engine.hvp_paths import FINITE_DIFFERENCE_HVP
from landscape.engine.inner import ShardedInnerProduct
from landscape.engine.memory import WORKSPACE_BYTES, MemoryPlan, available_bytes
from landscape.engine.objective import Evaluation, ObjectiveError, _prepare_model, default_device
from landscape.inputs.batches import Batch, Loss, accuracy, batch_size, class_cross_entropy, loss_name, model_arguments, to_device

SHARDED_HVP_METHODS = ("auto", FINITE_DIFFERENCE_HVP)
NO_EXACT_HVP = "no double backward through FSDP2's sharded gradients (its reduce-scatter leaves the autograd graph)"


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """`fully_shard` on every element of each nn.ModuleList (a transformer's blocks: gathered one at a time in the
    forward), then on the root (the rest, tied embeddings included). In place; returns the model."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(True for _ in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class ShardedObjective:
    """L(w) = Σ_b sum_b(w) / Σ_b count_b over `batches` (every batch, on every rank), parameters sharded by FSDP2.

    The flat vectors it takes and returns (`w`, `grad()`, rows of `hvp_batched`) are this rank's pieces: the
    concatenation of its shard of each parameter, in the order of `named_parameters`; `inner` sums their dot
    products over the ranks and maps a whole vector to this rank's piece. Every parameter with requires_grad
    is measured; BatchNorm runs in `mode` as in Objective. Run the same calls on every rank (they are collective).
    `replicas` > 1: that many data-parallel replicas, each sharded over world/replicas ranks (HSDP). `probes`:
    the solvers' random vectors drawn whole and cut to the pieces ("whole": one process's probes) or drawn piece
    by piece on each rank ("pieces": no whole vector anywhere; the same distribution, other numbers).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        *,
        loss: Loss | None = None,
        mode: str = "eval",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        hvp_method: str = "auto",
        metadata: dict | None = None,
        hvp_check: bool = True,
        replicas: int = 1,
        probes: str = "whole",
    ) -> None:
        if not ranks.active():
            raise ObjectiveError("a sharded objective needs an initialised process group: launch with torchrun")
        if hvp_method not in SHARDED_HVP_METHODS:
            raise ObjectiveError(
                f"hvp_method {hvp_method!r} with sharded parameters: use auto ({FINITE_DIFFERENCE_HVP}); {NO_EXACT_HVP}"
            )
        if dtype not in (torch.float32, torch.float64):
            raise ObjectiveError(f"a sharded objective measures in float32 or float64, not {str(dtype).replace('torch.', '')}")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule

        self.device = ranks.local_device(device if device is not None else default_device())
        self.dtype, self.mode, self.world_size, self.replicas = dtype, mode, ranks.world_size(), replicas
        if replicas < 1 or self.world_size % replicas:
            raise ObjectiveError(f"replicas={replicas} must divide the {self.world_size} ranks")
        self.loss_function: Loss = loss if loss is not None else class_cross_entropy
        self.model = _prepare_model(model, mode, self.device, dtype)
        self.has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if replicas == 1:
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            group = mesh.get_group()
        else:  # HSDP: replicated over `replicate`, sharded within each `shard` group; gradients summed over both
            shape = (replicas, self.world_size // replicas)
            mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=("replicate", "shard"))
            group = mesh["shard"].get_group()
        shard_model(self.model, mesh)
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum the ranks' gradients: each is weighted by its items already
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise ObjectiveError("the model has no parameter with requires_grad=True to measure")
        # replicas hold the same pieces; `probes`: drawn whole and cut (one process's), or each rank's pieces alone
        self.inner = ShardedInnerProduct(self._pieces(group), group=group, draws=probes)
        self.n_params = sum(p.numel() for p in self._params)
        self.w = self._local_values()
        self._set_batches(batches)
        self.hvp_method = FINITE_DIFFERENCE_HVP
        self._differences = fd.CentralDifferences(self._gradient_at, self.w, dtype, inner=self.inner)
        free = available_bytes(self.device)
        self.memory_plan = MemoryPlan(  # FSDP gathers a block's parameters at a time; its graph size is not measured
            path=f"sharded {FINITE_DIFFERENCE_HVP}",
            kept_batches=0,
            n_batches=self.n_batches,
            kept_bytes=0,
            predicted_peak_bytes=int(fd.HELD_VECTORS * self.inner.length * self.w.element_size() + WORKSPACE_BYTES),
            budget_bytes=0,
            available_bytes=int(free),
        )
        self.metadata = dict(metadata or {})
        self._check_pending = hvp_check
        self.hvp_check_result: HVPCheck | None = None
        self.hvp_error: fd.FiniteDifferenceErrors | None = None
        self.last_hvp_errors: torch.Tensor | None = None

    # ------------------------------------------------------------- layout
    def _pieces(self, group) -> list[tuple[int, int]]:
        """(start, length) in the whole flat vector of this rank's shard of each parameter (FSDP2 shards dim 0 over
        the ranks of `group`)."""
        import torch.distributed as dist

        local_rows = [p.to_local().shape[0] if p.ndim else p.to_local().numel() for p in self._params]
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local_rows, group=group)
        before = [sum(rows) for rows in zip(*gathered[: dist.get_rank(group)])] or [0] * len(local_rows)
        pieces, offset = [], 0
        for p, rows, skipped in zip(self._params, local_rows, before):
            row = p.numel() // p.shape[0] if p.ndim and p.shape[0] else 1
            pieces.append((offset + skipped * row, rows * row))
            offset += p.numel()
        return pieces

    def _local_values(self) -> torch.Tensor:
        return torch.cat([p.to_local().detach().reshape(-1) for p in self._params]).clone()

    @torch.no_grad()
    def _write(self, w: torch.Tensor) -> None:
        """This rank's piece of the point `w` into the parameter shards (FSDP gathers them in the next forward)."""
        offset = 0
        for p in self._params:
            local = p.to_local()
            local.copy_(w[offset : offset + local.numel()].view_as(local))
            offset += local.numel()

    # ------------------------------------------------------------ batches
    def _set_batches(self, batches: Sequence[Batch]) -> None:
        moved = [to_device(b, self.device, self.dtype) for b in batches]
        counts = [self._count(b) for b in moved]
        self.batches = [b for b, c in zip(moved, counts) if c > 0]
        counts = [c for c in counts if c > 0]
        if not self.batches:
            raise ObjectiveError("the measurement set is empty: give at least one batch (with at least one item the loss counts)")
        sizes = [batch_size(b) for b in self.batches]
        self.n_samples, self.n_batches, self.n_items = sum(sizes), len(self.batches), sum(counts)
        self.batch_sizes = sorted(set(sizes))
        self._mine = list(range(ranks.rank(), self.n_batches, self.world_size))
        self._rounds = math.ceil(self.n_batches / self.world_size)  # FSDP's collectives run in lockstep

    def _count(self, batch: Batch) -> int:
        count = getattr(self.loss_function, "count", None)
        if count is not None:
            return int(count(batch))
        with torch.no_grad():
            return int(self.loss_function(self._call(batch), batch)[1])

    def _call(self, batch: Batch):
        args, kwargs = model_arguments(batch)
        return self.model(*args, **kwargs)

    def _rounds_of_batches(self):
        """(batch, weight) per round: this rank's batches, then its first (weight 0) while other ranks still run."""
        spare = self.batches[self._mine[0] if self._mine else 0]
        for i in range(self._rounds):
            yield (self.batches[self._mine[i]], 1.0) if i < len(self._mine) else (spare, 0.0)

    # ------------------------------------------------------ loss and grad
    @torch.no_grad()
    def evaluate(self) -> Evaluation:
        """Loss and accuracy at the checkpoint, over every rank's batches."""
        self._write(self.w)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch, weight in self._rounds_of_batches():
            out = self._call(batch)
            total, count = self.loss_function(out, batch)
            totals[0] += weight * float(total) / self.n_items
            correct = accuracy(self.loss_function, out, batch)
            if correct is not None and weight:
                totals[1] += correct[0]
                totals[2] += correct[1]
        loss, correct, labelled = ranks.all_reduce_sum(totals).tolist()
        if not math.isfinite(loss):
            raise ObjectiveError("the loss is not finite at this point (NaN or inf): check the weights and the data")
        return Evaluation(loss, correct / labelled if labelled else None, self.n_samples)

    def loss(self) -> float:
        return self.evaluate().loss

    def grad(self) -> torch.Tensor:
        """This rank's piece of ∇L at the checkpoint."""
        return self._gradient_at(self.w)

    def _gradient_at(self, w: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ∇L(w): FSDP's forward and backward on this rank's batches, reduce-scattered (summed)."""
        self._write(w)
        for p in self._params:
            p.grad = None
        with torch.enable_grad():
            for batch, weight in self._rounds_of_batches():
                total, _ = self.loss_function(self._call(batch), batch)
                (total * (weight / self.n_items)).backward()
        return torch.cat(
            [(p.grad.to_local() if p.grad is not None else torch.zeros_like(p.to_local())).reshape(-1) for p in self._params]
        )

    # ------------------------------------------------------------------ HVPs
    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.hvp_batched(v.reshape(1, -1)).reshape(-1)

    def hvp_batched(self, V: torch.Tensor) -> torch.Tensor:
        """H vᵢ for the rows of V (k, local length), this rank's pieces, by central differences; each row's error
        estimate in `last_hvp_errors`, the largest so far in `hvp_error`."""
        V = V.to(device=self.device, dtype=self.dtype)
        if V.ndim != 2 or V.shape[1] != self.inner.length:
            raise ObjectiveError(f"probe block has shape {tuple(V.shape)}, expected (k, {self.inner.length}) (this rank's piece)")
        start = time.perf_counter()
        products, self.last_hvp_errors = self._differences.products(V)
        self.hvp_error = self._differences.errors
        self._write(self.w)
        if self._check_pending:
            self._check_pending = False
            self.hvp_check_result = HVPCheck(
                self.hvp_method, math.nan, 0.0, math.nan, time.perf_counter() - start, n_extra_hvps=0, skipped=NO_EXACT_HVP
            )
        return products

    # -------------------------------------------------------------- record
    def describe(self) -> dict:
        """What was measured and how, under the keys Objective.describe uses: recorded in every result's metadata."""
        counts = {k: getattr(self, k) for k in ("n_samples", "n_batches", "batch_sizes", "world_size", "mode")}
        items = {} if self.n_items == self.n_samples else {"n_items": self.n_items}
        loss = {} if self.loss_function is class_cross_entropy else {"loss": loss_name(self.loss_function)}
        return {
            **counts,
            **items,
            "sharded": True,
            "parameters_sharded": "fsdp2",
            **({"shard_replicas": self.replicas} if self.replicas > 1 else {}),
            "shard_probes": self.inner.draws,
            "batchnorm": self.has_batchnorm,
            "params": "all",
            **loss,
            "n_params": self.n_params,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "hvp_method": self.hvp_method,
            **self.metadata,
        }
