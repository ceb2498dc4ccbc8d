"""The VR step time on CUDA next to torch.optim.AdamW(fused=True) and DeepSpeed's FusedLamb: a table, no bar.

BERT-base's parameter set (BertForMaskedLM, vocab 30,522: ~110M fp32 elements in ~200 tensors) on the GPU.
Each contender gets the same n gradient samples per step through real autograd (n calls of
``torch.autograd.backward(params, g_i)`` on the leaves, so the VR optimizers' hooks capture them), then
``optimizer.step()`` alone is timed with CUDA events: untimed warm-up steps, then the median of several.
The tests assert only that every contender ran and left finite parameters: speed targets belong to
benchmarks (benchmarks/optimizer_step.py is the CPU one), not to tests. The table is printed (pytest -s or
-rP) and appended to the file named by ``VRGD_GPU_REPORT`` (launch/gpu_check.sh prints it). FusedLamb is
built by DeepSpeed's op builder (JIT, needs nvcc); where it cannot be built its test is skipped with the error.
"""

import os
import statistics

import pytest
import torch

from tests.gpu.cuda import MARKS, one_rank, rank_env

pytestmark = MARKS

PRESET, VOCAB = "base", 30522
SAMPLES, WARMUP, REPEATS = 4, 3, 10
ADAMW = dict(lr=1e-4, weight_decay=0.01)
LAMB = dict(lr=1e-3, weight_decay=0.01)
# label -> (family, factory); a factory gets the parameter list
CONTENDERS = {
    "torch.optim.AdamW(fused=True)": ("AdamW", lambda ps: torch.optim.AdamW(ps, fused=True, **ADAMW)),
    "VRAdamW(vr=False)": ("AdamW", lambda ps: _vr("VRAdamW", ps, vr=False, **ADAMW)),
    "VRAdamW": ("AdamW", lambda ps: _vr("VRAdamW", ps, **ADAMW)),
    "deepspeed FusedLamb": ("LAMB", lambda ps: _fused_lamb(ps)),
    "VRLAMB(vr=False)": ("LAMB", lambda ps: _vr("VRLAMB", ps, vr=False, **LAMB)),
    "VRLAMB": ("LAMB", lambda ps: _vr("VRLAMB", ps, **LAMB)),
}
BASELINE = {"AdamW": "torch.optim.AdamW(fused=True)", "LAMB": "deepspeed FusedLamb"}


def _vr(name: str, params, **options):
    from ds_vrgd.optim import VR_OPTIMIZERS

    return VR_OPTIMIZERS[name](params, **options)


def _fused_lamb(params):
    from deepspeed.ops.lamb import FusedLamb  # builds (or loads) DeepSpeed's fused_lamb CUDA op

    return FusedLamb(params, **LAMB)


def bert_shapes(preset: str = PRESET) -> list[tuple[int, ...]]:
    """Parameter shapes of BertForMaskedLM(preset) (tied decoder: one tensor), built on the meta device."""
    from transformers import BertForMaskedLM

    from ds_vrgd.pretrain.models import bert_config

    with torch.device("meta"):
        model = BertForMaskedLM(bert_config(preset, VOCAB))
    return [tuple(p.shape) for p in model.parameters()]


# ------------------------------------------------------------------ the spawned rank


def _time_one(factory, init: list, a: list, b: list, coefficients: list[float]) -> dict:
    """Median step and capture (n backward calls) times in ms of one contender on fresh parameters."""
    params = [x.clone().requires_grad_() for x in init]
    optimizer = factory(params)
    steps, captures = [], []
    for repeat in range(WARMUP + REPEATS):
        optimizer.zero_grad(set_to_none=True)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        for c in coefficients:  # sample i: g_i = A + c_i B
            torch.autograd.backward(params, [x.add(y, alpha=c) for x, y in zip(a, b)])
        events[1].record()
        optimizer.step()
        events[2].record()
        torch.cuda.synchronize()
        if repeat >= WARMUP:
            captures.append(events[0].elapsed_time(events[1]))
            steps.append(events[1].elapsed_time(events[2]))
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    changed = any(not torch.equal(p, x) for p, x in zip(params, init))
    return {"step_ms": statistics.median(steps), "capture_ms": statistics.median(captures),
            "finite": finite, "changed": changed}


def _worker(rank: int, port: int, out_dir: str) -> None:
    rank_env(port, "cuda")  # DeepSpeed's op builder must see the CUDA accelerator
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(shape, scale):
        return torch.randn(shape, device="cuda", generator=generator) * scale

    shapes = bert_shapes()
    init = [randn(s, 0.02) for s in shapes]
    a, b = [randn(s, 1e-3) for s in shapes], [randn(s, 1e-3) for s in shapes]
    coefficients = [0.5 + i / SAMPLES for i in range(SAMPLES)]
    results = {"numel": sum(x.numel() for x in init), "tensors": len(init), "device": torch.cuda.get_device_name()}
    for label, (_, factory) in CONTENDERS.items():
        try:
            results[label] = _time_one(factory, init, a, b, coefficients)
        except Exception as error:  # reported by the tests (FusedLamb: skipped)
            results[label] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        torch.cuda.empty_cache()
    torch.save(results, os.path.join(out_dir, "results.pt"))


def table(results: dict) -> str:
    """The step times as a markdown table: median step, its ratio to the family's fused baseline, capture."""
    lines = [f"VR step time on {results['device']}: BERT-{PRESET} parameter set ({results['numel']:,} fp32 elements, "
             f"{results['tensors']} tensors), n = {SAMPLES} samples per step, "
             f"median of {REPEATS} after {WARMUP} warm-up",
             "", "| optimizer | step (ms) | x fused baseline | n backward calls (ms) |", "|---|---|---|---|"]
    for label, (family, _) in CONTENDERS.items():
        got, base = results[label], results[BASELINE[family]]
        if "error" in got:
            lines.append(f"| {label} | failed: {got['error'].splitlines()[0][:120]} | | |")
            continue
        ratio = f"{got['step_ms'] / base['step_ms']:.2f}" if "error" not in base else "n/a"
        lines.append(f"| {label} | {got['step_ms']:.3f} | {ratio} | {got['capture_ms']:.3f} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def step_times():
    results = one_rank(_worker, lambda port, out_dir: (port, out_dir))
    report = table(results)
    print("\n" + report)
    if os.environ.get("VRGD_GPU_REPORT"):
        with open(os.environ["VRGD_GPU_REPORT"], "a") as f:
            f.write(report + "\n")
    return results


def _ran(results: dict, label: str) -> None:
    got = results[label]
    assert "error" not in got, f"{label}: {got.get('error')}"
    assert got["finite"] and got["changed"], f"{label}: parameters {'not finite' if not got['finite'] else 'unchanged'}"


@pytest.mark.parametrize("label", [label for label, (family, _) in CONTENDERS.items() if family == "AdamW"])
def test_adamw_family_runs(step_times, label):
    _ran(step_times, label)


@pytest.mark.parametrize("label", [label for label, (family, _) in CONTENDERS.items() if family == "LAMB"])
def test_lamb_family_runs(step_times, label):
    fused = step_times[BASELINE["LAMB"]]
    if label == BASELINE["LAMB"] and "error" in fused:
        pytest.skip(f"DeepSpeed's FusedLamb could not be built or run here: {fused['error']}")
    _ran(step_times, label)
