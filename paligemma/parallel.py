"""Data-parallel training with PyTorch's own engine, set up once from torchrun's environment.

    torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] -m paligemma train ...

One process per device (WORLD_SIZE of them; RANK, LOCAL_RANK from torchrun), the backend nccl on CUDA and gloo on the
CPU. Each process trains on its share of every global batch. The model runs inside a `Runner` (its forward is
`fn(model, *args)`: the loss, or an evaluation), which is what the engine wraps:
- DDP (DistributedDataParallel) where part of the model trains (LoRA, frozen towers): every process holds the whole
  model; the gradients are averaged during the backward pass;
- FSDP2 (`fully_shard`, each decoder and vision layer, then the root) where all of it trains: each process holds
  1 / N of the weights, gradients and optimizer moments, and gathers a layer's weights only while it runs.
Only the main process (rank 0) logs, shows progress and writes checkpoints; the state it writes is gathered from all.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


class Runner(nn.Module):
    """forward(fn, *args) = fn(model, *args): every use of the model in training (the loss, an evaluation) is one
    forward of this module, so DDP sees the forward it hooks and FSDP gathers the root's weights around it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_environment(cls, device: str = "cpu") -> "Parallel":
        """One process: Parallel(device). Under torchrun (WORLD_SIZE > 1): joins the process group, on CUDA the
        device of this process's LOCAL_RANK."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        wanted = torch.device(device)
        if world == 1:
            return cls(device=wanted)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if wanted.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                                 "give --nproc-per-node at most that many")
            wanted = torch.device("cuda", local_rank)
            torch.cuda.set_device(wanted)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo",
                                    device_id=wanted if wanted.type == "cuda" else None)
        return cls(rank, world, local_rank, wanted)

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (as is in one)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    @property
    def collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def share(self, rows: list) -> list:
        """This process's contiguous share of a global batch's rows (len(rows) divisible by world)."""
        per = len(rows) // self.world
        return rows[self.rank * per : (self.rank + 1) * per]

    def wrap(self, model: nn.Module, shard: bool) -> nn.Module:
        """The Runner around `model`; under torchrun, sharded with FSDP2 (`shard`) or replicated with DDP."""
        runner = Runner(model)
        if not self.distributed:
            return runner
        if shard:
            return fully_sharded(runner, self.device.type, self.world)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(runner, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       forward_sync_buffers=False)


def fully_sharded(runner: Runner, device_type: str, world: int) -> Runner:
    """FSDP2 over `world` processes: each decoder and vision layer a unit of its own (its weights gathered while it
    runs), then the Runner (the embeddings, norms and projector: the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    model = runner.model
    for layers in (model.vision_tower.vision_model.encoder.layers, model.language_model.model.layers):
        for layer in layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(runner, mesh=mesh)
    return runner


def unwrap(runner: nn.Module) -> nn.Module:
    """The model inside a Runner, DDP around it or not."""
    return getattr(runner, "module", runner).model


def is_sharded(runner: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(runner, FSDPModule)


@contextlib.contextmanager
def gradient_sync(runner: nn.Module, enabled: bool):
    """Gradients averaged over the processes in this micro-step's backward (the last of a step), or held locally
    (the ones before it: accumulation without communication)."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(runner, DistributedDataParallel):
        with runner.no_sync():
            yield
    elif is_sharded(runner):
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)
    else:
        yield


def full_model_state(runner: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU, in the model's own names: under FSDP gathered from every process
    (call it on all; the main one gets the tensors, the others an empty dict)."""
    if is_sharded(runner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(runner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in state.items()}
    return {k: v.detach().cpu() for k, v in unwrap(runner).state_dict().items()}


def full_optimizer_state(runner: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> list[dict]:
    """Per optimizer parameter (in `names`' order: the model's names of the optimizer's parameters), its state
    tensors and scalars on the CPU; under FSDP gathered (call it on every process; the others get [])."""
    if is_sharded(runner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(runner, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not full:
            return []
        return [full["state"].get("model." + name, {}) for name in names]
    return [optimizer.state.get(p, {}) for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(runner: nn.Module, optimizer: torch.optim.Optimizer, names: list[str], states: list[dict]):
    """Fills the optimizer's state from `states` (as full_optimizer_state gives them), sharded under FSDP."""
    if is_sharded(runner):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        optimizer.zero_grad(set_to_none=True)  # so that the API makes the (sharded) state it fills: a zero step
        template = get_optimizer_state_dict(runner, optimizer, options=options)
        template["state"] = {"model." + name: state for name, state in zip(names, states) if state}
        set_optimizer_state_dict(runner, optimizer, template, options=options)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param, state in zip(params, states):
        if state:
            optimizer.state[param] = {k: v.to(param.device) if torch.is_tensor(v) and v.dim() else v
                                      for k, v in state.items()}
