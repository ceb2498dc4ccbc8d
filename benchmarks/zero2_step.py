"""End-to-end ZeRO-2 training step through the real DeepSpeed engine (CPU, gloo).

    export DS_ACCELERATOR=cpu
    python benchmarks/zero2_step.py                       # driver: everything below, writes the JSON
    python benchmarks/zero2_step.py --quick               # driver, fewer repeats

The driver launches ``deepspeed --num_gpus W benchmarks/zero2_step.py --worker ...``
several times:

1. timing, BERT-mini, 2 ranks: engines for VRLAMB, LAMB (VRLAMB with
   ``"vr": false``: the same code path without capture) and DeepSpeed's own
   optimizers that can run on CPU (``AdamW`` with ``torch_adam``, ``AdamW``
   with DeepSpeed's FusedAdam CPU op, ``Lamb`` = FusedLamb; an optimizer that
   cannot be built is reported with its error). All engines live in the same
   rank processes and train in turn, one step each, the order rotating every
   repeat (ABAB...). A step is ``gradient_accumulation_steps`` micro-batches
   (forward, ``engine.backward``, ``engine.step``) of random-token MLM batches
   (seq 128); its time is the maximum over ranks (all-reduce MAX), after a
   barrier. Also recorded: the VR engine's communication counters
   (``engine.vr_optimizer._moments.comm``) per step.
2. memory, BERT-mini, 2 ranks, one process pair per optimizer (VRLAMB, LAMB):
   peak RSS (VmHWM, reset through /proc/self/clear_refs before
   ``deepspeed.initialize``) minus the RSS just before it, per rank, after a
   few steps; and ``source.buffer_numel()``. tracemalloc is not used: torch's
   CPU allocations do not go through Python's allocator.
3. scaling: {mini, small} x {2, 4 ranks}, VRLAMB vs LAMB only.
4. configurations: ZeRO-3, ZeRO-2 and ZeRO-3 with ZeRO-Offload (``offload_optimizer:
   cpu``): BERT-mini, 2 and 4 ranks, VRLAMB vs LAMB, with the Q+S buffer size and the
   communication counters against the expectation.

The GSNR samples per step are n = ranks x gradient_accumulation_steps.
Each rank uses cpu_count // ranks torch threads (4 ranks on 2 cores share them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import fmt_q, machine, paired_ratio, quantiles, table, write_json  # noqa: E402

VOCAB = 30522
MASK_ID = 103
LAMB_PARAMS = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}
CONTENDERS = {
    "VRLAMB": {"type": "VRLAMB", "params": dict(LAMB_PARAMS, gamma=0.1)},
    "LAMB": {"type": "VRLAMB", "params": dict(LAMB_PARAMS, vr=False)},
    "DS-AdamW(torch_adam)": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
    "DS-AdamW(FusedAdam)": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    "DS-Lamb(FusedLamb)": {"type": "Lamb", "params": {"lr": 1e-3, "weight_decay": 0.01}},
}


# =============================================================================== worker side
def _rss_kib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ds_config(name: str, args) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.gas,
        "optimizer": json.loads(json.dumps(CONTENDERS[name])),
        "zero_optimization": {"stage": args.stage, "reduce_bucket_size": int(args.bucket),
                              "allgather_bucket_size": int(args.bucket),
                              **({"offload_optimizer": {"device": "cpu"}} if args.offload else {})},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def mlm_batch(step: int, rank: int, micro: int, args):
    """Random-token MLM micro-batch: 15% of positions masked and labelled, the rest -100."""
    import torch

    g = torch.Generator().manual_seed(100_000 * step + 100 * rank + micro)
    ids = torch.randint(1000, VOCAB, (args.micro_batch, args.seq), generator=g)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return torch.where(chosen, torch.full_like(ids, MASK_ID), ids), labels


def train_step(engine, step: int, rank: int, args) -> tuple[float, float]:
    """One optimizer step (gas micro-batches); returns (step time, time of the boundary engine.step())."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    boundary = 0.0
    for micro in range(args.gas):
        ids, labels = mlm_batch(step, rank, micro, args)
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        boundary = time.perf_counter() - t1
    return time.perf_counter() - t0, boundary


def _max_over_ranks(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def build_engine(name: str, args):
    import ds_vrgd
    from ds_vrgd.pretrain.models import build_bert_mlm

    model = build_bert_mlm(args.preset, VOCAB, seed=0, max_seq_len=args.seq)
    model.train()
    engine, _, _, _ = ds_vrgd.initialize(model=model, model_parameters=model.parameters(),
                                         config=ds_config(name, args))
    return engine


def worker_time(args, rank: int, world: int) -> dict:
    import torch.distributed as dist

    engines, errors = {}, {}
    for name in args.contenders.split(","):
        try:
            engines[name] = build_engine(name, args)
        except Exception as error:  # reported, not fatal: DeepSpeed's CUDA-only optimizers on CPU
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        dist.barrier()
    names = list(engines)
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in next(iter(engines.values())).module.parameters()) if engines else 0
    times = {n: [] for n in names}
    boundary = {n: [] for n in names}
    comm = {n: [] for n in names}
    for r in range(args.warmup + args.repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            engine = engines[name]
            source = getattr(getattr(engine, "vr_optimizer", None), "_moments", None)
            before = dict(getattr(source, "comm", {}) or {})
            total, bnd = train_step(engine, r, rank, args)
            total, bnd = _max_over_ranks([total, bnd])
            after = dict(getattr(source, "comm", {}) or {})
            if r >= args.warmup:
                times[name].append(total)
                boundary[name].append(bnd)
                comm[name].append({k: after[k] - before.get(k, 0) for k in after})
    out = {"numel": numel, "errors": errors, "engines": {}}
    for name in names:
        engine = engines[name]
        entry = {"step_s": times[name], "boundary_s": boundary[name], "comm_per_step": comm[name],
                 "optimizer_class": type(engine.basic_optimizer).__name__}
        vr = getattr(engine, "vr_optimizer", None)
        if vr is not None:
            entry["partition_numel"] = vr._moments.owned_numel()
            entry["buffer_numel"] = vr._moments.buffer_numel() if hasattr(vr._moments, "buffer_numel") else None
            entry["gsnr_n"] = vr.gsnr_stats().get("n")
        out["engines"][name] = entry
    return out


def worker_memory(args, rank: int, world: int) -> dict:
    import gc

    import torch
    from ds_vrgd.pretrain.models import build_bert_mlm  # noqa: F401  (imports transformers before the baseline)

    name = args.contenders.split(",")[0]
    gc.collect()
    reset = _reset_peak()
    rss0 = _rss_kib()["VmRSS"]
    engine = build_engine(name, args)
    after_init = _rss_kib()["VmRSS"]
    for r in range(args.warmup + args.repeats):
        train_step(engine, r, rank, args)
    end = _rss_kib()
    vr = getattr(engine, "vr_optimizer", None)
    partition = vr._moments.owned_numel() if vr is not None else None
    buffers = vr._moments.buffer_numel() if vr is not None and hasattr(vr._moments, "buffer_numel") else None
    return {
        "optimizer": name, "rank": rank, "peak_reset": reset, "rss_before_init_kib": rss0,
        "rss_after_init_kib": after_init, "rss_end_kib": end["VmRSS"], "hwm_kib": end["VmHWM"],
        "peak_delta_MiB": (end["VmHWM"] - rss0) / 1024, "end_delta_MiB": (end["VmRSS"] - rss0) / 1024,
        "init_delta_MiB": (after_init - rss0) / 1024, "partition_numel": partition, "buffer_numel": buffers,
        "numel": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()), "torch_threads": torch.get_num_threads(),
    }


def worker_main(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    result = worker_memory(args, rank, world) if args.mode == "memory" else worker_time(args, rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        payload = {"args": vars(args), "world": world, "torch_threads": torch.get_num_threads(),
                   "ranks": gathered if args.mode == "memory" else None,
                   "result": result if args.mode == "time" else None}
        with open(args.out, "w") as f:
            json.dump(payload, f, default=float)
    dist.destroy_process_group()


# =============================================================================== driver side
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, worker_args: list[str], log) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(_free_port()), os.path.abspath(__file__),
           "--worker", "--out", out] + worker_args
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    print("$ DS_ACCELERATOR=cpu " + " ".join(cmd[:5] + ["benchmarks/zero2_step.py"] + cmd[6:]), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"  ({time.time() - t0:.0f} s, exit {proc.returncode})", flush=True)
    if proc.returncode != 0:
        # gloo sometimes aborts a rank at interpreter exit after the work is done (docs/deepspeed.md,
        # "Ending a training script"): keep the result that rank 0 wrote, and say so
        if os.path.getsize(out) == 0:
            raise SystemExit(f"launch failed (exit {proc.returncode}); see the log")
        print("  (a rank aborted at exit after writing the result: gloo teardown abort; result kept)", flush=True)
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def summarise_time(res: dict) -> dict:
    """Quantiles, paired ratios vs LAMB, communication vs expectation."""
    r = res["result"]
    engines = r["engines"]
    gas, world = res["args"]["gas"], res["world"]
    out = {"numel": r["numel"], "errors": r["errors"], "world": world, "gas": gas,
           "preset": res["args"]["preset"], "engines": {}}
    ref = engines.get("LAMB")
    for name, e in engines.items():
        entry = {"optimizer_class": e["optimizer_class"], "step_s": quantiles(e["step_s"]),
                 "boundary_s": quantiles(e["boundary_s"])}
        if ref is not None and name != "LAMB":
            entry["over_LAMB"] = paired_ratio(ref["step_s"], e["step_s"])
        if e["comm_per_step"] and e["comm_per_step"][0]:
            elements = [c["elements"] for c in e["comm_per_step"]]
            collectives = [c["collectives"] for c in e["comm_per_step"]]
            entry["comm"] = {
                "elements_per_step": quantiles(elements),
                "bytes_per_step": 4 * quantiles(elements)["median"],
                "collectives_per_step": quantiles(collectives),
                "expected_elements_per_step": 2 * r["numel"] * gas,
                "expected_bytes_per_step": 8 * r["numel"] * gas,
                "note": "payload of the (g^2, g) reduce calls (fp32), per rank, the counter of this rank's "
                        "collectives; the gradient reduction of ZeRO-2 moves half that payload in fp32",
            }
        for key in ("partition_numel", "buffer_numel", "gsnr_n"):
            if key in e:
                entry[key] = e[key]
        out["engines"][name] = entry
    return out


def summarise_memory(res: dict) -> dict:
    ranks = res["ranks"]
    return {"optimizer": ranks[0]["optimizer"], "per_rank": ranks}


def driver(args) -> None:
    log_path = os.path.join(HERE, "results", "zero2_step.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    common = ["--micro-batch", str(args.micro_batch), "--seq", str(args.seq), "--gas", str(args.gas),
              "--bucket", str(int(args.bucket)), "--warmup", str(args.warmup)]
    results = {"command": "python benchmarks/zero2_step.py " + " ".join(sys.argv[1:]), "machine": machine(),
               "settings": {"micro_batch": args.micro_batch, "seq": args.seq, "gas": args.gas,
                            "reduce_bucket_size": int(args.bucket), "repeats": args.repeats,
                            "scaling_repeats": args.scaling_repeats, "warmup": args.warmup}}
    with open(log_path, "w") as log:
        # 1. timing with all contenders
        res = launch(2, ["--preset", "mini", "--repeats", str(args.repeats), "--contenders", ",".join(CONTENDERS)]
                     + common, log)
        results["timing"] = summarise_time(res)
        results["timing_raw"] = res["result"]
        # 2. memory
        results["memory"] = {}
        for name in ("LAMB", "VRLAMB"):
            res = launch(2, ["--preset", "mini", "--mode", "memory", "--repeats", "3", "--contenders", name] + common,
                         log)
            results["memory"][name] = summarise_memory(res)
        # 3. scaling
        results["scaling"] = []
        for preset in args.scaling_presets.split(","):
            for world in (2, 4):
                if preset == "mini" and world == 2:
                    t = results["timing"]
                else:
                    res = launch(world, ["--preset", preset, "--repeats", str(args.scaling_repeats),
                                         "--contenders", "VRLAMB,LAMB"] + common, log)
                    t = summarise_time(res)
                results["scaling"].append({"preset": preset, "world": world, "numel": t["numel"],
                                           "n": world * args.gas, "LAMB_step_s": t["engines"]["LAMB"]["step_s"],
                                           "VRLAMB_step_s": t["engines"]["VRLAMB"]["step_s"],
                                           "VRLAMB_over_LAMB": t["engines"]["VRLAMB"]["over_LAMB"],
                                           "comm": t["engines"]["VRLAMB"].get("comm")})
        # 4. ZeRO-3, and ZeRO-2/3 with ZeRO-Offload (optimizer state and step on the host), VRLAMB vs LAMB
        results["configurations"] = []
        for stage, offload in ((3, False), (2, True), (3, True)):
            for world in (2, 4):
                res = launch(world, ["--preset", "mini", "--repeats", str(args.scaling_repeats), "--stage", str(stage),
                                     "--contenders", "VRLAMB,LAMB"] + (["--offload"] if offload else []) + common, log)
                t = summarise_time(res)
                results["configurations"].append({
                    "stage": stage, "offload": offload, "world": world, "numel": t["numel"], "n": world * args.gas,
                    "LAMB_step_s": t["engines"]["LAMB"]["step_s"], "VRLAMB_step_s": t["engines"]["VRLAMB"]["step_s"],
                    "VRLAMB_over_LAMB": t["engines"]["VRLAMB"]["over_LAMB"], "comm": t["engines"]["VRLAMB"].get("comm"),
                    "buffer_numel": t["engines"]["VRLAMB"].get("buffer_numel"),
                    "partition_numel": t["engines"]["VRLAMB"].get("partition_numel")})
    out = os.path.join(HERE, "results", "zero2_step.json")
    write_json(out, results)
    report(results)
    print(f"\nwrote {out} (launcher output: {log_path})")


def report(results: dict) -> None:
    t = results["timing"]
    s = results["settings"]
    rows = []
    for name, e in t["engines"].items():
        rows.append([name, e["optimizer_class"], fmt_q(e["step_s"], 1e3, 0), fmt_q(e["boundary_s"], 1e3, 0),
                     fmt_q(e["over_LAMB"]) if "over_LAMB" in e else "1 (reference)"])
    for name, err in t["errors"].items():
        rows.append([name, "not built", "-", "-", err[:90]])
    print()
    print(table(["engine", "optimizer", "step ms", "boundary engine.step() ms", "step / LAMB (paired)"], rows,
                f"ZeRO-2, BERT-mini ({t['numel'] / 1e6:.1f}M), 2 ranks, micro-batch {s['micro_batch']} x seq "
                f"{s['seq']}, gas {s['gas']} (n = {2 * s['gas']}), median [IQR] of {s['repeats']}, max over ranks"))
    vr = t["engines"]["VRLAMB"]
    if "comm" in vr:
        c = vr["comm"]
        print(f"\nVR communication per step (rank 0's collectives): {c['elements_per_step']['median']:.0f} elements = "
              f"{c['bytes_per_step'] / 2**20:.1f} MiB in {c['collectives_per_step']['median']:.0f} collectives; "
              f"expected {c['expected_elements_per_step']} elements = {c['expected_bytes_per_step'] / 2**20:.1f} MiB "
              f"(model numel x (g^2, g) x 4 B x {s['gas']} micro-steps)")
    rows = []
    for name, m in results["memory"].items():
        for i, rank in enumerate(m["per_rank"]):
            buf = rank["buffer_numel"]
            expected = "" if not buf else f"{(buf['sq'] + buf['bucket']) * 4 / 2**20:.1f}"
            rows.append([name, i, f"{rank['init_delta_MiB']:.1f}", f"{rank['peak_delta_MiB']:.1f}",
                         f"{rank['end_delta_MiB']:.1f}", rank["partition_numel"], expected])
    print()
    print(table(["optimizer", "rank", "RSS after init MiB", "peak RSS MiB", "RSS at end MiB", "partition numel",
                 "VR buffers (Q+S+bucket) MiB"], rows,
                "Memory per rank: RSS growth from just before deepspeed.initialize (VmRSS/VmHWM)"))
    rows = [[x["preset"], f"{x['numel'] / 1e6:.1f}M", x["world"], x["n"], fmt_q(x["LAMB_step_s"], 1e3, 0),
             fmt_q(x["VRLAMB_step_s"], 1e3, 0), fmt_q(x["VRLAMB_over_LAMB"])] for x in results["scaling"]]
    print()
    print(table(["preset", "params", "ranks", "n", "LAMB step ms", "VRLAMB step ms", "VRLAMB / LAMB (paired)"], rows,
                "Scaling of the VR overhead (median [IQR])"))
    rows = [[x["stage"], "cpu" if x["offload"] else "-", x["world"], x["n"], fmt_q(x["LAMB_step_s"], 1e3, 0),
             fmt_q(x["VRLAMB_step_s"], 1e3, 0),
             fmt_q(x["VRLAMB_over_LAMB"]), x["partition_numel"],
             "" if not x["buffer_numel"] else x["buffer_numel"]["sq"],
             "" if not x["comm"] else f"{x['comm']['elements_per_step']['median']:.0f} / "
                                      f"{x['comm']['expected_elements_per_step']}"]
            for x in results.get("configurations", [])]
    print()
    print(table(["stage", "offload", "ranks", "n", "LAMB step ms", "VRLAMB step ms", "VRLAMB / LAMB (paired)",
                 "partition numel", "Q+S numel", "elements per step / expected"], rows,
                "ZeRO-3 and ZeRO-Offload, BERT-mini (median [IQR])"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="(internal) run as a rank under the deepspeed launcher")
    parser.add_argument("--mode", choices=["time", "memory"], default="time")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--gas", type=int, default=2)
    parser.add_argument("--bucket", type=float, default=5e6, help="reduce_bucket_size (elements)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scaling-repeats", type=int, default=5)
    parser.add_argument("--scaling-presets", default="mini,small")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--offload", action="store_true", help="(worker) offload_optimizer to the CPU")
    parser.add_argument("--stage", type=int, default=2, help="(worker) ZeRO stage")
    parser.add_argument("--out", default=None)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.quick:
        args.repeats, args.scaling_repeats, args.warmup = 3, 3, 1
    driver(args)


if __name__ == "__main__":
    main()
