"""GSNR on a real BERT on CUDA equals the float64 evaluation of the estimator (docs/design.md §3).

tests/math/test_gsnr_real_bert.py's plain-PyTorch test with the model, the samples and the optimizer on the
GPU: BertForMaskedLM "tiny" (tied word embeddings) on the embedded corpus, at initialisation and after 30
AdamW steps, n micro-batch backward() calls in fp32, bf16 and fp16 (loss-scaled). A tensor hook records the
very gradients the optimizer captured (CUDA's atomic-add backward kernels need not give the same bits in a
second pass), and the float64 reference (tests/support/reference.py) takes them. The bar is the CPU test's:
|rho - rho_ref| <= 1e-3 for >= 99.9% of the elements in fp32 and >= 99% in bf16/fp16, and every layer's mean
GSNR within 1% of float64 (fp32).
"""

import pytest

from tests.gpu.cuda import MARKS, on_device
from tests.math.test_gsnr_real_bert import (
    MICRO_BATCH, assert_matches, layer_means, loss_scale, model_in, record_samples, recording_optimizer, reference,
    whole_param_rho,
)
from tests.support.real_bert import bert_batches, init_and_trained, mlm_loss

pytestmark = MARKS

DEVICE = "cuda"


@pytest.fixture(scope="module")
def batches():
    return bert_batches()


@pytest.fixture(scope="module")
def states(batches):
    """'init' and 'trained' (30 AdamW steps, here on the GPU) state dicts, fp32, on the CPU."""
    return init_and_trained(batches, device=DEVICE, train_batches=on_device(batches, DEVICE))


CASES = [pytest.param(state, n, precision, None, id=f"{state}-n{n}-{precision}")
         for state in ("init", "trained") for n in (4, 8, 16) for precision in ("fp32", "bf16", "fp16")]
CASES += [pytest.param("trained", 8, precision, False, id=f"trained-n8-{precision}-loop")
          for precision in ("fp32", "bf16")]


@pytest.mark.parametrize("state,n,precision,foreach", CASES)
def test_plain_pytorch_on_cuda_matches_float64(batches, states, state, n, precision, foreach):
    """foreach None: the accelerator default (multi-tensor kernels); False: the per-tensor loop on the GPU."""
    model = model_in(batches, states[state], precision).to(DEVICE)
    data = on_device(batches, DEVICE)
    optimizer = recording_optimizer(model.named_parameters(), foreach=foreach)
    samples = record_samples(model.named_parameters())
    for i in range(n):
        (mlm_loss(model, data.micro_batch(i, MICRO_BATCH)) * loss_scale(precision)).backward()
    optimizer.step()
    assert all(r.is_cuda for _, r in optimizer.recorded), "rho was computed on the GPU"
    samples = {name: [x.cpu() for x in xs] for name, xs in samples.items()}
    assert all(len(xs) == n for xs in samples.values())
    names = {id(p): name for name, p in model.named_parameters()}
    stats = optimizer.gsnr_stats()
    assert stats["n"] == n
    assert_matches(whole_param_rho(optimizer.recorded, names), layer_means(stats, list(samples)),
                   reference(samples), precision)
