"""Cost of one optimizer step alone on a BERT parameter set (fp32, CPU).

    python benchmarks/optimizer_step.py --preset base --repeats 9
    python benchmarks/optimizer_step.py --preset mini --repeats 5      # quick

Parameter set: the parameter shapes of ``transformers.BertForMaskedLM`` with
vocab 30,522 (base: 12 x 768, ~110M fp32), read from a model built on the
``meta`` device (no memory), then allocated once as plain fp32 leaf tensors.
The decoder weight is tied to the word embeddings, so it is one tensor.

Two comparisons, each contender interleaved in this one process (ABAB...,
the order flipping every repeat, untimed warm-up steps first):

1. Base rules vs peers, gradient set directly (``p.grad = G``):
   ``VRAdamW(vr=False)`` vs ``torch.optim.AdamW(foreach=True)``,
   ``VRLAMB(vr=False)`` vs ``pytorch_optimizer.Lamb``,
   ``VRLARS(vr=False)`` vs ``pytorch_optimizer.LARS``.
2. VR step vs base step, same rule. Method: each step gets ``--samples`` n
   gradient samples g_i = A + c_i B (fixed random A, B; c_i fixed) delivered
   by real autograd, ``torch.autograd.backward(params, g_i)`` on the leaf
   parameters, n times. That runs exactly the code a training loop runs on
   the parameters (the VR optimizer's tensor hook squares g_i into its Q
   buffer; the post-accumulate hook records ||p.grad||; autograd accumulates
   p.grad = sum g_i), without a model's forward/backward. The base optimizer
   sees the same n backward calls on its own copy of the parameters (no
   hooks). We time separately (a) the n backward calls ("capture": for VR it
   includes the hooks' squaring) and (b) ``optimizer.step()``, the part the
   VR factor adds to. GSNR values do not change the cost (no data-dependent
   branches in the element-wise passes).

Besides the timings the script states the analytic traffic: the bytes per
element each step moves to and from main memory ("cold" bytes; on CPU the
optimizer works block by block on cache-sized tiles, so the other passes of a
block hit the cache) for the base rules and for the VR part, and the expected
VR/base ratio if the step were bound by that traffic alone (a lower bound:
the cache-hot passes are not free). A torch.profiler breakdown of one VRLAMB
step and one base LAMB step (self CPU time per aten op) goes into the JSON.

Writes benchmarks/results/optimizer_step[_<preset>].json (base preset:
optimizer_step.json).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import fmt_q, machine, paired_ratio, quantiles, table, write_json  # noqa: E402

from ds_vrgd.optim import VRAdamW, VRLAMB, VRLARS, VRSGD  # noqa: E402

VOCAB = 30522

# ---------------------------------------------------------------------------------------------
# Analytic main-memory traffic per fp32 element (reads + writes of tensors that are not in cache).
# From ds_vrgd/optim/_base.py (phases), ds_vrgd/gsnr.py and the rules in ds_vrgd/optim/.
VR_COLD_BYTES = [
    ("phase 1 reads G (the base reads it again in phase 2)", 4),
    ("phase 1 reads Q (sum of squared samples) and writes the GSNR ratio over it; phase 2 reads it", 12),
    ("||p.grad|| for the rescale c (plain PyTorch and DDP sources; not DeepSpeed)", 4),
]
VR_HOT_PASSES = [
    "u = G*G", "sum u (||G||^2)", "Q -= z*u", "Q = max(Q, 0)", "sum Q (variance)", "Q += n*eps", "Q = u/Q",
    "sum Q (layer mean of r)", "Q *= z/mean_r", "clamp(Q, 1-gamma, 1+gamma)",
    "count Q <= low, Q >= high (on a 2^16-element sample per tile)", "update *= rho (or denominator /= rho)",
]
BASE_COLD_BYTES = {
    "SGD": [("G", 4), ("momentum buffer r/w", 8), ("W r/w", 8)],
    "AdamW": [("G", 4), ("m r/w", 8), ("v r/w", 8), ("W r/w", 8)],
    "LARS": [("G", 4), ("W (decay, norm)", 4), ("update w, then r in phase 3", 8), ("momentum r/w", 8), ("W r/w", 8)],
    "LAMB": [("G", 4), ("m r/w", 8), ("v r/w", 8), ("W (decay, norm)", 4), ("update w, then r in phase 3", 8),
             ("W r/w", 8)],
}
# Per backward (sample) the VR hook adds Q = g*g (first) or Q += g*g (later), and ||p.grad|| after accumulation.
CAPTURE_BYTES_PER_SAMPLE = {"first": 12, "later": 16}


def bert_shapes(preset: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of BertForMaskedLM(preset), built on the meta device."""
    from transformers import BertForMaskedLM

    from ds_vrgd.pretrain.models import bert_config

    with torch.device("meta"):
        model = BertForMaskedLM(bert_config(preset, VOCAB))
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def make_params(shapes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.02).requires_grad_() for _, s in shapes]


def randn_like_list(params, seed: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * scale for p in params]


# ------------------------------------------------------------------------------------ contenders
def peer_pairs(lr_scale: float = 1.0):
    """(label, ours factory, peer factory) for the base-vs-peer comparison (same hyper-parameters)."""
    import pytorch_optimizer as po

    return [
        ("AdamW", lambda ps: VRAdamW(ps, lr=1e-4, weight_decay=0.01, vr=False),
         "torch.optim.AdamW (CPU default)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01)),
        ("AdamW", lambda ps: VRAdamW(ps, lr=1e-4, weight_decay=0.01, vr=False),
         "torch.optim.AdamW(foreach=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, foreach=True)),
        ("LAMB", lambda ps: VRLAMB(ps, lr=1e-3, weight_decay=0.01, vr=False),
         "pytorch_optimizer.Lamb", lambda ps: po.Lamb(ps, lr=1e-3, weight_decay=0.01)),
        ("LARS", lambda ps: VRLARS(ps, lr=0.1, weight_decay=1e-4, momentum=0.9, vr=False),
         "pytorch_optimizer.LARS", lambda ps: po.LARS(ps, lr=0.1, weight_decay=1e-4, momentum=0.9)),
    ]


VR_RULES = {
    "SGD": lambda ps, vr: VRSGD(ps, lr=0.1, momentum=0.9, vr=vr),
    "AdamW": lambda ps, vr: VRAdamW(ps, lr=1e-4, weight_decay=0.01, vr=vr),
    "LARS": lambda ps, vr: VRLARS(ps, lr=0.1, weight_decay=1e-4, momentum=0.9, vr=vr),
    "LAMB": lambda ps, vr: VRLAMB(ps, lr=1e-3, weight_decay=0.01, vr=vr),
}


def timed_step(opt) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def bench_peers(params, grad, repeats: int, warmup: int) -> list[dict]:
    """Base rule vs peer, p.grad = grad (shared, not modified by any of the steps)."""
    for p, g in zip(params, grad):
        p.grad = g
    out = []
    for label, ours_f, peer_name, peer_f in peer_pairs():
        ours, peer = ours_f(params), peer_f(params)
        for _ in range(warmup):
            timed_step(ours), timed_step(peer)
        t_ours, t_peer = [], []
        for r in range(repeats):
            order = [(ours, t_ours), (peer, t_peer)]
            for opt, sink in order if r % 2 == 0 else order[::-1]:
                sink.append(timed_step(opt))
        row = {"rule": label, "peer": peer_name, "ours_s": quantiles(t_ours), "peer_s": quantiles(t_peer),
               "ours_over_peer": paired_ratio(t_peer, t_ours), "raw_ours": t_ours, "raw_peer": t_peer}
        print(f"  {label:6s} ours {fmt_q(row['ours_s'], 1e3, 1)} ms | {peer_name} {fmt_q(row['peer_s'], 1e3, 1)} ms"
              f" | ours/peer {fmt_q(row['ours_over_peer'])}", flush=True)
        out.append(row)
        del ours, peer
        gc.collect()
    for p in params:
        p.grad = None
    return out


def deliver_samples(params, a, b, coefficients) -> float:
    """n backward calls on the leaves with g_i = a + c_i b; returns the time of the backward calls only."""
    for p in params:
        p.grad = None
    total = 0.0
    for c in coefficients:
        sample = torch._foreach_add(a, b, alpha=c)
        t0 = time.perf_counter()
        torch.autograd.backward(params, sample)
        total += time.perf_counter() - t0
        del sample
    return total


def bench_vr(base_params, vr_params, a, b, n: int, repeats: int, warmup: int, rules: list[str]) -> list[dict]:
    coefficients = [(-1.0) ** i * (0.5 + i / (2 * n)) for i in range(n)]
    out = []
    for rule in rules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base, vr = VR_RULES[rule](base_params, False), VR_RULES[rule](vr_params, True)
        contenders = {"base": (base, base_params), "vr": (vr, vr_params)}
        times = {k: {"capture": [], "step": []} for k in contenders}
        for r in range(warmup + repeats):
            keys = ["base", "vr"] if r % 2 == 0 else ["vr", "base"]
            for key in keys:
                opt, ps = contenders[key]
                capture = deliver_samples(ps, a, b, coefficients)
                step = timed_step(opt)
                if r >= warmup:
                    times[key]["capture"].append(capture)
                    times[key]["step"].append(step)
        stats = vr.gsnr_stats()
        assert stats["n"] == n, stats
        row = {
            "rule": rule,
            "n": n,
            "base_step_s": quantiles(times["base"]["step"]),
            "vr_step_s": quantiles(times["vr"]["step"]),
            "vr_over_base_step": paired_ratio(times["base"]["step"], times["vr"]["step"]),
            "vr_extra_step_s": quantiles([v - b_ for b_, v in zip(times["base"]["step"], times["vr"]["step"])]),
            "base_capture_s": quantiles(times["base"]["capture"]),
            "vr_capture_s": quantiles(times["vr"]["capture"]),
            "vr_over_base_capture": paired_ratio(times["base"]["capture"], times["vr"]["capture"]),
            "gsnr_frac_low": stats["frac_low"],
            "gsnr_frac_high": stats["frac_high"],
            "raw": times,
        }
        print(f"  {rule:6s} base step {fmt_q(row['base_step_s'], 1e3, 1)} ms | "
              f"VR step {fmt_q(row['vr_step_s'], 1e3, 1)} ms | VR/base {fmt_q(row['vr_over_base_step'])} | "
              f"capture of {n} samples VR/base {fmt_q(row['vr_over_base_capture'])}", flush=True)
        out.append(row)
        vr._moments.close()  # remove the hooks before the next rule builds its own on the same tensors
        del base, vr, contenders
        gc.collect()
    return out


def bench_bandwidth(xs, repeats: int) -> dict:
    """Element-wise bandwidth: x *= 2 then x *= 0.5 (exact) over the parameter set, 8 bytes per element per pass.

    (Not x *= 1: that is short-circuited and measures nothing.)
    """
    times = []
    for i in range(2 * repeats + 1):
        t0 = time.perf_counter()
        torch._foreach_mul_(xs, 2.0 if i % 2 == 0 else 0.5)
        times.append(time.perf_counter() - t0)
    numel = sum(x.numel() for x in xs)
    q = quantiles(times[1:])
    return {"pass_s": q, "GB_per_s": 8 * numel / q["median"] / 1e9}


def profile_step(base_params, vr_params, a, b, n: int, rule: str = "LAMB", top: int = 18) -> dict:
    """Self CPU time per aten op of one base and one VR step (after one warm-up step each)."""
    from torch.profiler import ProfilerActivity, profile

    coefficients = [(-1.0) ** i * (0.5 + i / (2 * n)) for i in range(n)]
    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = {"base": (VR_RULES[rule](base_params, False), base_params),
                "vr": (VR_RULES[rule](vr_params, True), vr_params)}
    for key, (opt, ps) in opts.items():
        deliver_samples(ps, a, b, coefficients)
        opt.step()
        deliver_samples(ps, a, b, coefficients)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        agg = defaultdict(lambda: [0.0, 0])
        for e in prof.key_averages():
            agg[e.key][0] += e.self_cpu_time_total / 1e6
            agg[e.key][1] += e.count
        total = sum(v[0] for v in agg.values())
        ops = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
        result[key] = {"total_self_s": total, "ops": [{"op": k, "self_s": v[0], "calls": v[1]} for k, v in ops]}
    opts["vr"][0]._moments.close()
    return result


def analytic_ratios(vr_rows: list[dict]) -> dict:
    """Per rule: cold bytes per element of the base step and of the VR part, and the traffic-bound ratio."""
    vr_bytes = sum(b for _, b in VR_COLD_BYTES)
    out = {}
    for row in vr_rows:
        base_bytes = sum(b for _, b in BASE_COLD_BYTES[row["rule"]])
        out[row["rule"]] = {"base_cold_bytes": base_bytes, "vr_extra_cold_bytes": vr_bytes,
                            "vr_extra_hot_passes": len(VR_HOT_PASSES),
                            "traffic_bound_ratio": (base_bytes + vr_bytes) / base_bytes}
    return out


def print_tables(args, numel: int, peers: list[dict], vr_rows: list[dict], analytic: dict, prof) -> None:
    rows = [[r["rule"], r["peer"], fmt_q(r["ours_s"], 1e3, 1), fmt_q(r["peer_s"], 1e3, 1), fmt_q(r["ours_over_peer"])]
            for r in peers]
    print()
    print(table(["rule", "peer", "ours ms", "peer ms", "ours/peer (paired)"], rows,
                f"Base step vs peers, BERT-{args.preset} ({numel / 1e6:.1f}M), median [IQR] of {args.repeats}"))
    rows = [[r["rule"], fmt_q(r["base_step_s"], 1e3, 1), fmt_q(r["vr_step_s"], 1e3, 1), fmt_q(r["vr_over_base_step"]),
             f"{analytic[r['rule']]['traffic_bound_ratio']:.2f}", fmt_q(r["vr_extra_step_s"], 1e3, 1),
             fmt_q(r["vr_over_base_capture"])] for r in vr_rows]
    print()
    print(table(["rule", "base ms", "VR ms", "VR/base (paired)", "traffic-bound VR/base", "VR extra ms",
                 f"capture VR/base (n={args.samples})"], rows, f"VR step vs base step, median [IQR] of {args.repeats}"))
    print(f"\nVR part of the step: {sum(b for _, b in VR_COLD_BYTES)} bytes per element of main-memory traffic")
    for name, nbytes in VR_COLD_BYTES:
        print(f"    {nbytes:3d} B  {name}")
    print(f"  and {len(VR_HOT_PASSES)} cache-hot element-wise passes: {'; '.join(VR_HOT_PASSES)}")
    print("  base steps, bytes per element: " + ", ".join(
        f"{rule} {sum(b for _, b in parts)}" for rule, parts in BASE_COLD_BYTES.items()))
    print(f"  capture per backward: {CAPTURE_BYTES_PER_SAMPLE['first']} B/element for the first sample, "
          f"{CAPTURE_BYTES_PER_SAMPLE['later']} B/element for later ones")
    if prof:
        print("\nprofile of one step (self CPU ms per aten op):")
        for key in ("base", "vr"):
            ops = ", ".join(f"{o['op']} {o['self_s'] * 1e3:.0f}" for o in prof[key]["ops"][:10])
            print(f"  {key}: total {prof[key]['total_self_s'] * 1e3:.0f} ms: {ops}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["mini", "small", "base"], default="base")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4, help="GSNR samples n per VR step (backward calls)")
    parser.add_argument("--rules", default="SGD,AdamW,LARS,LAMB")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    name = "optimizer_step.json" if args.preset == "base" else f"optimizer_step_{args.preset}.json"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)

    shapes = bert_shapes(args.preset)
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"BertForMaskedLM {args.preset}: {len(shapes)} tensors, {numel / 1e6:.1f}M fp32 elements "
          f"({numel * 4 / 2**20:.0f} MiB), torch threads {torch.get_num_threads()}", flush=True)
    params = make_params(shapes, 0)          # peers and the base side of the VR comparison
    vr_params = make_params(shapes, 0)       # the VR side (own leaves: the hooks live on them)
    a = randn_like_list(params, 1, 1e-3)     # samples g_i = a + c_i b
    b = randn_like_list(params, 2, 1e-3)

    bandwidth = bench_bandwidth(a, args.repeats)
    print(f"element-wise pass (x *= c, 8 B/element): {fmt_q(bandwidth['pass_s'], 1e3, 1)} ms, "
          f"{bandwidth['GB_per_s']:.2f} GB/s", flush=True)
    print("\n1. base rules vs peers (p.grad set directly)", flush=True)
    peers = bench_peers(params, a, args.repeats, args.warmup)
    rules = [r for r in args.rules.split(",") if r]
    print(f"\n2. VR step vs base step (n = {args.samples} samples through autograd on the leaves)", flush=True)
    vr_rows = bench_vr(params, vr_params, a, b, args.samples, args.repeats, args.warmup, rules)
    prof = None if args.no_profile else profile_step(params, vr_params, a, b, args.samples)
    analytic = analytic_ratios(vr_rows)
    print_tables(args, numel, peers, vr_rows, analytic, prof)
    write_json(out, {
        "command": "python benchmarks/optimizer_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset, "numel": numel, "tensors": len(shapes), "repeats": args.repeats,
        "warmup": args.warmup, "samples": args.samples, "machine": machine(), "bandwidth": bandwidth,
        "peers": peers, "vr": vr_rows, "vr_cold_bytes": VR_COLD_BYTES, "vr_hot_passes": VR_HOT_PASSES,
        "base_cold_bytes": BASE_COLD_BYTES, "capture_bytes_per_sample": CAPTURE_BYTES_PER_SAMPLE,
        "analytic": analytic, "profile": prof,
    })
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
