"""The training experiments of benchmarks/ on tiny inputs: their core functions and smallest paths."""

from __future__ import annotations

import pytest
import torch

from ds_vrgd.optim import VRSGD
from ds_vrgd.pretrain.corpus import open_corpus
from ds_vrgd.pretrain.data import PrepareOptions, prepare_pretraining_data
from ds_vrgd.pretrain.models import MaskedPositionsMLM, build_bert_mlm
from ds_vrgd.pretrain.train import mlm_loss

# benchmarks/ is on pytest's pythonpath (pyproject.toml), as it is on sys.path when a benchmark script runs
import _experiments
import generalization_digits
import mlm_large_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory) -> str:
    """Dynamic-masked seq-32 data from 60 kB of the default corpus."""
    out = tmp_path_factory.mktemp("mlm") / "data"
    options = PrepareOptions(vocab_size=500, max_seq_len=32, masking="dynamic", heldout_fraction=0.1)
    prepare_pretraining_data(out, open_corpus(max_bytes=60_000), options)
    return str(out)


def test_masked_head_loss_equals_full_head_loss():
    mlm = build_bert_mlm("tiny", 300, seed=0).eval()
    input_ids = torch.randint(5, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(4, 24, generator=torch.Generator().manual_seed(1)) < 0.15, input_ids, -100)
    loss, sums = mlm_loss(*MaskedPositionsMLM(mlm)(input_ids, labels))
    torch.testing.assert_close(loss, mlm(input_ids=input_ids, labels=labels).loss)
    assert sums[2] == (labels != -100).sum()


@pytest.mark.parametrize("vr", [True, False])
def test_accumulated_step_takes_n_samples_of_the_batch_gradient(vr):
    """n backward passes are n GSNR samples; with vr=False the step is torch SGD's on the whole batch."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    model, reference = torch.nn.Linear(5, 1), torch.nn.Linear(5, 1)
    reference.load_state_dict(model.state_dict())
    optimizer = VRSGD(model.parameters(), lr=0.1, vr=vr)

    def loss_of(rows):
        return torch.nn.functional.mse_loss(model(x[rows]), y[rows])

    mean_loss = _experiments.accumulated_step(optimizer, list(torch.arange(32).chunk(4)), loss_of)
    batch_loss = torch.nn.functional.mse_loss(reference(x), y)
    batch_loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert mean_loss == pytest.approx(batch_loss.item(), rel=1e-5)
    assert optimizer.gsnr_stats()["n"] == (4 if vr else 0)
    assert all(p.grad is None for p in model.parameters())
    for p, q in zip(model.parameters(), reference.parameters()):
        if vr:  # rho in [0.9, 1.1]: within 10% of SGD's step
            assert torch.all((p - q).abs() <= 0.1 * 0.1 * q.grad.abs() + 1e-6)
        else:
            torch.testing.assert_close(p, q)


def test_generated_block_is_replaced_or_appended():
    text = _experiments.replace_generated_block("# R\n", "a", "one")
    assert text == "# R\n\n<!-- generated:a -->\none\n<!-- /generated:a -->\n"
    assert _experiments.replace_generated_block(text + "tail\n", "a", "two") == text.replace("one", "two") + "tail\n"


def test_steps_to_target_interpolates_between_evaluations():
    curve = [{"step": 0, "heldout_loss": 9.0}, {"step": 10, "heldout_loss": 5.0}, {"step": 20, "heldout_loss": 3.0}]
    assert mlm_large_batch.steps_to_target(curve, 4.0) == pytest.approx(15.0)
    assert mlm_large_batch.steps_to_target(curve, 2.0) is None


def test_mlm_run_smallest_path(mlm_data):
    spec = mlm_large_batch.RunSpec(optimizer="VRLAMB", batch=8, n=4, gamma=0.1, lr=1e-3, seed=0, samples=16,
                                   preset="tiny", seq_len=32)
    record = mlm_large_batch.train_run((spec, mlm_data, 1))
    assert [point["step"] for point in record["curve"]] == [0, 2]
    assert record["curve"][-1]["n"] == 4
    assert record["final"]["gap_loss"] == pytest.approx(record["final"]["heldout_loss"] - record["final"]["train_loss"])


def test_digits_run_smallest_path():
    spec = generalization_digits.DigitsRun(rule="Adam", vr=True, batch=640, n=4, gamma=0.1, lr=1e-3, seed=0,
                                           budget="epochs", length=1)
    record = generalization_digits.train_digits(spec)
    assert record["steps"] == 2 and 0 <= record["test_acc"] <= 1
    assert record["gap_acc"] == pytest.approx(record["train_acc"] - record["test_acc"])
