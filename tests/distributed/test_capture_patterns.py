"""GSNR samples under activation checkpointing and other autograd patterns (project issue 12).

n and Q must be exactly those of the micro-batch samples whatever autograd
does inside a backward. Every case trains a VR optimizer and is compared with
the float64 reference (tests/support/reference.py) fed the true per-micro-batch
gradients, each from a fresh backward without checkpointing: n must be the
number of micro-batches of a step and the parameters must match.

Checkpointing (torch reentrant and non-reentrant, DeepSpeed's) x model
patterns (distinct weights; one weight shared by two checkpointed blocks;
every layer inside checkpoints, so the first parameter gradient of a backward
arrives in a nested graph task and the outer task has none), in plain
PyTorch, DDP (2 ranks) and DeepSpeed ZeRO (2 ranks, gradient accumulation 2);
then unfreezing after construction, add_param_group, unused parameters, a
gradient penalty through torch.autograd.grad, and a tiny Hugging Face BERT
with reentrant gradient checkpointing.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from tests.support.ds_harness import micro_batch
from tests.support.reference import ReferenceVR
from tests.support.launching import rank_env, spawn_results

KIND, HYPER = "VRSGD", dict(lr=0.1, momentum=0.9, gamma=0.5)
STEPS = 3
PLAIN_MICRO = 4  # micro-batches per step in one process
WORLD, GAS = 2, 2  # DDP and DeepSpeed: n = 4
TOL = 1e-5  # fp32 run vs float64 reference
PATTERNS = ("distinct", "shared", "first_inside")
TORCH_CHECKPOINTING = ("reentrant", "non_reentrant")


class Net(torch.nn.Module):
    """7 -> 13 -> 13 -> 13 -> 1 with two checkpointable blocks (see module docstring for ``pattern``).

    ``checkpointing``: "reentrant", "non_reentrant", "deepspeed" or None.
    ``skip_b``: leave the second block out (its weight is unused; with "shared", the weight is used once).
    """

    def __init__(self, pattern: str, checkpointing):
        super().__init__()
        torch.manual_seed(0)
        self.pattern, self.checkpointing = pattern, checkpointing
        self.inp = torch.nn.Linear(7, 13)
        self.a = torch.nn.Linear(13, 13)
        self.b = torch.nn.Linear(13, 13) if pattern == "distinct" else self.a
        self.head = torch.nn.Linear(13, 1)

    def _segment(self, function, h):
        if self.checkpointing is None:
            return function(h)
        if self.checkpointing == "deepspeed":
            import deepspeed

            return deepspeed.checkpointing.checkpoint(function, h)
        return checkpoint(function, h, use_reentrant=self.checkpointing == "reentrant")

    def forward(self, x, skip_b: bool = False):
        if self.pattern == "first_inside":
            h = self._segment(lambda t: torch.tanh(self.a(torch.tanh(self.inp(t)))), x.detach().requires_grad_())
            return self._segment(self.head, h)
        h = self._segment(lambda t: torch.tanh(self.a(t)), torch.tanh(self.inp(x)))
        if not skip_b:
            h = self._segment(lambda t: torch.tanh(self.b(t)), h)
        return self.head(h)


def mse(model, batch) -> torch.Tensor:
    x, y = batch[:2]
    return ((model(x.to(y.dtype), *batch[2:]) - y) ** 2).mean()


def penalized(model, batch) -> torch.Tensor:
    """mse + 0.1 ||d mse / d params||^2: its gradient goes through torch.autograd.grad(create_graph=True)."""
    loss = mse(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    return loss + 0.1 * sum((g * g).sum() for g in grads)


def plain_batches(step: int) -> list:
    return [micro_batch(step, 0, micro) for micro in range(PLAIN_MICRO)]


def world_batches(step: int) -> list:
    return [micro_batch(step, rank, micro) for rank in range(WORLD) for micro in range(GAS)]


# ------------------------------------------------------------------ reference
def _sample(model, loss_fn, batch) -> list:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def reference(make_model, batches, loss_fn=mse, steps=STEPS, frozen=lambda step: ()) -> dict:
    """Final float64 parameters by name: ReferenceVR fed each micro-batch's gradient (a fresh backward
    of ``make_model()``, without checkpointing) as a sample and their mean as p.grad; parameters
    named in ``frozen(step)`` get zero samples that step (with VRSGD: not updated)."""
    model = make_model().double()
    names = [name for name, _ in model.named_parameters()]
    ref = ReferenceVR(KIND, [p.detach() for p in model.parameters()], **HYPER)
    for step in range(steps):
        with torch.no_grad():
            for param, value in zip(model.parameters(), ref.params):
                param.copy_(value)
        per_batch = [_sample(model, loss_fn, tuple(_double(t) for t in batch)) for batch in batches(step)]
        samples = [list(s) for s in zip(*per_batch)]
        for k, name in enumerate(names):
            if name in frozen(step):
                samples[k] = [torch.zeros_like(g) for g in samples[k]]
        ref.step([torch.stack(s).mean(0) for s in samples], samples)
    return dict(zip(names, ref.params))


def _double(value):
    return value.double() if torch.is_tensor(value) and value.is_floating_point() else value


def max_diff(params: dict, want: dict) -> float:
    return max((params[name].double() - value).abs().max().item() for name, value in want.items())


def check(label: str, ns: list, params: dict, want: dict, n: int) -> None:
    diff = max_diff(params, want)
    print(f"\n{label}: n per step {ns}, max |param diff| {diff:.2e}")
    assert ns == [n] * len(ns)
    assert diff < TOL


# ------------------------------------------------------------- plain PyTorch
@pytest.mark.filterwarnings("ignore:None of the inputs")  # the nested checkpoint's first, no-grad forward
def test_outermost_backward_ends_once_after_nested_checkpoints():
    """No parameter in the outer graph task, a checkpoint nested in another: three gradients of one
    weight in three nested graph tasks, then one end, at the outer backward's end."""
    from ds_vrgd.capture import OutermostBackward

    events = []
    backward = OutermostBackward(lambda: events.append("end"))
    linear = torch.nn.Linear(3, 3)

    def hook(grad):
        events.append("grad")
        backward.arm()

    linear.weight.register_hook(hook)

    def inner(t):
        return torch.tanh(linear(t))

    def outer(t):
        return checkpoint(inner, inner(t), use_reentrant=True)

    h = checkpoint(outer, torch.randn(2, 3, requires_grad=True), use_reentrant=True)
    checkpoint(inner, h, use_reentrant=True).sum().backward()
    assert events == ["grad", "grad", "grad", "end"]


def train_plain(model, optimizer, batches, loss_fn=mse, steps=STEPS, before_step=lambda step: None) -> list:
    """Gradient accumulation over the step's micro-batches; returns n of every step."""
    ns = []
    for step in range(steps):
        before_step(step)
        micro = batches(step)
        for batch in micro:
            (loss_fn(model, batch) / len(micro)).backward()
        optimizer.step()
        ns.append(optimizer.gsnr_stats()["n"])
        optimizer.zero_grad()
        model.zero_grad()
    return ns


def _vrsgd(params):
    from ds_vrgd.optim import VRSGD

    return VRSGD(params, **HYPER)


def _named(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("checkpointing", TORCH_CHECKPOINTING)
def test_plain_checkpointing(checkpointing, pattern):
    model = Net(pattern, checkpointing)
    ns = train_plain(model, _vrsgd(model.parameters()), plain_batches)
    check(f"plain {checkpointing} {pattern}", ns, _named(model), reference(lambda: Net(pattern, None), plain_batches),
          PLAIN_MICRO)


def test_plain_repeat_first_seen_after_earlier_micro_steps_raises():
    """The shared weight is used once in micro-batch 0 and twice in micro-batch 1: its second gradient
    cannot be told apart from micro-batch 0's in p.grad."""
    model = Net("shared", "reentrant")
    optimizer = _vrsgd(model.parameters())
    x, y = micro_batch(0, 0, 0)
    mse(model, (x, y, True)).backward()
    with pytest.raises(RuntimeError, match="use_reentrant=False") as error:
        mse(model, (x, y)).backward()
    print("\n" + str(error.value))
    optimizer.zero_grad()


def test_plain_unused_parameter_is_a_zero_sample():
    """Block b is skipped by the first micro-batch of every step: a zero sample, n still 4."""

    def batches(step):
        return [batch + (micro == 0,) for micro, batch in enumerate(plain_batches(step))]

    model = Net("distinct", "reentrant")
    ns = train_plain(model, _vrsgd(model.parameters()), batches)
    check("plain unused b", ns, _named(model), reference(lambda: Net("distinct", None), batches), PLAIN_MICRO)


def test_plain_unfrozen_after_construction_is_captured():
    """head is frozen when the optimizer is built and during step 0, then trained (never a zero variance)."""
    model = Net("distinct", "reentrant")
    model.head.requires_grad_(False)
    optimizer = _vrsgd(model.named_parameters())
    ns = train_plain(model, optimizer, plain_batches, before_step=lambda step: model.head.requires_grad_(step > 0))
    frozen = lambda step: ("head.weight", "head.bias") if step == 0 else ()  # noqa: E731
    check("plain unfrozen head", ns, _named(model),
          reference(lambda: Net("distinct", None), plain_batches, frozen=frozen), PLAIN_MICRO)
    assert optimizer.gsnr_stats()["layers"]["head.weight"]["gsnr_mean"] < 1e3  # a real variance, not v = 0


def test_plain_add_param_group_is_watched():
    model = Net("shared", "reentrant")
    optimizer = _vrsgd([p for name, p in model.named_parameters() if not name.startswith("head")])

    def before_step(step):
        if step == 1:
            optimizer.add_param_group({"params": list(model.head.parameters())})

    ns = train_plain(model, optimizer, plain_batches, before_step=before_step)
    frozen = lambda step: ("head.weight", "head.bias") if step == 0 else ()  # noqa: E731
    check("plain add_param_group head", ns, _named(model),
          reference(lambda: Net("shared", None), plain_batches, frozen=frozen), PLAIN_MICRO)


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant"])
def test_plain_gradient_penalty_through_autograd_grad(checkpointing):
    """torch.autograd.grad's gradients never reach p.grad: not samples (n = 4, not 8)."""
    model = Net("distinct", checkpointing)
    ns = train_plain(model, _vrsgd(model.parameters()), plain_batches, loss_fn=penalized)
    check(f"plain gradient penalty ({checkpointing} checkpointing)", ns, _named(model),
          reference(lambda: Net("distinct", None), plain_batches, loss_fn=penalized), PLAIN_MICRO)


def _bert(checkpointing: bool):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def _mlm_batches(step: int) -> list:
    batches = []
    for micro in range(PLAIN_MICRO):
        generator = torch.Generator().manual_seed(100 * step + micro)
        ids = torch.randint(0, 100, (4, 12), generator=generator)
        labels = torch.where(torch.rand(4, 12, generator=generator) < 0.3, ids, -100)
        batches.append((ids, labels))
    return batches


def _mlm_loss(model, batch):
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def test_hf_bert_reentrant_gradient_checkpointing():
    model = _bert(checkpointing=True)
    assert model.is_gradient_checkpointing
    ns = train_plain(model, _vrsgd(model.parameters()), _mlm_batches, loss_fn=_mlm_loss)
    check("plain HF BertForMaskedLM reentrant", ns, _named(model),
          reference(lambda: _bert(checkpointing=False), _mlm_batches, loss_fn=_mlm_loss), PLAIN_MICRO)


# ------------------------------------------------------------------------ DDP
def _ddp_case(checkpointing: str, pattern: str) -> dict:
    """A weight shared under reentrant checkpointing needs DDP's static_graph, which fails with no_sync
    (a torch INTERNAL ASSERT in the reducer): that case takes one micro-batch per rank and step."""
    static = (checkpointing, pattern) == ("reentrant", "shared")
    return dict(checkpointing=checkpointing, pattern=pattern, static_graph=static, gas=1 if static else GAS)


DDP_CASES = [_ddp_case(c, p) for c in TORCH_CHECKPOINTING for p in PATTERNS]


def _ddp_worker(rank, port, out_dir):
    rank_env(rank, WORLD, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ds_vrgd import ddp

    results = []
    for case in DDP_CASES:
        model = DDP(Net(case["pattern"], case["checkpointing"]), static_graph=case["static_graph"])
        optimizer = _vrsgd(model.parameters())
        ddp.enable_gsnr(model, optimizer)
        ns, gas = [], case["gas"]
        for step in range(STEPS):
            for micro in range(gas):
                with model.no_sync() if micro < gas - 1 else torch.enable_grad():
                    (mse(model, micro_batch(step, rank, micro)) / gas).backward()
            optimizer.step()
            ns.append(optimizer.gsnr_stats()["n"])
            optimizer.zero_grad()
        results.append({"n": ns, "params": _named(model.module)})
    results.append(_ddp_unfrozen_later(rank))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


def _ddp_unfrozen_later(rank) -> str:
    """DDP does not average a parameter frozen when it was built: its first gradient raises."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ds_vrgd import ddp

    module = Net("distinct", None)
    module.head.requires_grad_(False)
    model = DDP(module)
    ddp.enable_gsnr(model, _vrsgd(model.parameters()))
    module.head.requires_grad_(True)
    try:
        mse(model, micro_batch(0, rank, 0)).backward()  # head's gradient is the first: no collective started
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.fixture(scope="module")
def ddp_results():
    return spawn_results(_ddp_worker, WORLD, lambda port, out_dir: (port, out_dir))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(DDP_CASES)),
                         ids=[f"{c['checkpointing']}-{c['pattern']}-gas{c['gas']}" for c in DDP_CASES])
def test_ddp_checkpointing(ddp_results, index):
    case, got = DDP_CASES[index], ddp_results[index]

    def batches(step):
        return [micro_batch(step, rank, micro) for rank in range(WORLD) for micro in range(case["gas"])]

    check(f"DDP {case}", got["n"], got["params"], reference(lambda: Net(case["pattern"], None), batches),
          WORLD * case["gas"])


@pytest.mark.slow
def test_ddp_parameter_unfrozen_after_ddp_was_built_raises(ddp_results):
    print("\n" + ddp_results[-1])
    assert ddp_results[-1].startswith("head.") and "build DDP" in ddp_results[-1]


# ------------------------------------------------------------------ DeepSpeed
DS_CASES = {
    **{f"zero2-{c}-{p}": dict(checkpointing=c, pattern=p) for c in TORCH_CHECKPOINTING for p in PATTERNS
       if (c, p) != ("reentrant", "shared")},
    "zero2-deepspeed-first_inside": dict(checkpointing="deepspeed", pattern="first_inside"),
    "zero1-reentrant-shared": dict(checkpointing="reentrant", pattern="shared", stage=1),
    "zero0-reentrant-shared": dict(checkpointing="reentrant", pattern="shared", stage=0),
    "zero2-autograd-grad-outside-backward": dict(checkpointing=None, pattern="distinct", outside="grad"),
    # last: the errors leave their engines half-way through a backward
    "zero2-reentrant-shared": dict(checkpointing="reentrant", pattern="shared"),
    "zero3-reentrant-shared": dict(checkpointing="reentrant", pattern="shared", stage=3),
    "zero2-direct-loss-backward": dict(checkpointing=None, pattern="distinct", outside="backward"),
}


def _ds_config(case: dict) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": GAS,
        "optimizer": {"type": KIND, "params": HYPER},
        "zero_optimization": {"stage": case.get("stage", 2), "reduce_bucket_size": 50, "allgather_bucket_size": 50},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


def _ds_train(engine, case: dict, rank: int) -> list:
    ns = []
    for step in range(STEPS):
        for micro in range(GAS):
            batch = micro_batch(step, rank, micro)
            if case.get("outside") == "grad":  # a discarded gradient computation before the sample
                torch.autograd.grad(mse(engine.module, batch), list(engine.module.parameters()))
            loss = mse(engine, batch)
            if case.get("outside") == "backward":
                loss.backward()
            else:
                engine.backward(loss)
            engine.step()
        ns.append(engine.vr_optimizer.gsnr_stats()["n"])
    return ns


def _ds_worker(rank, port, out_dir):
    rank_env(rank, WORLD, port)
    import deepspeed

    import ds_vrgd

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for name, case in DS_CASES.items():
        model = Net(case["pattern"], case["checkpointing"])
        engine, _, _, _ = ds_vrgd.initialize(model=model, model_parameters=model.parameters(),
                                             config=_ds_config(case))
        try:
            results[name] = {"n": _ds_train(engine, case, rank), "params": _named(engine.module)}
        except RuntimeError as error:
            results[name] = {"error": str(error)}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


@pytest.fixture(scope="module")
def ds_results():
    return spawn_results(_ds_worker, WORLD, lambda port, out_dir: (port, out_dir))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, c in DS_CASES.items() if n not in (
    "zero2-reentrant-shared", "zero3-reentrant-shared", "zero2-direct-loss-backward")])
def test_deepspeed_checkpointing(ds_results, name):
    case, got = DS_CASES[name], ds_results[name]
    assert "error" not in got, got
    check(f"DeepSpeed {name}", got["n"], got["params"],
          reference(lambda: Net(case["pattern"], None), world_batches), WORLD * GAS)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_partitioned_shared_weight_under_reentrant_checkpointing_raises(ds_results, stage):
    """DeepSpeed with partitioned gradients (ZeRO-2/3) cannot reduce a gradient twice per backward; ds_vrgd says
    so first, with the fix."""
    got = ds_results[f"zero{stage}-reentrant-shared"]
    print("\n" + str(got))
    assert got["error"].startswith("a.") and "use_reentrant=False" in got["error"]


@pytest.mark.slow
def test_deepspeed_direct_loss_backward_raises(ds_results):
    error = ds_results["zero2-direct-loss-backward"]["error"]
    print("\n" + error)
    assert "engine.backward(loss)" in error
