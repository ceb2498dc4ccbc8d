"""BERT pretraining (ds_vrgd.pretrain.train, launch/, ds_configs/): validation, schedule, data order, and
end-to-end runs on CPU with the real launchers (deepspeed, accelerate) on 2 ranks under ZeRO-2."""

from __future__ import annotations

import json
import math
import shutil
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from ds_vrgd.pretrain import data, plan, report, train
from ds_vrgd.pretrain.corpus import open_corpus
from ds_vrgd.pretrain.models import MaskedPositionsMLM, build_bert_mlm
from tests.support import REPO
from tests.support.launching import deepspeed_launch, free_port, run_in_repo, succeeded

CONFIGS = REPO / "ds_configs"
SUMMARY_FIELDS = ("optimizer", "zero_stage", "world_size", "global_batch_size", "steps", "initial_train_loss",
                  "final_train_loss", "eval_mlm_loss", "eval_mlm_accuracy", "samples_per_second")


# --------------------------------------------------------------------------- helpers


def prepare(output: Path, max_seq_len: int, **options) -> Path:
    """Prepared data from a slice of the default corpus (vocabulary 1000)."""
    options = data.PrepareOptions(vocab_size=1000, max_seq_len=max_seq_len, heldout_fraction=0.1, **options)
    data.prepare_pretraining_data(output, open_corpus(max_bytes=150_000), options)
    return output


def small_config(path: Path, base: str = "cpu_demo_zero2_vrlamb.json", **recipe) -> Path:
    """A repo config with a CPU-test batch (4 per rank x 2 accumulation x 2 ranks) and ``recipe`` changes."""
    config = json.loads((CONFIGS / base).read_text())
    config.update(train_batch_size=16, train_micro_batch_size_per_gpu=4)
    config["ds_vrgd"].update(recipe)
    path.write_text(json.dumps(config))
    return path


def args(data_dir, config, output, *extra: str) -> list[str]:
    return ["--data", str(data_dir), "--deepspeed_config", str(config), "--output", str(output), *extra]


def deepspeed(*trainer_args) -> list:
    return deepspeed_launch(2, "--module", "ds_vrgd.pretrain", *trainer_args)


def summary_of(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())


def module_state(output: Path) -> dict:
    """The module weights of a run's latest checkpoint."""
    checkpoints = output / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    return torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def distance(a: dict, b: dict) -> float:
    """Euclidean distance between two state dicts."""
    return math.sqrt(sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a))


def phase1_vocab(output: Path) -> int:
    return json.loads((output / "phase1" / "run.json").read_text())["meta"]["vocab_size"]


@pytest.fixture(scope="module")
def seq32(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("data") / "seq32", 32)


@pytest.fixture(scope="module")
def seq64(tmp_path_factory, seq32):
    return prepare(tmp_path_factory.mktemp("data") / "seq64", 64, tokenizer=str(seq32 / "tokenizer"))


# --------------------------------------------------------------------------- configs


def recipe_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.json") if plan.RECIPE_KEY in json.loads(p.read_text()))


def fake_data(tmp_path: Path, recipe: dict) -> Path:
    """A data directory whose meta.json fits a recipe (plan_run reads only meta.json)."""
    seq = recipe["max_seq_len"]
    meta = {"max_seq_len": seq, "vocab_size": 30522, "counts": {"train": {"rows": 10**9}},
            "masking_spec": {"max_predictions": recipe.get("max_predictions", data.default_max_predictions(seq))}}
    directory = tmp_path / f"seq{seq}"
    directory.mkdir(exist_ok=True)
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.mark.parametrize("path", sorted(set(CONFIGS.glob("*.json")) - set(recipe_configs())), ids=lambda p: p.stem)
def test_other_configs_validate_at_two_ranks(path):
    """Configs without a recipe: the trainer's optimizer and batch checks; Hugging Face Trainer fills "auto"
    values (ds_configs/hf_*.json, exercised by tests/integrations/test_hf_*.py)."""
    config = plan.load_ds_config(path)
    if "auto" in json.dumps(config):
        assert path.name.startswith("hf_")
        return
    assert plan.check_optimizer(config, str(path))[0] == config["optimizer"]["type"]
    plan.batch_sizes(config, 2, str(path))


@pytest.mark.parametrize("path", recipe_configs(), ids=lambda p: p.stem)
def test_recipe_config_plans_at_its_world_sizes(tmp_path, path):
    config = json.loads(path.read_text())
    recipe = config[plan.RECIPE_KEY]
    reference = recipe["reference_world_size"]
    for world in sorted({reference, 8, 64} if reference > 2 else {reference}):
        run = plan.plan_run(train.parse_args(args(fake_data(tmp_path, recipe), path, tmp_path / "run")), world)
        assert run.global_batch == config["train_batch_size"] == run.micro_batch * run.gas * world
        assert (run.model, run.steps, run.seq_len) == (recipe["model"], recipe["steps"], recipe["max_seq_len"])
        assert (run.warmup_proportion, run.decay_power) == (recipe["warmup_proportion"], recipe["decay_power"])
        assert run.optimizer == "VRLAMB" and run.peak_lr == config["optimizer"]["params"]["lr"]


NVIDIA = {1: dict(train_batch_size=65536, lr=6e-3, warmup_proportion=0.2843, steps=7038, max_seq_len=128,
                  max_predictions=20),
          2: dict(train_batch_size=32768, lr=4e-3, warmup_proportion=0.128, steps=1563, max_seq_len=512,
                  max_predictions=80)}  # NVIDIA's phase-2 recipe


@pytest.mark.parametrize("model", ["base", "large"])
@pytest.mark.parametrize("phase", [1, 2])
def test_gpu_recipes_mirror_nvidia_and_the_vrgd_scale(model, phase):
    def load(batch, optimizer):
        config = json.loads((CONFIGS / f"bert_{model}_phase{phase}_{batch}_{optimizer}.json").read_text())
        flat = {**config, **config.pop(plan.RECIPE_KEY), **config["optimizer"]["params"]}
        return config, flat

    nvidia, base = NVIDIA[phase], NVIDIA[phase]["train_batch_size"] // 1024
    for batch, scale in ((f"{base}k", 1), (f"{2 * base}k", 2)):
        (vr_config, vr), (lamb_config, lamb) = load(batch, "vrlamb"), load(batch, "lamb")
        assert vr["train_batch_size"] == scale * nvidia["train_batch_size"]
        assert vr["steps"] == math.ceil(nvidia["steps"] / scale)  # the same number of epochs
        assert vr["lr"] == pytest.approx(nvidia["lr"] * math.sqrt(scale), rel=1e-3)  # square-root scaled at 2x
        for key in ("warmup_proportion", "max_seq_len", "max_predictions"):
            assert vr[key] == nvidia[key]
        assert (vr["decay_power"], vr["betas"], vr["eps"], vr["weight_decay"]) == (0.5, [0.9, 0.999], 1e-6, 0.01)
        assert vr_config["gradient_clipping"] == 1.0 and vr_config["zero_optimization"]["stage"] == 2
        assert vr["gamma"] == 0.1 and lamb["vr"] is False and "vr" not in vr
        for config in (vr_config, lamb_config):  # the twins differ only in the GSNR switch and their names
            config["optimizer"]["params"] = {k: v for k, v in config["optimizer"]["params"].items()
                                             if k not in ("gamma", "vr")}
            config.pop("tensorboard")
        assert vr_config == lamb_config


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def refuse_to_train(monkeypatch):
    """Fail the test if main() gets past validation."""
    monkeypatch.setattr(train, "train", lambda plan: pytest.fail("validation passed; training started"))


def config_with(tmp_path, **changes) -> Path:
    config = json.loads((CONFIGS / "cpu_demo_zero2_vrlamb.json").read_text())
    config.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


BAD_INPUTS = {
    "missing data": (lambda d, c, t: (t / "nothing", c, 2), r"is not a prepared pretraining data directory \(no meta.json\); "
                     "create it with `python -m ds_vrgd.pretrain.data"),
    "missing config": (lambda d, c, t: (d, t / "nope.json", 2), "does not exist; pass --deepspeed_config"),
    "batch does not divide": (lambda d, c, t: (d, c, 3), "train_batch_size 64 is not divisible by "
                              "train_micro_batch_size_per_gpu 16 x world size 3 = 48; choose a train_batch_size"),
    "unknown optimizer": (lambda d, c, t: (d, config_with(t, optimizer={"type": "LAMBB", "params": {"lr": 1e-3}}), 2),
                          "unknown optimizer type 'LAMBB'; set \"optimizer\": {\"type\": ...} to one of VRSGD"),
    "unknown optimizer option": (lambda d, c, t: (d, config_with(t, optimizer={"type": "VRLAMB", "params": {
        "lr": 1e-3, "gama": 0.1}}), 2), r"VRLAMB got unknown option\(s\) \['gama'\]; valid options are"),
    "recipe for other data": (lambda d, c, t: (d, c, 2), "is a recipe with max_seq_len 128 but .* has max_seq_len 32; "
                              "use the config of that phase, or prepare the data with --max-seq-len 128"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input_is_named_with_its_fix_before_training(tmp_path, seq32, refuse_to_train, monkeypatch, case):
    make, message = BAD_INPUTS[case]
    data_dir, config, world = make(seq32, CONFIGS / "cpu_demo_zero2_vrlamb.json", tmp_path)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit, match=message):
        train.main(args(data_dir, config, tmp_path / "run", "--max-steps", "2"))


def test_sequences_longer_than_the_model_are_refused(tmp_path, refuse_to_train, monkeypatch):
    recipe = {"max_seq_len": 1024, "model": "tiny"}
    config = small_config(tmp_path / "c.json", max_seq_len=1024)
    with pytest.raises(SystemExit, match="max_seq_len 1024 exceeds the model's max_position_embeddings 512; "
                                         "prepare data with --max-seq-len <= 512"):
        train.main(args(fake_data(tmp_path, recipe), config, tmp_path / "run"))


def test_an_existing_run_is_neither_mixed_nor_lost(tmp_path, seq32, refuse_to_train, monkeypatch):
    output = tmp_path / "run"
    (output / "checkpoints").mkdir(parents=True)
    (output / "checkpoints" / "latest").write_text("step3")
    (output / "run.json").write_text(json.dumps({"world_size": 4, "micro_batch": 4}))
    config = small_config(tmp_path / "c.json", max_seq_len=32)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="holds an interrupted run .*; pass --resume to continue it"):
        train.main(args(seq32, config, output))
    with pytest.raises(SystemExit, match="was trained on 4 ranks .* resume with the same number of ranks"):
        train.main(args(seq32, config, output, "--resume"))
    with pytest.raises(SystemExit, match="--resume and --overwrite contradict each other"):
        train.main(args(seq32, config, output, "--resume", "--overwrite"))
    assert (output / "checkpoints" / "latest").read_text() == "step3"


def test_a_missing_dependency_is_named_with_its_extra(tmp_path, seq32, refuse_to_train, monkeypatch):
    monkeypatch.setattr(plan, "NEEDED_MODULES", ("matplotlib", "no_such_module"))
    with pytest.raises(SystemExit, match=r"needs no_such_module; pip install 'ds-vrgd\[all\]'"):
        train.main(args(seq32, CONFIGS / "cpu_demo_zero2_vrlamb.json", tmp_path / "run"))


def test_command_line_error_exits_nonzero_without_traceback(tmp_path, seq32):
    config = config_with(tmp_path, optimizer={"type": "NoSuchOptimizer", "params": {"lr": 1e-3}})
    done = run_in_repo([sys.executable, "-m", "ds_vrgd.pretrain", *args(seq32, config, tmp_path / "run")])
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "error: " in done.stderr and "unknown optimizer type 'NoSuchOptimizer'" in done.stderr


# --------------------------------------------------------------------------- schedule, data order, model


def test_schedule_is_nvidia_poly_warmup():
    factor = train.warmup_poly_decay(steps=100, warmup_proportion=0.25, power=0.5)
    # step t runs at progress (t + 1) / steps: linear up to the warmup, then (1 - progress) ** power
    assert factor(0) == pytest.approx(0.01 / 0.25) and factor(23) == pytest.approx(0.24 / 0.25)
    assert factor(24) == pytest.approx(0.75**0.5) and factor(50) == pytest.approx(0.49**0.5)
    assert factor(99) == 0.0
    # as NVIDIA's, the decay starts at (1 - warmup) ** power of the peak, below the last warmup step
    assert max(range(100), key=factor) == 23 and all(factor(t) > factor(t + 1) for t in range(23, 99))


def test_micro_batch_order_resumes_at_any_position_and_splits_ranks():
    def order(rank, start, count):
        return list(islice(train.rank_micro_batches(50, rank, 2, 4, seed=3, start=start), count))

    whole = order(0, 0, 20)  # 6 micro-batches per epoch: spans three epochs
    for start in (1, 6, 13):
        assert order(0, start, 20 - start) == whole[start:]
    epoch = [set(sum(order(rank, 0, 6), [])) for rank in (0, 1)]
    assert not epoch[0] & epoch[1] and len(epoch[0]) == len(epoch[1]) == 24
    assert sum(whole[:6], []) != sum(whole[6:12], [])  # each epoch is reshuffled


def test_reseeded_dynamic_masks_repeat(seq32):
    spec = data.MaskingSpec.from_meta(data.read_meta(seq32))
    rows = [{"input_ids": row["input_ids"]} for row in data.load_pretraining_data(seq32).select(range(8))]
    collator = data.MLMCollator(spec, seed=1, rank=0)

    def masks(step):
        collator.reseed(step)
        return [collator(rows)["labels"] for _ in range(2)]

    at_5 = masks(5)
    masks(6)
    assert all(torch.equal(a, b) for a, b in zip(masks(5), at_5))  # a resumed step draws the same masks
    assert not torch.equal(at_5[0], at_5[1]) and not torch.equal(masks(6)[0], at_5[0])


def test_masked_positions_model_matches_bert_for_masked_lm():
    mlm = build_bert_mlm("tiny", 300, seed=1).eval()
    model = MaskedPositionsMLM(mlm)
    assert model.state_dict().keys() == mlm.state_dict().keys()
    input_ids = torch.randint(5, 300, (3, 16))
    labels = torch.where(torch.rand(3, 16) < 0.2, input_ids, -100)
    logits, targets = model(input_ids=input_ids, labels=labels)
    predicted = labels != -100
    torch.testing.assert_close(logits, mlm(input_ids=input_ids).logits[predicted])
    assert torch.equal(targets, input_ids[predicted])


# --------------------------------------------------------------------------- end to end (2 ranks, ZeRO-2)


@pytest.fixture(scope="module")
def two_phases(tmp_path_factory, seq32, seq64):
    """launch/pretrain_bert.sh, both phases on 2 CPU ranks: 6 steps at seq 32 (checkpoints at 3 and 6), 2 at 64."""
    tmp = tmp_path_factory.mktemp("two_phases")
    env = dict(PHASES="1 2", NUM_GPUS="2", MASTER_PORT=str(free_port()), OUTPUT=str(tmp / "bert"),
               DATA1=str(seq32), DATA2=str(seq64),
               CONFIG1=str(small_config(tmp / "phase1.json", max_seq_len=32, steps=6, warmup_proportion=0.3)),
               CONFIG2=str(small_config(tmp / "phase2.json", max_seq_len=64, steps=2, phase=2)))
    stdout = succeeded(run_in_repo(["bash", REPO / "launch" / "pretrain_bert.sh", "--checkpoint-every", "3",
                            "--eval-every", "3", "--eval-batches", "2"], **env))
    return tmp / "bert", stdout


@pytest.mark.slow
def test_two_phases_with_the_deepspeed_launcher(two_phases):
    output, stdout = two_phases
    phase1, phase2 = summary_of(output / "phase1"), summary_of(output / "phase2")
    for summary in (phase1, phase2):
        assert all(summary[field] is not None for field in SUMMARY_FIELDS)
        assert (summary["optimizer"], summary["vr"], summary["zero_stage"], summary["world_size"]) == ("VRLAMB", True,
                                                                                                       2, 2)
        assert (summary["global_batch_size"], summary["micro_batch_size"], summary["gradient_accumulation_steps"]) \
            == (16, 4, 2)
        assert 0 <= summary["eval_mlm_accuracy"] <= 1 and summary["samples_per_second"] > 0
        assert summary["gsnr"]["gsnr_n"] == 4  # 2 ranks x 2 micro-batches
        assert f"plot: {summary['plot']}" in stdout and Path(summary["plot"]).stat().st_size > 0
    assert (phase1["steps"], phase1["seq_len"], phase2["steps"], phase2["seq_len"]) == (6, 32, 2, 64)
    assert phase1["final_train_loss"] < phase1["initial_train_loss"]
    assert phase2["init_from"] == str(output / "phase1" / "checkpoints")
    # phase 2 starts from phase 1's weights: after its 2 steps it is nearer to them than to the random init
    # (seed 0) that phase 1 started from 6 steps earlier
    fresh = MaskedPositionsMLM(build_bert_mlm("tiny", phase1_vocab(output), seed=0)).state_dict()
    after1, after2 = module_state(output / "phase1"), module_state(output / "phase2")
    assert distance(after2, after1) < 0.5 * distance(after2, fresh)

    records = report.read_records(output / "phase1")
    steps = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(r["gsnr_n"] == 4 and r["b_simple"] > 0 and 0 <= r["gsnr_frac_low"] <= 1 for r in steps)
    assert [r["step"] for r in records if r["event"] == "eval"] == [3, 6]
    lrs = [r["lr"] for r in steps]  # warmup 0.3 of 6 steps: 1 step up, then decay to 0
    assert lrs[1] == max(lrs) and lrs[-1] == 0.0
    monitor = {p.name for p in (output / "phase1" / "monitor").rglob("*.csv")}
    assert {"Train_Samples_loss.csv", "Train_Samples_gsnr_mean.csv", "Train_Samples_b_simple.csv",
            "Eval_Samples_eval_mlm_loss.csv", "Train_Samples_tokens_per_second.csv"} <= monitor


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_result(two_phases, tmp_path):
    done = two_phases[0] / "phase1"
    interrupted = tmp_path / "phase1"
    shutil.copytree(done, interrupted)
    # the state a kill during the step-6 checkpoint leaves: latest still names step 3, step 6 is incomplete,
    # the log runs past step 3
    (interrupted / "checkpoints" / "latest").write_text("step3")
    for partial in (interrupted / "checkpoints" / "step6").glob("*optim_states.pt"):
        partial.unlink()
    for name in ("summary.json", "training.png"):
        (interrupted / name).unlink()
    run_args = json.loads((done / "run.json").read_text())
    succeeded(run_in_repo(deepspeed(*args(run_args["data"], run_args["config_path"], interrupted, "--resume",
                                  "--checkpoint-every", "3", "--eval-batches", "2"))))

    resumed, uninterrupted = module_state(interrupted), module_state(done)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)

    def train_log(output):
        return [(r["step"], r["loss"]) for r in report.read_records(output) if r["event"] == "train"]

    assert [step for step, _ in train_log(interrupted)] == list(range(1, 7))  # no step lost or repeated
    for (step, loss), (_, expected) in zip(train_log(interrupted), train_log(done)):
        assert loss == pytest.approx(expected, rel=1e-6), step
    assert summary_of(interrupted)["final_train_loss"] == pytest.approx(summary_of(done)["final_train_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_deepspeed_optimizer_under_accelerate_launch(tmp_path, port, seq32):
    config = json.loads(small_config(tmp_path / "c.json", max_seq_len=32, steps=4).read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}}
    (tmp_path / "adamw.json").write_text(json.dumps(config))
    env = dict(PHASES="1", NUM_PROCESSES="2", MAIN_PROCESS_PORT=str(port), OUTPUT=str(tmp_path / "run"),
               DATA1=str(seq32), CONFIG1=str(tmp_path / "adamw.json"))
    succeeded(run_in_repo(["bash", REPO / "launch" / "pretrain_bert_accelerate.sh", "--eval-batches", "2"], **env))
    summary = summary_of(tmp_path / "run" / "phase1")
    assert (summary["optimizer"], summary["vr"], summary["world_size"], summary["steps"]) == ("AdamW", None, 2, 4)
    assert summary["final_train_loss"] < summary["initial_train_loss"]
    assert all(value is None for value in summary["gsnr"].values())
    assert Path(summary["plot"]).is_file()


@pytest.mark.slow
def test_launcher_reports_bad_input_on_every_rank_before_starting(tmp_path, seq32):
    config = small_config(tmp_path / "c.json", max_seq_len=32)
    config.write_text(config.read_text().replace('"train_batch_size": 16', '"train_batch_size": 20'))
    done = run_in_repo(deepspeed(*args(seq32, config, tmp_path / "run", "--max-steps", "2")))
    assert done.returncode != 0 and "Traceback" not in done.stdout + done.stderr
    assert "train_batch_size 20 is not divisible by train_micro_batch_size_per_gpu 4 x world size 2" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_demo_script_runs_and_reruns(tmp_path, port):
    env = dict(DEMO_OUTPUT=str(tmp_path / "demo"), MASTER_PORT=str(port), VRGD_VENV=sys.prefix)
    first = succeeded(run_in_repo(["bash", REPO / "launch" / "demo.sh", "--max-steps", "2"], **env))
    meta = tmp_path / "demo" / "data" / "meta.json"
    prepared = meta.stat().st_mtime_ns
    assert "summary: " in first and summary_of(tmp_path / "demo")["steps"] == 2
    second = succeeded(run_in_repo(["bash", REPO / "launch" / "demo.sh", "--max-steps", "3"], **env))
    assert meta.stat().st_mtime_ns == prepared and "wrote " not in second  # the data is reused
    summary = summary_of(tmp_path / "demo")
    assert (summary["optimizer"], summary["zero_stage"], summary["world_size"], summary["steps"]) == ("VRLAMB", 2, 2,
                                                                                                      3)
    assert summary["global_batch_size"] == 64 and summary["seq_len"] == 128 and summary["model"] == "tiny"


@pytest.mark.slow
def test_zero3_and_offload_configs_train_the_zero2_trajectory(tmp_path, seq32):
    """The BERT trainer with the CPU demo's ZeRO-3 and ZeRO-2 + Offload configs: the same per-step losses as
    its ZeRO-2 config (same data, seed and VR samples), checkpoints and the summary included."""
    losses = {}
    for base in ("cpu_demo_zero2_vrlamb.json", "cpu_demo_zero3_vrlamb.json", "cpu_demo_zero2_offload_vrlamb.json"):
        config = small_config(tmp_path / base, base=base, max_seq_len=32, steps=4)
        output = tmp_path / base.removesuffix(".json")
        succeeded(run_in_repo(deepspeed(*args(seq32, config, output, "--checkpoint-every", "2",
                                              "--eval-batches", "2"))))
        summary = summary_of(output)
        assert summary["gsnr"]["gsnr_n"] == 4 and summary["final_train_loss"] < summary["initial_train_loss"]
        losses[base] = [r["loss"] for r in report.read_records(output) if r["event"] == "train"]
    stage2 = losses.pop("cpu_demo_zero2_vrlamb.json")
    for base, trajectory in losses.items():
        assert trajectory == pytest.approx(stage2, rel=1e-5), base
