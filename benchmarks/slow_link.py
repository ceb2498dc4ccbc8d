"""VRLAMB vs LAMB over a slow data-parallel link: step time, what each side sends, how much VR wait is exposed.

Issue: "GSNR statistics at the cost a cluster can pay: traffic near its minimum, measured over a slow link".

    cd /work/main && source launch/_env.sh
    python benchmarks/slow_link.py                        # as root: the full matrix below (36 launches, hours)
    python benchmarks/slow_link.py --links unshaped       # no root needed: the unshaped link only (12 launches)
    python benchmarks/slow_link.py --quick --links 2gbit  # ~2 min: ZeRO-2 bf16 GA 4, a warm-up and a timed block
                                                          # of 3 steps (--quick alone: the unshaped link)
    python benchmarks/slow_link.py --links 2gbit --stages 1,2 --precisions bf16 --gas 4 --local   # the targets
    # not root: sudo -E env PATH="$PATH" python benchmarks/slow_link.py ...

Needs, for a shaped link (anything but ``unshaped``): root (CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2 (``ip``,
``tc``) and a kernel that lets this process create network namespaces. Without them the script says what is
missing and exits non-zero; ``--links unshaped`` runs without any of it. Run it on a quiet machine: the two
ranks share its CPU cores with everything else.

What it does. For each link in ``--links`` (default ``unshaped,5gbit,2gbit``) and each ZeRO stage x precision x
gradient accumulation (GA) of ``--stages 1,2,3`` x ``--precisions bf16,fp32`` x ``--gas 1,4``, one launch of
``deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port P benchmarks/slow_link.py --worker ...``
(gloo, ``GLOO_SOCKET_IFNAME=lo``, ``DS_ACCELERATOR=cpu``). A shaped link runs that launch inside a network
namespace of this script's own (``--netns``, default ``vrgd_slow_link``; a stale one of that name is removed
first) whose loopback is rate-limited::

    ip netns add NAME; ip netns exec NAME ip link set lo up
    ip netns exec NAME tc qdisc add dev lo root tbf rate 2gbit burst 512kb latency 200ms
    ip netns exec NAME deepspeed ...

so every byte between the ranks goes through one token bucket of that rate (both directions share it). The
namespace is deleted afterwards, also on failure, Ctrl-C or SIGTERM. Each launch first times a 40 MB fp32
all-reduce between the 2 ranks (a sanity figure for the link; the issue measured 321 ms at 2 Gbit/s and 43 ms
unshaped), then:

* Model and data: BERT-mini (``build_bert_mlm("mini", 30522, seed=0, max_seq_len=128)``, 11.2M parameters),
  random-token MLM micro-batches of 4 x seq 128 (``zero2_step.mlm_batch``, the same batches for every
  engine), 2 ranks, ``gradient_clipping`` 1.0, ``reduce_bucket_size`` 5e6; bf16 = ``"bf16": {"enabled": true}``.
* Engines, all in the same two rank processes: "LAMB" (type VRLAMB, ``"vr": false``), "VRLAMB" (gamma 0.1,
  defaults), "VRLAMB-k10" (``gsnr_interval`` 10) and, with ``--local``, "VRLAMB-alt": the way of sending
  the statistics the default does not take (ds_config ``"vrgd": {"local_sums": true}`` at ZeRO 2/3, ``false``
  at ZeRO 1). LAMB params lr 1e-3, betas (0.9, 0.999), eps 1e-6,
  weight_decay 0.01.
* Timing in blocks: each engine in turn runs a block of ``--block`` (10) consecutive steps, the order of the
  engines rotating every round (as zero2_step.py rotates its repeats); ``--warmup-blocks`` (1) rounds are
  discarded, ``--blocks`` (3) are timed. A block of 10 holds exactly one statistics step of VRLAMB-k10 (steps
  1, 11, 21, ...), so its block mean is its cost averaged over whole intervals. A step is GA micro-batches
  (forward, ``engine.backward``, ``engine.step``; ``zero2_step.train_step``) timed after a barrier, its time the
  maximum over ranks. Reported: the per-block mean step time (median [IQR] over blocks) and the ratio to LAMB
  per paired block (``_timing.paired_ratio``).
* Traffic, counted: torch.distributed's all_reduce, reduce, reduce_scatter_tensor, all_to_all_single,
  all_gather_into_tensor, all_gather, reduce_scatter, broadcast (and ``_all_gather_base``, ``_reduce_scatter_base``,
  ``all_reduce_coalesced``) are wrapped in the worker, in both ``torch.distributed`` and
  ``torch.distributed.distributed_c10d``, before ``deepspeed.init_distributed`` (DeepSpeed's comm backend keeps
  its own reference to ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` from that moment on; the
  rest it looks up at call time). Each call inside a timed step adds its payload, numel x element size of the
  call's *input* (for an all-gather that is this rank's shard), by process group: calls on the VR source's
  group (``engine.vr_optimizer._moments.group``) are "VR" (the (g^2[, g]) reductions) or "VR per-layer sums"
  (the small all-reduces made inside ``PartitionedMoments._all_reduce``); every other call is DeepSpeed's,
  split into its gradient reduction (all_reduce, reduce, reduce_scatter*: the gradient buckets and the small
  norm all-reduces) and its parameter all-gathers (all_gather*, broadcast). All per optimizer step, per rank,
  and per model element (bytes / model numel). The source's own counter ``_moments.comm`` is recorded per step
  next to it, and the VR figure is checked against the table "Traffic per step, by configuration" of
  docs/costs.md (read from the file).
* Exposed VR wait: the source's reductions are asynchronous; the time this rank spends blocked in their
  ``work.wait()`` (the Work objects of the VR group's async calls are wrapped with a timer) is summed per step,
  next to the time inside ``PartitionedMoments._complete`` (the waits plus adding the results into Q, S),
  inside ``PartitionedMoments.flush`` (before the model step) and inside ``_all_reduce`` (per-layer sums;
  synchronous), each the maximum over ranks. Shown next to the paired VRLAMB - LAMB step difference.
  ds_vrgd itself is not modified: the benchmark wraps the class methods.

Output: one markdown table per link (rows stage x precision x GA), a traffic check against docs/costs.md, the
issue's targets with the measured medians, ``benchmarks/results/slow_link.json`` (every step of every engine on
every rank, the machine, the exact command; rewritten after each launch, ``"complete": false`` until the end)
and the launcher output in ``benchmarks/results/slow_link.log``.

The issue's targets (checked after the tables; a target whose configuration was not run reads "not measured"):

* 2 Gbit/s, bf16, GA 4: ZeRO-1 and ZeRO-2 VRLAMB (default) <= 1.25x LAMB;
* 2 Gbit/s, bf16, GA 4: ZeRO-1 and ZeRO-2 VRLAMB with ``gsnr_interval`` 10 <= 1.05x LAMB;
* unshaped, ZeRO-2, bf16: VRLAMB <= 1.10x LAMB (the issue names no GA; read here as GA 4, like the others).

A rank that gloo aborts at interpreter exit after rank 0 wrote the result (docs/deepspeed.md, "Ending a
training script") does not lose the launch: the written result is kept, as zero2_step.py's launch() does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import zero2_step  # benchmarks/ is on sys.path: its batches, step, config and helpers
from _timing import fmt_q, machine, paired_ratio, quantiles, table, write_json

from tests.support.costs_table import vr_bytes_per_element  # the documented table, read as the tests read it

PRESET, VOCAB, SEED = "mini", zero2_step.VOCAB, 0
LINKS = ("unshaped", "5gbit", "2gbit")
UNSHAPED = "unshaped"
TBF = "burst 512kb latency 200ms"
NETNS = "vrgd_slow_link"
PROBE_NUMEL = 10_000_000  # 40 MB of fp32
ISSUE_PROBE_MS = {"2gbit": 321, UNSHAPED: 43}
VRLAMB = dict(zero2_step.CONTENDERS["VRLAMB"]["params"])  # LAMB_PARAMS + gamma 0.1
ENGINES = {  # name -> (optimizer section, extra top-level ds_config keys)
    "LAMB": (zero2_step.CONTENDERS["LAMB"], {}),
    "VRLAMB": (zero2_step.CONTENDERS["VRLAMB"], {}),
    "VRLAMB-k10": ({"type": "VRLAMB", "params": dict(VRLAMB, gsnr_interval=10)}, {}),
    # the way the default does not take: local sums at ZeRO 2/3, raw samples at ZeRO 1 (set per stage below)
    "VRLAMB-alt": (zero2_step.CONTENDERS["VRLAMB"], {}),
}
TARGETS = [  # (link, stage, precision, GA, engine, bound)
    ("2gbit", 1, "bf16", 4, "VRLAMB", 1.25),
    ("2gbit", 2, "bf16", 4, "VRLAMB", 1.25),
    ("2gbit", 1, "bf16", 4, "VRLAMB-k10", 1.05),
    ("2gbit", 2, "bf16", 4, "VRLAMB-k10", 1.05),
    (UNSHAPED, 2, "bf16", 4, "VRLAMB", 1.10),
]

# =============================================================================== worker side
REDUCING = ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter", "_reduce_scatter_base",
            "all_reduce_coalesced", "all_to_all_single")
GATHERING = ("all_gather_into_tensor", "all_gather", "_all_gather_base", "broadcast")
INPUT_ARG = {"all_reduce": "tensor", "reduce": "tensor", "broadcast": "tensor", "all_gather": "tensor",
             "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input", "reduce_scatter": "input_list",
             "all_gather_into_tensor": "input_tensor", "_all_gather_base": "input_tensor",
             "all_reduce_coalesced": "tensors", "all_to_all_single": "input"}
TIMERS = ("wait_s", "complete_s", "flush_s", "layer_sums_s")


class _TimedWork:
    """A Work of the VR group's async reductions whose ``wait()`` adds the time blocked in it."""

    __slots__ = ("_traffic", "_work")

    def __init__(self, work, traffic: Traffic):
        self._work, self._traffic = work, traffic

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._traffic.timers["wait_s"] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


class Traffic:
    """Counts the payload of torch.distributed collectives per category while ``active`` (one step)."""

    def __init__(self):
        self.active = False
        self.vr_groups: list = []
        self.in_layer_sums = False
        self._local = threading.local()
        self.counts: dict = {}
        self.timers = dict.fromkeys(TIMERS, 0.0)

    # ------------------------------------------------------------ installation
    def install(self) -> None:
        """Wrap the collectives (before deepspeed.init_distributed) and the source's methods."""
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, input_arg in INPUT_ARG.items():
            original = getattr(c10d, name, None)
            if original is None:
                continue
            signature = inspect.signature(original)
            if input_arg not in signature.parameters:
                raise RuntimeError(f"torch.distributed.{name} has no parameter {input_arg!r}: {signature}")
            wrapped = self._wrap(name, original, signature)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapped)
        self._wrap_source()

    def _wrap(self, name: str, original, signature):
        category_of_other = "ds_grad" if name in REDUCING else "ds_gather"

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if not self.active or getattr(self._local, "depth", 0):
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            payload = bound.arguments[INPUT_ARG[name]]
            tensors = payload if isinstance(payload, (list, tuple)) else [payload]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            group = bound.arguments.get("group")
            if any(group is g for g in self.vr_groups):
                category = "vr_layer_sums" if self.in_layer_sums else "vr"
            else:
                category = category_of_other
            entry = self.counts.setdefault(category, {}).setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += nbytes
            self._local.depth = 1
            try:
                work = original(*args, **kwargs)
            finally:
                self._local.depth = 0
            if category == "vr" and work is not None and bound.arguments.get("async_op"):
                return _TimedWork(work, self)
            return work

        return counted

    def _wrap_source(self) -> None:
        from ds_vrgd.partitioned import PartitionedMoments

        def timed(method, key: str, layer_sums: bool = False):
            @functools.wraps(method)
            def run(source, *args, **kwargs):
                t0 = time.perf_counter()
                if layer_sums:
                    self.in_layer_sums = True
                try:
                    return method(source, *args, **kwargs)
                finally:
                    self.in_layer_sums = False
                    if self.active:
                        self.timers[key] += time.perf_counter() - t0

            return run

        PartitionedMoments._complete = timed(PartitionedMoments._complete, "complete_s")
        PartitionedMoments.flush = timed(PartitionedMoments.flush, "flush_s")
        PartitionedMoments._all_reduce = timed(PartitionedMoments._all_reduce, "layer_sums_s", layer_sums=True)

    # ------------------------------------------------------------ per step
    def begin(self) -> None:
        self.counts = {}
        self.timers = dict.fromkeys(TIMERS, 0.0)
        self.active = True

    def end(self) -> tuple[dict, dict]:
        self.active = False
        return self.counts, dict(self.timers)


def build_engine(name: str, args):
    import ds_vrgd
    from ds_vrgd.pretrain.models import build_bert_mlm

    optimizer, extra = ENGINES[name]
    if name == "VRLAMB-alt":
        extra = {"vrgd": {"local_sums": args.stage >= 2}}
    config = zero2_step.ds_config("LAMB", args)
    config["optimizer"] = json.loads(json.dumps(optimizer))
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    config.update(json.loads(json.dumps(extra)))
    model = build_bert_mlm(PRESET, VOCAB, seed=SEED, max_seq_len=args.seq)
    model.train()
    engine, _, _, _ = ds_vrgd.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, config


def allreduce_probe(repeats: int) -> list[float]:
    """Seconds of a 40 MB fp32 all-reduce over all ranks (max over ranks, after a barrier), after one warm-up."""
    import torch
    import torch.distributed as dist

    tensor = torch.zeros(PROBE_NUMEL, dtype=torch.float32)
    dist.all_reduce(tensor)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(zero2_step._max_over_ranks([time.perf_counter() - t0])[0])
    return times


def worker_main(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    import ds_vrgd

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    traffic = Traffic()
    traffic.install()  # before init_distributed: DeepSpeed's backend keeps references to two of the functions
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    args.offload = False  # zero2_step.ds_config reads it
    probe = allreduce_probe(args.probe_repeats)
    if rank == 0:
        print(f"[slow_link] 40 MB fp32 all-reduce: {statistics.median(probe) * 1e3:.1f} ms", flush=True)

    names = [n for n in args.engines.split(",") if n]
    engines, info = {}, {}
    for name in names:
        engine, config = build_engine(name, args)
        source = engine.vr_optimizer._moments
        engines[name] = engine
        traffic.vr_groups.append(source.group)
        info[name] = {"config": config, "wrapper": type(engine.optimizer).__name__,
                      "basic_optimizer": type(engine.basic_optimizer).__name__,
                      "reduction": {"sample_sums": source.reduction.sample_sums,
                                    "local_sums": source.reduction.local_sums, "row": source.reduction.row,
                                    "raw_samples": str(source.reduction.raw_samples).replace("torch.", ""),
                                    "partitioned": source._partitioned},
                      "partition_numel": source.owned_numel(), "buffer_numel": source.buffer_numel()}
        dist.barrier()
    first = next(iter(engines.values()))
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in first.module.parameters())

    records = {name: [] for name in names}
    for b in range(args.warmup_blocks + args.blocks):
        shift = b % len(names)
        for name in names[shift:] + names[:shift]:
            engine = engines[name]
            source = engine.vr_optimizer._moments
            block = []
            for i in range(args.block):
                step = b * args.block + i  # this engine's step (0-based): the same batches for every engine
                before = dict(source.comm)
                traffic.begin()
                total, boundary = zero2_step.train_step(engine, step, rank, args)
                counts, timers = traffic.end()
                after = dict(source.comm)
                maxed = zero2_step._max_over_ranks([total, boundary] + [timers[k] for k in TIMERS])
                block.append(maxed[0])
                records[name].append({
                    "block": b, "step": step, "warmup": b < args.warmup_blocks,
                    "max": dict(zip(("step_s", "boundary_s") + TIMERS, maxed)),
                    "local": dict(step_s=total, boundary_s=boundary, **timers),
                    "traffic": counts, "source_comm": {k: after[k] - before.get(k, 0) for k in after}})
            if rank == 0:
                print(f"[slow_link] block {b}{' (warm-up)' if b < args.warmup_blocks else ''} {name}: "
                      f"{statistics.mean(block) * 1e3:.0f} ms/step", flush=True)
    for name, engine in engines.items():
        info[name]["gsnr_n"] = engine.vr_optimizer.gsnr_stats().get("n")
        info[name]["buffer_numel_end"] = engine.vr_optimizer._moments.buffer_numel()

    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        payload = {"args": vars(args), "world": world, "torch_threads": torch.get_num_threads(), "numel": numel,
                   "probe_s": probe, "engines": info, "ranks": gathered,
                   "env": {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT")}}
        with open(args.out + ".tmp", "w") as f:
            json.dump(payload, f, default=float)
        os.replace(args.out + ".tmp", args.out)
    ds_vrgd.shutdown()


# =============================================================================== driver side: the link
class LinkUnavailable(Exception):
    pass


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LinkUnavailable(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()}")


def netns_exists(name: str) -> bool:
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return any(line.split()[0] == name for line in proc.stdout.splitlines() if line.strip())


def netns_delete(name: str) -> None:
    if shutil.which("ip") and netns_exists(name):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def netns_create(name: str, rate: str) -> None:
    """A namespace with its loopback up and rate-limited (a stale one of the same name is removed first)."""
    netns_delete(name)
    _run(["ip", "netns", "add", name])
    _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    _run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate] + TBF.split())


def preflight(name: str, rate: str) -> None:
    """SystemExit naming what is missing when a shaped link cannot be made here."""
    missing = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()}; network namespaces need CAP_NET_ADMIN/CAP_SYS_ADMIN)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` (iproute2) on PATH")
    problem = "missing: " + "; ".join(missing) if missing else ""
    if not missing:
        try:
            netns_create(name, rate)
        except LinkUnavailable as error:
            problem = f"cannot create the rate-limited network namespace: {error}"
        finally:
            netns_delete(name)
    if problem:
        raise SystemExit(f"slow_link.py: a shaped link ({rate}) needs root and iproute2 (ip, tc) to create a "
                         f"network namespace with a rate-limited loopback; {problem}.\n"
                         f"`--links unshaped` runs without them.")


# =============================================================================== driver side: launches
def _deepspeed_bin() -> str:
    found = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(found):
        raise SystemExit("slow_link.py: the `deepspeed` launcher is not installed (pip install deepspeed)")
    return os.path.abspath(found)


def _end_group(proc: subprocess.Popen) -> None:
    """End the launch's own process session (the launcher and its ranks): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


def launch(worker_args: list[str], netns: str | None, log, timeout_s: float) -> dict:
    fd, out = tempfile.mkstemp(prefix="slow_link_", suffix=".json")
    os.close(fd)
    cmd = [_deepspeed_bin(), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(zero2_step._free_port()), os.path.abspath(__file__), "--worker", "--out", out] + worker_args
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")
    shown = " ".join("deepspeed" if c == cmd[4 if netns else 0] else
                     "benchmarks/slow_link.py" if c == os.path.abspath(__file__) else c for c in cmd)
    shown = "DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo " + shown.replace(f"--out {out} ", "")
    print(f"$ {shown}", flush=True)
    log.write(f"\n$ {shown}\n")
    log.flush()
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _end_group(proc)
        rc = None
    except BaseException:  # Ctrl-C, SIGTERM: end the ranks too, then let the caller clean up
        _end_group(proc)
        with contextlib.suppress(OSError):
            os.unlink(out)
        raise
    _end_group(proc)  # nothing left of the session (a rank that outlived the launcher)
    wall = time.time() - t0
    meta = {"command": shown, "wall_s": wall, "exit": rc, "teardown_abort": False}
    written = os.path.getsize(out) > 0
    if rc is None:
        print(f"  (timed out after {timeout_s:.0f} s; ranks ended)", flush=True)
        meta["error"] = f"timed out after {timeout_s:.0f} s"
    elif rc != 0 and not written:
        print(f"  ({wall:.0f} s, exit {rc}: failed, see the log)", flush=True)
        meta["error"] = f"launch failed (exit {rc}); see benchmarks/results/slow_link.log"
    else:
        print(f"  ({wall:.0f} s, exit {rc})", flush=True)
        if rc != 0:
            # gloo sometimes aborts a rank at interpreter exit after the work is done (docs/deepspeed.md,
            # "Ending a training script"): keep the result that rank 0 wrote, and say so
            print("  (a rank aborted at exit after writing the result: gloo teardown abort; result kept)", flush=True)
            meta["teardown_abort"] = True
    result = None
    if written and rc is not None:
        with open(out) as f:
            result = json.load(f)
    os.unlink(out)
    return {"meta": meta, "result": result}


# =============================================================================== driver side: figures
def documented_row(reduction: dict) -> str:
    """The row of docs/costs.md's traffic table for the way the VR source chose (tests/support/costs_table.py
    reads its figures)."""
    if reduction["raw_samples"] != "None":
        return f"raw-{'fp32' if reduction['raw_samples'] == 'float32' else 'half'}"
    way = "local" if reduction["partitioned"] else "replicated"
    return f"{way}-{'half' if reduction['sample_sums'] else 'fp32'}"


def _bytes(counts: dict, category: str) -> int:
    return sum(b for _, b in counts.get(category, {}).values())


def _calls(counts: dict, category: str) -> int:
    return sum(c for c, _ in counts.get(category, {}).values())


def _mean(xs):
    return statistics.mean(xs) if xs else None


def summarise(run: dict) -> dict:
    res = run["result"]
    numel, args = res["numel"], res["args"]
    gas, block = args["gas"], args["block"]
    rank0 = res["ranks"][0]
    out = {"numel": numel, "probe_ms": quantiles([t * 1e3 for t in res["probe_s"]]), "engines": {}}
    means = {}
    for name, steps in rank0.items():
        timed = [s for s in steps if not s["warmup"]]
        blocks = sorted({s["block"] for s in timed})
        by_block = {key: [_mean([s["max"][key] for s in timed if s["block"] == b]) for b in blocks]
                    for key in ("step_s", "boundary_s") + TIMERS}
        means[name] = by_block["step_s"]
        per_step = []
        for s in timed:
            c = s["traffic"]
            per_step.append({key: _bytes(c, key) / numel for key in ("vr", "vr_layer_sums", "ds_grad", "ds_gather")}
                            | {"source": s["source_comm"].get("bytes", 0) / numel,
                               "vr_calls": _calls(c, "vr"), "layer_sum_calls": _calls(c, "vr_layer_sums"),
                               "layer_sum_bytes": _bytes(c, "vr_layer_sums"), "ds_calls": _calls(c, "ds_grad")
                               + _calls(c, "ds_gather"), "by_function": c})
        stats = [p for p in per_step if p["vr"] > 0]
        held = [p for p in per_step if p["vr"] == 0]
        e = res["engines"][name]
        row = documented_row(e["reduction"]) if name != "LAMB" else None
        expected_vr = None if row is None else vr_bytes_per_element(row, gas)
        ranks_agree = all(
            [_bytes(s["traffic"], "vr") for s in r[name] if not s["warmup"]]
            == [_bytes(s["traffic"], "vr") for s in timed] for r in res["ranks"])
        entry = {
            "wrapper": e["wrapper"], "reduction": e["reduction"], "gsnr_n": e.get("gsnr_n"),
            "partition_numel": e["partition_numel"], "buffer_numel": e.get("buffer_numel_end"),
            "block_mean_s": {k: v for k, v in by_block.items()},
            "step_s": quantiles(by_block["step_s"]),
            **{k: quantiles(by_block[k]) for k in ("boundary_s",) + TIMERS},
            "bytes_per_element_per_step": {
                key: _mean([p[key] for p in per_step]) for key in ("vr", "vr_layer_sums", "ds_grad", "ds_gather",
                                                                    "source")},
            "vr_bytes_per_element_statistics_step": _mean([p["vr"] for p in stats]),
            "vr_bytes_per_element_held_step": _mean([p["vr"] for p in held]) if held else None,
            "statistics_steps": len(stats), "held_steps": len(held), "timed_steps": len(per_step),
            "layer_sum_bytes_per_step": _mean([p["layer_sum_bytes"] for p in per_step]),
            "layer_sum_calls_per_step": _mean([p["layer_sum_calls"] for p in per_step]),
            "vr_calls_per_step": _mean([p["vr_calls"] for p in per_step]),
            "ds_calls_per_step": _mean([p["ds_calls"] for p in per_step]),
            "source_counter_equals_counted": all(abs(p["source"] - p["vr"]) < 1e-9 for p in per_step),
            "ranks_count_the_same_vr_bytes": ranks_agree,
            "by_function_first_timed_step": per_step[0]["by_function"] if per_step else None,
            "documented_row": row,
            "documented_vr_bytes_per_element_statistics_step": expected_vr,
        }
        out["engines"][name] = entry
    ref = means.get("LAMB")
    if ref:
        for name, m in means.items():
            if name != "LAMB":
                out["engines"][name]["over_LAMB"] = paired_ratio(ref, m)
                out["engines"][name]["minus_LAMB_s"] = quantiles([y - x for x, y in zip(ref, m)])
    out["block_steps"] = block
    return out


def _cfg(stage, precision, gas) -> str:
    return f"ZeRO-{stage} {precision} GA {gas}"


def report(results: dict) -> None:
    runs = [r for r in results["runs"] if r.get("summary")]
    failed = [r for r in results["runs"] if not r.get("summary")]
    local = any("VRLAMB-alt" in r["summary"]["engines"] for r in runs)
    for link in results["settings"]["links"]:
        probe = results["links"].get(link, {}).get("allreduce_40MB_ms")
        mine = [r for r in runs if r["link"] == link]
        if not mine:
            continue
        rows = []
        for r in mine:
            e = r["summary"]["engines"]
            vr, k10, ref = e.get("VRLAMB"), e.get("VRLAMB-k10"), e.get("LAMB")
            bpe = lambda x, key="vr": "-" if x is None else f"{x['bytes_per_element_per_step'][key]:.2f}"
            ds = ref["bytes_per_element_per_step"] if ref else None
            row = [_cfg(r["stage"], r["precision"], r["gas"]), fmt_q(ref["step_s"], 1e3, 0) if ref else "-",
                   fmt_q(vr["over_LAMB"]) if vr else "-", fmt_q(k10["over_LAMB"]) if k10 else "-"]
            if local:
                lo = e.get("VRLAMB-alt")
                row.append(fmt_q(lo["over_LAMB"]) if lo else "-")
            row += [fmt_q(vr["minus_LAMB_s"], 1e3, 0) if vr else "-", fmt_q(vr["wait_s"], 1e3, 0) if vr else "-",
                    bpe(vr), bpe(k10)]
            if local:
                row.append(bpe(e.get("VRLAMB-alt")))
            row.append("-" if ds is None else f"{ds['ds_grad'] + ds['ds_gather']:.2f} "
                                              f"({ds['ds_grad']:.2f} grad + {ds['ds_gather']:.2f} gather)")
            rows.append(row)
        headers = ["configuration", "LAMB ms", "VRLAMB/LAMB", "VRLAMB-k10/LAMB"]
        headers += ["VRLAMB-alt/LAMB"] if local else []
        headers += ["VRLAMB - LAMB ms", "exposed VR wait ms", "VR B/elem/step", "k10 VR B/elem/step"]
        headers += (["alt VR B/elem/step"] if local else []) + ["DeepSpeed B/elem/step (LAMB)"]
        s = results["settings"]
        title = (f"Link {link}" + (f" (tbf {TBF})" if link != UNSHAPED else " (loopback, no namespace)")
                 + f": BERT-mini ({mine[0]['summary']['numel'] / 1e6:.1f}M), 2 ranks, micro-batch {s['micro_batch']} x "
                 f"seq {s['seq']}, per-block mean step ms, median [IQR] of {s['blocks']} blocks of {s['block']} steps, "
                 f"max over ranks; ratios paired per block")
        print()
        if probe:
            issue = f"; the issue: {ISSUE_PROBE_MS[link]} ms" if link in ISSUE_PROBE_MS else ""
            print(f"40 MB fp32 all-reduce, 2 ranks, link {link}: {fmt_q(quantiles(probe), 1, 1)} ms "
                  f"(median [IQR] of the launches' medians{issue})")
        print(table(headers, rows, title))
    print("\nVR B/elem/step: payload of the VR source's (g^2[, g]) reductions per optimizer step per model element, "
          "mean over the timed steps (k10: over whole blocks); exposed VR wait: time blocked in their work.wait(), "
          "VRLAMB, max over ranks; DeepSpeed: its gradient reduction + its parameter all-gathers (input payload "
          "of each call, i.e. this rank's shard for an all-gather).")

    rows = []
    for r in runs:
        for name, e in r["summary"]["engines"].items():
            b = e["bytes_per_element_per_step"]
            stat, held = e["vr_bytes_per_element_statistics_step"], e["vr_bytes_per_element_held_step"]
            doc = e["documented_vr_bytes_per_element_statistics_step"]
            if name == "LAMB":
                check = "ok (none)" if b["vr"] == 0 else "VR traffic with vr off"
            elif stat is None:
                check = "no statistics step timed" + (" (held: 0)" if held == 0 else "")
            else:
                check = "ok" if doc is not None and abs(stat - doc) < 1e-6 else f"MISMATCH (doc {doc})"
                if held not in (None, 0):
                    check += f"; held steps {held:.3f}, expected 0"
            if not e["source_counter_equals_counted"]:
                check += "; source counter differs"
            if not e["ranks_count_the_same_vr_bytes"]:
                check += "; ranks differ"
            rows.append([r["link"], _cfg(r["stage"], r["precision"], r["gas"]), name, e["wrapper"],
                         e["documented_row"] or "-",
                         "-" if stat is None else f"{stat:.3f}", "-" if held is None else f"{held:.3f}",
                         "-" if doc is None else f"{doc:g}", f"{b['source']:.3f}",
                         f"{e['vr_calls_per_step']:.1f}",
                         f"{e['layer_sum_bytes_per_step']:.0f} / {e['layer_sum_calls_per_step']:.1f}",
                         f"{b['ds_grad']:.3f}", f"{b['ds_gather']:.3f}", check])
    print()
    print(table(["link", "configuration", "engine", "wrapper", "docs/costs.md row", "VR B/elem (stats step)",
                 "VR B/elem (held step)", "documented", "source counter B/elem/step", "VR calls/step",
                 "per-layer sums B / calls per step", "DS grad B/elem/step", "DS gather B/elem/step",
                 "check"], rows, "Traffic per optimizer step, counted on rank 0, against docs/costs.md "
                                 "(\"Traffic per step, by configuration\")"))

    print("\nThe issue's targets")
    for line in results["targets"]:
        print(f"  {line['text']}: {line['verdict']}")
    for r in failed:
        print(f"\nFAILED: link {r['link']}, {_cfg(r['stage'], r['precision'], r['gas'])}: {r['meta'].get('error')}")


def check_targets(results: dict) -> list[dict]:
    out = []
    for link, stage, precision, gas, engine, bound in TARGETS:
        text = f"{link}, ZeRO-{stage}, {precision}, GA {gas}: {engine}/LAMB <= {bound:.2f}"
        found = [r for r in results["runs"] if r.get("summary") and (r["link"], r["stage"], r["precision"],
                                                                     r["gas"]) == (link, stage, precision, gas)]
        entry = found[0]["summary"]["engines"].get(engine) if found else None
        if entry is None or "over_LAMB" not in entry:
            out.append({"text": text, "verdict": "not measured", "median": None, "holds": None})
            continue
        q = entry["over_LAMB"]
        holds = q["median"] <= bound
        out.append({"text": text, "median": q["median"], "holds": holds,
                    "verdict": f"measured {fmt_q(q)} (median [IQR] of {q['n']} blocks) -> "
                               f"{'holds' if holds else 'does NOT hold'}"})
    return out


def _csv(value: str, cast=str) -> list:
    return [cast(v.strip()) for v in value.split(",") if v.strip()]


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def driver(args) -> None:
    links = _csv(args.links)
    for link in links:
        if link != UNSHAPED and not re.fullmatch(r"\d+(\.\d+)?[kmg]bit", link):
            raise SystemExit(f"slow_link.py: unknown link {link!r}: 'unshaped' or a tc rate such as 5gbit, 500mbit")
    stages, precisions, gases = _csv(args.stages, int), _csv(args.precisions), _csv(args.gas, int)
    shaped = [link for link in links if link != UNSHAPED]
    if shaped:
        preflight(args.netns, shaped[0])
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    json_path = os.path.join(HERE, "results", "slow_link.json")
    log_path = os.path.join(HERE, "results", "slow_link.log")
    command = "python benchmarks/slow_link.py " + " ".join(sys.argv[1:])
    print(f"$ {command}", flush=True)
    results = {"command": command, "argv": sys.argv, "cwd": os.getcwd(), "machine": machine(), "complete": False,
               "settings": {"links": links, "stages": stages, "precisions": precisions, "gas": gases,
                            "model": f"BERT-{PRESET}", "micro_batch": args.micro_batch, "seq": args.seq,
                            "reduce_bucket_size": int(args.bucket), "gradient_clipping": 1.0, "ranks": 2,
                            "block": args.block, "blocks": args.blocks, "warmup_blocks": args.warmup_blocks,
                            "engines": ["LAMB", "VRLAMB", "VRLAMB-k10"]
                            + (["VRLAMB-alt"] if args.local else []),
                            "netns": args.netns, "tbf": TBF, "probe_numel": PROBE_NUMEL},
               "links": {}, "runs": []}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    with open(log_path, "w") as log:
        log.write(f"$ {command}\n")
        for link in links:
            netns = None if link == UNSHAPED else args.netns
            try:
                if netns:
                    netns_create(netns, link)
                    print(f"[{link}] network namespace {netns}: lo tbf rate {link} {TBF}", flush=True)
                for stage, precision, gas in itertools.product(stages, precisions, gases):
                    engines = ["LAMB", "VRLAMB", "VRLAMB-k10"] + (["VRLAMB-alt"] if args.local else [])
                    worker_args = ["--stage", str(stage), "--precision", precision, "--gas", str(gas),
                                   "--engines", ",".join(engines), "--block", str(args.block),
                                   "--blocks", str(args.blocks), "--warmup-blocks", str(args.warmup_blocks),
                                   "--micro-batch", str(args.micro_batch), "--seq", str(args.seq),
                                   "--bucket", str(int(args.bucket)), "--probe-repeats", str(args.probe_repeats),
                                   "--link", link]
                    got = launch(worker_args, netns, log, args.launch_timeout)
                    run = {"link": link, "stage": stage, "precision": precision, "gas": gas, "engines": engines,
                           "meta": got["meta"], "raw": got["result"]}
                    if got["result"] is not None:
                        run["summary"] = summarise(got)
                        probe = run["summary"]["probe_ms"]["median"]
                        results["links"].setdefault(link, {"allreduce_40MB_ms": []})["allreduce_40MB_ms"].append(probe)
                        e = run["summary"]["engines"]
                        print(f"  40 MB all-reduce {probe:.1f} ms; LAMB {e['LAMB']['step_s']['median'] * 1e3:.0f} ms; "
                              + "; ".join(f"{n}/LAMB {fmt_q(x['over_LAMB'])}" for n, x in e.items() if "over_LAMB" in x),
                              flush=True)
                    results["runs"].append(run)
                    results["targets"] = check_targets(results)
                    write_json(json_path, results)  # after every launch: a long run keeps what it has
            finally:
                if netns:
                    netns_delete(netns)
                    print(f"[{link}] network namespace {netns} deleted", flush=True)
    results["complete"] = True
    results["targets"] = check_targets(results)
    write_json(json_path, results)
    report(results)
    print(f"\nwrote {json_path} (launcher output: {log_path})")
    if any(not r.get("summary") for r in results["runs"]):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", default=None, help="comma-separated: unshaped, 5gbit, 2gbit (any tc rate); "
                                                      "default all three (--quick: unshaped)")
    parser.add_argument("--stages", default=None, help="ZeRO stages, default 1,2,3 (--quick: 2)")
    parser.add_argument("--precisions", default=None, help="bf16,fp32 (--quick: bf16)")
    parser.add_argument("--gas", default=None, help="gradient accumulation steps, default 1,4 (--quick: 4)")
    parser.add_argument("--local", action="store_true", help='add "VRLAMB-alt": "vrgd": {"local_sums": true} at '
                                                             "ZeRO 2/3, false at ZeRO 1")
    parser.add_argument("--block", type=int, default=None, help="steps per block (default 10; --quick: 3)")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks per engine (default 3; --quick: 1)")
    parser.add_argument("--warmup-blocks", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 timed block of 3 steps, one configuration "
                                                             "(ZeRO-2 bf16 GA 4 unless given)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--bucket", type=float, default=5e6, help="reduce_bucket_size (elements)")
    parser.add_argument("--probe-repeats", type=int, default=5, help="timed 40 MB all-reduces per launch")
    parser.add_argument("--netns", default=NETNS, help="name of the network namespace (removed if stale)")
    parser.add_argument("--launch-timeout", type=float, default=7200.0, help="seconds before a launch is ended")
    # worker side
    parser.add_argument("--worker", action="store_true", help="(internal) run as a rank under the deepspeed launcher")
    parser.add_argument("--stage", type=int, default=2, help="(worker)")
    parser.add_argument("--precision", default="bf16", help="(worker)")
    parser.add_argument("--engines", default="LAMB,VRLAMB,VRLAMB-k10", help="(worker)")
    parser.add_argument("--link", default=UNSHAPED, help="(worker) label only")
    parser.add_argument("--out", default=None, help="(worker)")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    if args.worker:
        args.gas = int(args.gas)
        worker_main(args)
        return
    quick = args.quick
    args.links = args.links or (UNSHAPED if quick else ",".join(LINKS))
    args.stages = args.stages or ("2" if quick else "1,2,3")
    args.precisions = args.precisions or ("bf16" if quick else "bf16,fp32")
    args.gas = args.gas or ("4" if quick else "1,4")
    args.block = args.block or (3 if quick else 10)
    args.blocks = args.blocks or (1 if quick else 3)
    try:
        driver(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the ranks were ended and the network namespace deleted; benchmarks/results/"
              "slow_link.json holds the launches completed so far, if any", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
