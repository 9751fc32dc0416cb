"""`bitlm convert`: every format to every other on a tiny model, each output loaded and its logits
compared with its source's; bad and truncated inputs are one-line errors (exit 2); a failed conversion
leaves nothing at OUT."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

import bitlm
from bitlm.cli import main
from bitlm.io.convert import FORMATS
from helpers import make_tiny_model_dir

pytest.importorskip("gguf")
SHAPE = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=1)
IDS = [0, 5, 17, 42, 99, 300, 7, 8]
SUFFIX = {"hf": "", "hf-bf16": "", "native": ".safetensors"}


def out_name(fmt):
    return fmt + SUFFIX.get(fmt, ".gguf")


@functools.lru_cache(maxsize=None)
def _logits(path, fmt):
    """Logits of the model at path: torch for HF and GGUF (bitlm.load), the native runtime for native
    files (compared against the native runtime of the source's torch model, an independent route)."""
    if fmt == "native":
        from bitlm.io.native import open_native
        return open_native(path).forward(IDS, len(IDS))
    with torch.no_grad():
        return bitlm.load(path)(torch.tensor([IDS]))[0].numpy()


def logits(path, fmt):  # each source's logits once (sources are compared with up to 12 outputs)
    return _logits(str(path), fmt)


@functools.lru_cache(maxsize=None)
def _native_logits_of(path):
    pytest.importorskip("bitlm.kernels._native")
    from bitlm.engine.native import NativeModel
    return NativeModel.from_model(bitlm.load(path)).forward(IDS, len(IDS))


def native_logits_of(path):
    return _native_logits_of(str(path))


def convert(src, dest, fmt, *extra):
    return main(["convert", str(src), str(dest), "--to", fmt, "--embed-type", "f32", *extra])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_tokenizer_dir):
    """The source converted to every format (the first hop)."""
    d = tmp_path_factory.mktemp("conv")
    src = make_tiny_model_dir(d / "src", tiny_tokenizer_dir, **SHAPE)
    made = {}
    for fmt in FORMATS:
        assert convert(src, d / out_name(fmt), fmt) == 0
        made[fmt] = d / out_name(fmt)
    return src, made


def check_same(src_path, src_fmt, out_path, out_fmt):
    if out_fmt == "native":
        if src_fmt == "native":
            assert np.array_equal(logits(out_path, "native"), logits(src_path, "native"))
        else:
            assert np.array_equal(logits(out_path, "native"), native_logits_of(src_path))
        return
    ref = logits(src_path, src_fmt) if src_fmt != "native" else None
    got = logits(out_path, out_fmt)
    if ref is None:  # a native source: its torch twin is the HF model it was made from (checked by the caller)
        return got
    if out_fmt == "hf-bf16" and src_fmt != "hf-bf16":
        # latent weights in bf16: the codes come back, each scale moves by its bf16 rounding (and an
        # f32 embedding is rounded to bf16): close, not equal
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel < 0.05, rel
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    else:
        assert np.array_equal(got, ref), (src_fmt, out_fmt, np.abs(got - ref).max())
    return got


def test_first_hop(outputs):
    src, made = outputs
    for fmt, path in made.items():
        check_same(src, "hf", path, fmt)


@pytest.mark.parametrize("src_fmt", FORMATS)
def test_second_hop(outputs, tmp_path, src_fmt):
    src, made = outputs
    for fmt in FORMATS:
        dest = tmp_path / out_name(fmt)
        assert convert(made[src_fmt], dest, fmt) == 0
        if src_fmt == "native":
            # the native file keeps the embedding, codes and scales: what it converts to runs as the
            # HF source does (exactly, except through bf16 latents)
            check_same(src, "hf", dest, fmt)
        else:
            check_same(made[src_fmt], src_fmt, dest, fmt)


def test_tokenizer_travels(outputs, tmp_path):
    src, made = outputs
    tok = bitlm.load(src).tokenizer
    assert convert(made["native"], tmp_path / "hf", "hf") == 0  # native -> hf: the tokenizer was in the native file
    for path in (made["gguf-i2_s"], made["hf-bf16"], tmp_path / "hf"):
        back = bitlm.load(path).tokenizer
        assert back.encode("To be, or not to be") == tok.encode("To be, or not to be")
        assert back.chat_template == tok.chat_template


def test_bad_inputs_are_one_line(outputs, tmp_path, capsys):
    src, made = outputs
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(made["gguf-tq2_0"].read_bytes()[:4096])
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01" * 100)
    cut_native = tmp_path / "cut.safetensors"
    cut_native.write_bytes(made["native"].read_bytes()[:1000])
    for bad in (cut, junk, cut_native, tmp_path / "missing-dir"):
        dest = tmp_path / "out.gguf"
        assert convert(bad, dest, "gguf-i2_s") == 2
        err = capsys.readouterr().err
        assert err.startswith("bitlm: error: ") and err.count("\n") == 1, err
        assert not dest.exists()
    assert main(["convert", str(src), str(tmp_path / "x"), "--to", "gguf-q4"]) == 2  # argparse's own line


def test_refused_conversion_leaves_nothing(tmp_path, tiny_model_dir, capsys):
    dest = tmp_path / "out.gguf"
    assert convert(tiny_model_dir, dest, "gguf-tq2_0") == 2  # 64-wide rows: TQ2_0 needs 256
    assert "multiple of 256" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing(outputs, tmp_path, monkeypatch, capsys):
    from bitlm.errors import BitlmError
    from bitlm.formats import i2s
    src, made = outputs
    calls = []
    real = i2s.pack

    def failing(*a, **k):  # the disk "fills" after a few tensors
        calls.append(1)
        if len(calls) > 3:
            raise BitlmError("simulated write failure")
        return real(*a, **k)
    monkeypatch.setattr(i2s, "pack", failing)
    dest = tmp_path / "out.gguf"
    assert convert(src, dest, "gguf-i2_s") == 2
    assert "simulated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary file


def test_output_cannot_replace_input(outputs, capsys):
    src, made = outputs
    assert convert(made["gguf-i2_s"], made["gguf-i2_s"], "gguf-i2_s") == 2
    assert "replace the input" in capsys.readouterr().err


def test_generate_from_gguf_says_it_converts_once(outputs, capsys):
    pytest.importorskip("bitlm.kernels._native")
    src, made = outputs
    args = ["generate", "-m", str(made["gguf-tq1_0"]), "-p", "To be", "-n", "4", "--temperature", "0"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "converting" in first.err and "for the native runtime (once; cached in" in first.err
    assert main(args) == 0
    second = capsys.readouterr()
    assert second.err == "" and second.out == first.out
    assert main(["generate", "-m", str(src), "-p", "To be", "-n", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first.out  # the same text as the HF source (f32 embedding)


def test_info_and_bench_take_a_gguf(outputs, capsys):
    src, made = outputs
    assert main(["info", str(made["gguf-i2_s"])]) == 0
    out = capsys.readouterr().out
    assert "GGUF (bitnet-b1.58): ternary weights as I2_S" in out and "2.00 bits per weight" in out
    assert main(["info", "--json", str(made["gguf-tq2_0"])]) == 0
    import json
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["hidden_size"] == 256 and info["format"]["dtypes"]["ternary weights"] == ["TQ2_0"]
    assert info["parameters"] == json.loads(_info_json(src))["parameters"]
    pytest.importorskip("bitlm.kernels._native")
    assert main(["bench", "-m", str(made["gguf-i2_s"]), "-p", "4", "-n", "2", "-r", "1", "-t", "1"]) == 0
    assert "| pp4 |" in capsys.readouterr().out


def _info_json(path):
    from bitlm.io.summary import describe
    import json
    return json.dumps(describe(path))


def test_convert_without_torch(outputs, tmp_path):
    """The base install (torch blocked from import) converts packed checkpoints, GGUF and native files
    to GGUF and native; the HF outputs need torch and say which extra in one line."""
    from test_torch_free import CLI, EXTRA, run
    src, made = outputs
    for source, fmt in ((src, "gguf-i2_s"), (src, "native"), (made["gguf-tq1_0"], "gguf-tq2_0"),
                        (made["gguf-i2_s"], "native"), (made["native"], "gguf-i2_s")):
        dest = tmp_path / f"{Path(str(source)).name}-{out_name(fmt)}"
        code, out, err = run(CLI, "convert", source, dest, "--to", fmt, "--embed-type", "f32", cache=tmp_path / "c")
        assert code == 0, err
        ref = made[fmt] if fmt != "native" else None
        if ref is not None:
            assert np.array_equal(logits(dest, fmt), logits(ref, fmt))
        else:
            assert np.array_equal(logits(dest, "native"), logits(made["native"], "native"))
    code, out, err = run(CLI, "convert", made["gguf-i2_s"], tmp_path / "hf", "--to", "hf", cache=tmp_path / "c")
    assert code == 2 and err.count("\n") == 1 and EXTRA in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("src_fmt", ["hf", "gguf-tq2_0", "gguf-tq1_0", "gguf-i2_s", "native"])
def test_native_in_the_t5_weight_format(outputs, tmp_path, src_fmt):
    """--to native --weights t5 from every input: the file says t5 and its logits equal the I2V native
    file's bit for bit (the codes are the same, only their packing differs); a GGUF file loads on the
    native runtime in t5 too."""
    pytest.importorskip("bitlm.kernels._native")
    from bitlm.io import st
    from bitlm.io.native import open_native
    src, made = outputs
    i2v = logits(made["native"], "native")
    dest = tmp_path / "t5.safetensors"
    assert convert(src if src_fmt == "hf" else made[src_fmt], dest, "native", "--weights", "t5") == 0
    assert st.open_arrays(dest)[1]["weights"] == "t5"
    nm = open_native(dest)
    assert nm.weights == "t5" and np.array_equal(nm.forward(IDS, len(IDS)), i2v)
    if src_fmt.startswith("gguf"):
        g = bitlm.load_native(made[src_fmt], tokenizer=False, weights="t5")
        assert g.weights == "t5" and np.array_equal(g.forward(IDS, len(IDS)), i2v)


def test_weights_is_for_native_outputs_only(outputs, tmp_path, capsys):
    src, made = outputs
    assert convert(src, tmp_path / "x.gguf", "gguf-tq2_0", "--weights", "t5") == 2
    err = capsys.readouterr().err
    assert err == "bitlm: error: --weights t5 is the native file's weight format; it has no meaning for --to gguf-tq2_0\n"
    assert not (tmp_path / "x.gguf").exists()



@pytest.mark.parametrize("weights", ["i2v", "t5"])
def test_out_of_a_native_file_of_either_weight_format(outputs, tmp_path, weights):
    """A native file in either weight format converts back out (its codes unpacked exactly): the GGUF
    made from it runs as the HF source does."""
    src, made = outputs
    assert convert(src, tmp_path / "n.safetensors", "native", "--weights", weights) == 0
    assert convert(tmp_path / "n.safetensors", tmp_path / "y.gguf", "gguf-tq2_0") == 0
    check_same(src, "hf", tmp_path / "y.gguf", "gguf-tq2_0")
