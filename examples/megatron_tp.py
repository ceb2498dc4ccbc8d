"""Megatron-style tensor parallelism x data parallelism with a VR optimizer under DeepSpeed.

A small token model in the Megatron layout: a vocabulary-parallel embedding, a
column-parallel and a row-parallel linear (the transformer MLP pattern), a
replicated LayerNorm and head. Its shards carry Megatron's marks
(``tensor_model_parallel``, ``partition_dim``, ``partition_stride``) and
:class:`ParallelState` is the ``mpu`` DeepSpeed takes. ds_vrgd then counts one
GSNR sample per data-parallel rank and micro-batch (the tensor-parallel ranks
of a replica see the same data) and sums each sharded layer's statistics over
the tensor-parallel group, so rho and the LARS/LAMB trust ratios are those of
the unsharded model (tests/distributed/test_tensor_parallel.py).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 examples/megatron_tp.py \\
        --deepspeed_config ds_configs/cpu_tp2_zero1_vrlamb.json --tensor-parallel 2 --steps 20
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB, HIDDEN, FFN, TOKENS = 24, 8, 16, 5


class ParallelState:
    """The Megatron ``mpu`` interface DeepSpeed calls, for tensor-parallel size ``tp``: tensor groups are
    consecutive ranks [d*tp, (d+1)*tp), data-parallel groups the ranks with the same tensor rank."""

    def __init__(self, tp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % tp:
            raise ValueError(f"--tensor-parallel {tp} must divide the world size {world}")
        self.tp, self.dp = tp, world // tp
        for d in range(self.dp):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(d * tp, (d + 1) * tp)))
            if rank // tp == d:
                self._tensor = group
        for t in range(tp):
            group = dist.new_group([d * tp + t for d in range(self.dp)])
            if rank % tp == t:
                self._data = group

    def get_tensor_model_parallel_group(self):
        return self._tensor

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank() % self.tp

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_data_parallel_group(self):
        return self._data

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank() // self.tp


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; the input gradient is summed over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Partial outputs summed over the tensor-parallel group; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.nn.Parameter:
    """This rank's slice of ``full`` along ``dim``, marked as Megatron marks tensor-parallel shards."""
    param = torch.nn.Parameter(full.chunk(size, dim)[rank].clone())
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1
    return param


def _reduce(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _ReduceFromTensorParallel.apply(x, group)


def _full_weights(seed: int) -> dict[str, torch.Tensor]:
    """The unsharded weights; they depend only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=generator) * scale for name, shape, scale in (
        ("embedding", (VOCAB, HIDDEN), 1.0), ("up", (FFN, HIDDEN), 0.3), ("up_bias", (FFN,), 0.1),
        ("down", (HIDDEN, FFN), 0.3), ("down_bias", (HIDDEN,), 0.1), ("head", (1, HIDDEN), 0.3))}


class TokenEmbedding(torch.nn.Module):
    """ids [B, T] -> x [B, T, HIDDEN]: a vocabulary-parallel embedding (``state=None``: unsharded)."""

    def __init__(self, state: ParallelState | None = None, seed: int = 0):
        super().__init__()
        self.group = None if state is None else state.get_tensor_model_parallel_group()
        rank, size = (0, 1) if state is None else (state.get_tensor_model_parallel_rank(), state.tp)
        self.vocab_start = rank * VOCAB // size
        self.embedding = _shard(_full_weights(seed)["embedding"], 0, rank, size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.embedding.shape[0])
        return _reduce(F.embedding(local.clamp(0, self.embedding.shape[0] - 1), self.embedding)
                       * inside.unsqueeze(-1), self.group)


class TokenMLPHead(torch.nn.Module):
    """x [B, T, HIDDEN] -> [B, 1]: MLP (column- then row-parallel), LayerNorm, mean over tokens, head."""

    def __init__(self, state: ParallelState | None = None, seed: int = 0):
        super().__init__()
        full = _full_weights(seed)
        self.group = None if state is None else state.get_tensor_model_parallel_group()
        rank, size = (0, 1) if state is None else (state.get_tensor_model_parallel_rank(), state.tp)
        self.up = _shard(full["up"], 0, rank, size)  # column-parallel: output features split
        self.up_bias = _shard(full["up_bias"], 0, rank, size)
        self.down = _shard(full["down"], 1, rank, size)  # row-parallel: input features split
        self.down_bias = torch.nn.Parameter(full["down_bias"])  # replicated (added after the reduction)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.head = torch.nn.Parameter(full["head"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x if self.group is None else _CopyToTensorParallel.apply(x, self.group),
                            self.up, self.up_bias))
        x = self.norm(x + _reduce(F.linear(h, self.down), self.group) + self.down_bias)
        return F.linear(x.mean(1), self.head)


class TensorParallelTokenModel(torch.nn.Sequential):
    """ids [B, T] -> [B, 1]: :class:`TokenEmbedding` then :class:`TokenMLPHead` (the two stages of a
    pipeline). ``state=None`` builds the unsharded model (the reference); weights depend only on ``seed``."""

    def __init__(self, state: ParallelState | None = None, seed: int = 0):
        super().__init__(TokenEmbedding(state, seed), TokenMLPHead(state, seed))

    def unsharded(self, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The full parameters from every tensor rank's ``state_dict()`` (in tensor-rank order)."""
        full = {}
        for name, value in shards[0].items():
            param = self.get_parameter(name)
            sharded = getattr(param, "tensor_model_parallel", False)
            full[name] = torch.cat([s[name] for s in shards], param.partition_dim) if sharded else value
        return full


TOKEN_VALUES = torch.randn(VOCAB, generator=torch.Generator().manual_seed(12_345))
"""The task: a sequence's target is the mean of its tokens' fixed values."""


def token_batch(step: int, data_rank: int, micro: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic micro-batch of (step, data-parallel rank, micro-step): ids [size, T], targets [size, 1]."""
    generator = torch.Generator().manual_seed(10_000 * step + 100 * data_rank + micro)
    ids = torch.randint(0, VOCAB, (size, TOKENS), generator=generator)
    return ids, TOKEN_VALUES[ids].mean(1, keepdim=True)


def main() -> None:
    import deepspeed

    import ds_vrgd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--tensor-parallel", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    deepspeed.init_distributed()
    state = ParallelState(args.tensor_parallel)
    model = TensorParallelTokenModel(state)
    engine, *_ = ds_vrgd.initialize(model=model, model_parameters=model.parameters(), config=args.deepspeed_config,
                                    mpu=state)
    for step in range(args.steps):
        for micro in range(engine.gradient_accumulation_steps()):
            ids, target = token_batch(step, state.get_data_parallel_rank(), micro,
                                      engine.train_micro_batch_size_per_gpu())
            loss = F.mse_loss(engine(ids), target)
            engine.backward(loss)
            engine.step()
        stats = engine.vr_optimizer.gsnr_stats()
        if dist.get_rank() == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4), "n": stats.get("n"),
                              "gsnr_mean": stats.get("gsnr_mean")}), flush=True)
    ds_vrgd.shutdown()  # destroys the process group; also frees DeepSpeed's shared memory on CPU


if __name__ == "__main__":
    main()
