"""Shape buckets and CUDA graphs: padded runs compute what unpadded runs compute."""

import pytest
import torch

from tests.helpers import OUTPUT_FIELDS
from tests.test_bert import batch, hf_model
from tests.test_vit import CONFIGS as VIT_CONFIGS
from tests.test_vit import hf_model as vit_hf_model
from tests.test_vit import pixels
from trifuse import engine
from trifuse.engine.graphs import BucketedModel, CUDAGraphModel


def _assert_outputs_equal(a, b, atol=2e-5, rtol=2e-5):
    names = [f for f in OUTPUT_FIELDS if f in b.keys()]
    assert names and [f for f in OUTPUT_FIELDS if f in a.keys()] == names
    for name in names:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                                  "ForMaskedLM", "Model"])
def test_bucketed_text_model_equals_unpadded(head, reference_backend):
    model = engine.from_pretrained(hf_model("roberta", head))
    bucketed = BucketedModel(model, batch_sizes=(1, 4), seq_lengths=(8, 16, 32))
    ids, mask = batch(model.config, b=3, n=13)
    assert bucketed.bucket_of(3, 13) == (4, 16)
    with torch.no_grad():
        _assert_outputs_equal(bucketed(ids, attention_mask=mask), model(ids, attention_mask=mask))
        # Without a mask: everything attended, as in the plain call.
        _assert_outputs_equal(bucketed(ids[:1]), model(ids[:1]))


def test_bucketed_hidden_states_and_overflow(reference_backend):
    model = engine.from_pretrained(hf_model("bert", "Model"))
    bucketed = BucketedModel(model, batch_sizes=(2,), seq_lengths=(16,))
    ids, mask = batch(model.config, b=2, n=11)
    with torch.no_grad():
        out = model.forward(ids, mask)
        assert bucketed.bucket_of(3, 11) is None and bucketed.bucket_of(2, 17) is None
        _assert_outputs_equal(bucketed(ids.repeat(2, 1), attention_mask=mask.repeat(2, 1)),
                              model(ids.repeat(2, 1), attention_mask=mask.repeat(2, 1)))  # beyond: unpadded
    with pytest.raises(ValueError, match="token ids must lie in"):
        bucketed(ids + 1000, attention_mask=mask)
    # validate=False only skips the wrapper's check; an eager run still meets the model's own
    # (a graph replay would not: that is the sync validate=False saves).
    unchecked = BucketedModel(model, batch_sizes=(2,), seq_lengths=(16,), validate=False)
    with pytest.raises(ValueError, match="token ids must lie in"):
        unchecked(ids + 1000, attention_mask=mask)
    with pytest.raises(ValueError, match="bucketed runs take only"):
        bucketed(ids, position_ids=ids)
    assert out.last_hidden_state.shape == (2, 11, 64)


def test_bucketed_vision_model_pads_the_batch(reference_backend):
    name = next(iter(VIT_CONFIGS))
    model = engine.from_pretrained(vit_hf_model(name, "ForImageClassification"))
    bucketed = BucketedModel(model, batch_sizes=(1, 4))
    x = pixels(model.config, b=3)
    assert bucketed.bucket_of(3) == (4, 0)
    with torch.no_grad():
        _assert_outputs_equal(bucketed(x), model(x))


def test_cuda_graphs_need_cuda():
    model = engine.from_pretrained(hf_model("bert", "Model"))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        CUDAGraphModel(model)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graphs_match_eager(dtype):
    model = engine.from_pretrained(hf_model("bert", "ForTokenClassification"), dtype=dtype, device="cuda")
    graphed = CUDAGraphModel(model, batch_sizes=(1, 4), seq_lengths=(16, 32))
    for seed in range(3):  # new data through the same captured bucket
        ids, mask = batch(model.config, b=3, n=13, seed=seed)
        ids, mask = ids.cuda(), mask.cuda()
        with torch.no_grad():
            _assert_outputs_equal(graphed(ids, attention_mask=mask), model(ids, attention_mask=mask),
                                  atol=2e-2, rtol=2e-2)
    assert list(graphed.graphs) == [(4, 16)]


@pytest.mark.gpu
def test_cuda_graphs_vision():
    name = next(iter(VIT_CONFIGS))
    model = engine.from_pretrained(vit_hf_model(name, "Model"), dtype=torch.float16, device="cuda")
    graphed = CUDAGraphModel(model, batch_sizes=(2, 8))
    x = pixels(model.config, b=5).cuda().half()
    with torch.no_grad():
        _assert_outputs_equal(graphed(x), model(x), atol=2e-2, rtol=2e-2)
