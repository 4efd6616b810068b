"""Backends are scoped to the calling thread (``kernels.use_backend``), ``set_backend`` is process-wide,
and threads sharing one model get what sequential calls get."""

import threading

import torch
import transformers as T

from trifuse import engine, kernels


def test_use_backend_is_scoped_to_the_thread():
    """Two threads inside use_backend blocks at the same time each see their own backend; blocks that
    end in the other order than they began leave the process-wide backend as it was."""
    both_inside, first_done = threading.Barrier(2), threading.Event()
    seen = {}

    def run(name, backend):
        with kernels.use_backend(backend):
            both_inside.wait(timeout=60)
            seen[name] = kernels.get_backend()
            if name == "b":
                first_done.set()  # b leaves first although it entered second
            else:
                first_done.wait(timeout=60)
        seen[name + "-after"] = kernels.get_backend()

    threads = [threading.Thread(target=run, args=("a", "reference")),
               threading.Thread(target=run, args=("b", "triton"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert seen == {"a": "reference", "b": "triton", "a-after": "auto", "b-after": "auto"}
    assert kernels.get_backend() == "auto"
    with kernels.use_backend("reference"):  # a thread started inside a block gets the process-wide backend
        inner = []
        t = threading.Thread(target=lambda: inner.append(kernels.get_backend()))
        t.start()
        t.join(timeout=60)
        assert inner == ["auto"] and kernels.get_backend() == "reference"


def test_set_backend_stays_process_wide():
    try:
        done = []
        t = threading.Thread(target=lambda: (kernels.set_backend("reference"), done.append(1)))
        t.start()
        t.join(timeout=60)
        assert done and kernels.get_backend() == "reference"
    finally:
        kernels.set_backend("auto")


def test_threads_sharing_one_model_match_sequential_calls():
    """Eight threads, one GPT-2, each generating for its own prompt on the reference path."""
    torch.manual_seed(0)
    hf = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    model = engine.from_pretrained(hf)
    prompts = [torch.randint(0, 99, (1 + i % 3, 3 + i)) for i in range(8)]

    def work(p):
        with kernels.use_backend("reference"):
            return model(p).logits, model.generate(p, max_new_tokens=6, eos_token_id=[])

    sequential = [work(p) for p in prompts]
    results = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i):
        start.wait(timeout=60)
        for _ in range(3):
            results[i] = work(prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for (logits, tokens), (want_logits, want_tokens) in zip(results, sequential):
        torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
        assert torch.equal(tokens, want_tokens)
    assert kernels.get_backend() == "auto"
