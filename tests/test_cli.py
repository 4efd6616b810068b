"""The CLI: documented combinations work, bad input is one line on stderr and exit status 2, and no
partial output is left behind."""

import pytest
import torch

from tests import tiny_models as tiny


def _cli(capsys, *argv):
    """``(exit status, stdout, stderr lines)`` of ``trifuse ARGV`` run in this process."""
    from trifuse.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "ckpt"
    tiny.bert().save_pretrained(path)
    return path


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_cli_export_with_layer_outputs_and_verify(bert_dir, tmp_path, capsys, reference_backend):
    out = tmp_path / "b.onnx"
    rc, text, err = _cli(capsys, "export", str(bert_dir), str(out), "--layer-outputs", "--verify")
    assert rc == 0, err
    assert "PASS" in text and "hidden_states.1" in text and "every block output within budget" in text
    # ONNX Runtime's CUDA provider, where it does not load, must fail the check rather than fall back.
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider loads here")
    rc, text, err = _cli(capsys, "verify", str(out), str(bert_dir), "--provider", "cuda")
    assert rc == 2 and "PASS" not in text
    assert len(err) == 1 and "did not load CUDAExecutionProvider" in err[0], err


@pytest.mark.parametrize("argv, match", [
    (["verify", "x.onnx", "ckpt", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["verify", "x.onnx", "ckpt", "--seq", "-3"], "argument --seq: must be >= 1, got -3"),
    (["check", "ckpt", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["check", "ckpt", "--seq", "ten"], "argument --seq: expected an integer, got 'ten'"),
    (["export", "ckpt"], "the following arguments are required: output"),
    (["export", "ckpt", "o.onnx", "--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["nonsense"], "argument COMMAND: invalid choice"),
])
def test_cli_bad_arguments_are_one_line_exit_2(argv, match, capsys):
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and len(err) == 1 and match in err[0], err


@pytest.mark.parametrize("argv, match", [
    (["export", "{missing}", "{tmp}/o.onnx"], "not a checkpoint directory"),
    (["export", "{bert}", "{tmp}/o.txt"], "must end in .onnx"),
    (["export", "{bert}", "{tmp}/o.onnx", "--opset", "7"], "opset must be an int in 20..23"),
    (["verify", "{tmp}/missing.onnx", "{bert}"], "no such ONNX file"),
    (["verify", "{bert}/config.json", "{bert}"], "not a readable ONNX model"),
    (["check", "{missing}"], "not a checkpoint directory"),
    (["check", "{bert}", "--seq", "100000", "--device", "cpu"], "seq=100000 exceeds the model's 512 positions"),
    (["compare", "{tmp}/a.json", "{tmp}/b.json"], "a.json"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, match, bert_dir, tmp_path, capsys, reference_backend):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path, bert=bert_dir) for a in argv]
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and len(err) == 1 and match in err[0], err
    assert err[0].startswith(f"trifuse {argv[0]}: error: ")
    assert not list(tmp_path.glob("o.*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cli_cuda_without_cuda_is_one_line_exit_2(bert_dir, tmp_path, capsys):
    rc, _, err = _cli(capsys, "export", str(bert_dir), str(tmp_path / "o.onnx"), "--device", "cuda")
    assert rc == 2 and len(err) == 1 and "CUDA is not available" in err[0], err
    assert not list(tmp_path.iterdir())
