"""Bad input is a clear error before any work starts: devices that are not there or not devices,
empty batches, bool ids."""

import pytest
import torch

from tests import tiny_models as tiny
from trifuse import engine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA is not available"):
            engine.from_pretrained(tiny.bert(), device=device)


def test_device_that_is_not_a_device():
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        engine.from_pretrained(tiny.bert(), device="gpu")


def test_empty_batches_and_bool_ids_are_named_errors_before_any_work(reference_backend):
    model = engine.from_pretrained(tiny.bert())
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(0, 5\)\)"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor .* got torch.bool"):
        model(torch.ones(2, 5, dtype=torch.bool))
