"""The `bitlm` command, as a subprocess (python -m bitlm) and in process (main(argv)): output checked
against the library and against sizes computed here from the files; bad input gives exit 2 and one line."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import bitlm
from bitlm.cli import main
from bitlm.engine.generate import ChatSession, generate_text

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPT = "To be, or not to be"


def run_cli(*args, stdin: str = "", env: dict | None = None):
    """(exit code, stdout, stderr) of `python -m bitlm ARGS`; bytes decoded as they are (no newline
    translation: a random model's text may hold a carriage return)."""
    full_env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "bitlm", *map(str, args)], input=stdin.encode(),
                       capture_output=True, env=full_env, timeout=120)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The library's model on the runtime the CLI picks by default (native, int8 head, where built)."""
    from bitlm.cli import native_available
    if native_available():
        from bitlm.engine.native import NativeLM
        return NativeLM(bitlm.load_native(tiny_model_dir, head="q8"))
    return bitlm.load(tiny_model_dir)


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir):
    return bitlm.load(tiny_model_dir)


# ---- generate ------------------------------------------------------------------------------------
def test_generate_greedy_prints_the_library_continuation(tiny_model_dir, model):
    expected = generate_text(model, PROMPT, max_new_tokens=20, temperature=0)
    code, out, err = run_cli("generate", "-m", tiny_model_dir, "-p", PROMPT, "-n", 20, "--temperature", 0,
                             "-t", 1)
    assert code == 0 and "error" not in err and "Traceback" not in err, err  # a note on kernels may appear
    assert out == expected + "\n"
    assert len(model.tokenizer.encode(expected, add_special_tokens=False)) >= 15  # a real continuation


def test_generate_with_t5_weights_prints_the_same_continuation(tiny_model_dir, model):
    """--weights t5 (1.6-bit projections, converted to their own cache file): the same greedy text."""
    from bitlm.cli import native_available
    if not native_available():
        pytest.skip("native kernels not built")
    expected = generate_text(model, PROMPT, max_new_tokens=20, temperature=0)
    code, out, err = run_cli("generate", "-m", tiny_model_dir, "-p", PROMPT, "-n", 20, "--temperature", 0,
                             "-t", 1, "--runtime", "native", "--weights", "t5")
    assert code == 0 and "error" not in err and "Traceback" not in err, err
    assert out == expected + "\n"


def test_generate_sampling_flags_stop_strings_and_stdin(tiny_model_dir, model, capsys, monkeypatch):
    opts = dict(max_new_tokens=30, temperature=0.9, top_k=20, top_p=0.8, seed=5)
    expected = generate_text(model, PROMPT, **opts)
    argv = ["generate", "-m", str(tiny_model_dir), "-p", PROMPT, "-n", "30", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.8", "--seed", "5"]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"

    stop = expected[10:13]
    cut = expected[:expected.find(stop)]
    assert main(argv + ["--stop", "\x00nowhere", stop]) == 0
    assert capsys.readouterr().out == cut + "\n"

    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    assert main(["generate", "-m", str(tiny_model_dir), "-p", "-", "-n", "30", "--temperature", "0.9",
                 "--top-k", "20", "--top-p", "0.8", "--seed", "5", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    n_prompt = len(model.tokenizer.encode(PROMPT))
    assert re.fullmatch(rf"\[prompt {n_prompt} tokens, prefill \d+ ms; 30 new tokens, decode [\d.]+ tokens/s; "
                        r"finished: length\]\n", err)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_native_generation_does_not_import_torch(tiny_model_dir, tmp_path, command):
    """torch costs ~190 MB of resident memory; the native runtime never needs it, from converting the
    (packed) checkpoint in an empty cache to the last token."""
    from bitlm.cli import native_available
    if not native_available():
        pytest.skip("the native kernels are not built")
    argv = ["generate", "-p", "To be"] if command == "generate" else ["chat"]
    code = ("import io, sys; sys.stdin = io.StringIO('hello\\n'); from bitlm.cli import main; "
            f"rc = main({argv!r} + ['-m', {str(tiny_model_dir)!r}, '-n', '8', '--seed', '1']); "
            "print('\\ntorch imported:', 'torch' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1",
                            "BITLM_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().splitlines()[-1] == "torch imported: False"
    assert list((tmp_path / "cache" / "native").glob("*.safetensors"))  # it did convert


def test_ignore_eos(tiny_model_dir, model, tmp_path, capsys):
    # A copy whose config makes the first greedy token the end of text: nothing comes out, unless --ignore-eos.
    expected = generate_text(model, PROMPT, max_new_tokens=5, temperature=0, stop_token_ids=[])
    first = generate_text(model, PROMPT, max_new_tokens=1, temperature=0, stop_token_ids=[])
    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = model.tokenizer.encode(first, add_special_tokens=False)[0]
    (d / "config.json").write_text(json.dumps(cfg))
    argv = ["generate", "-m", str(d), "-p", PROMPT, "-n", "5", "--temperature", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "\n"
    assert main(argv + ["--ignore-eos"]) == 0
    assert capsys.readouterr().out == expected + "\n" and expected


# ---- chat ----------------------------------------------------------------------------------------
def test_chat_two_turns_reset_and_eof(tiny_model_dir, model):
    code, out, err = run_cli("chat", "-m", tiny_model_dir, "--system", "Be brief.", "-n", 8, "--temperature", 0,
                             stdin="hello\n/reset\nhi again\n")
    assert code == 0 and "error" not in err and "Traceback" not in err, err  # a note on kernels may appear
    opts = dict(system="Be brief.", max_new_tokens=8, temperature=0)
    first = ChatSession(model, **opts).reply("hello")
    after_reset = ChatSession(model, **opts).reply("hi again")  # /reset: as if the chat began here
    assert out == f"> {first}\n> (conversation cleared)\n> {after_reset}\n> "


def test_chat_keeps_history_between_turns(tiny_model_dir, model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nhi again\n/quit\nnever read\n"))
    assert main(["chat", "-m", str(tiny_model_dir), "-n", "6", "--temperature", "0"]) == 0
    session = ChatSession(model, max_new_tokens=6, temperature=0)
    first, second = session.reply("hello"), session.reply("hi again")
    assert capsys.readouterr().out == f"> {first}\n> > {second}\n> "


# ---- info ----------------------------------------------------------------------------------------
def expected_sizes(model_dir: Path, model) -> tuple[dict, dict]:
    """Parameter counts from the loaded modules and byte counts from the tensors' shapes and dtypes."""
    ternary = sum(m.in_features * m.out_features for _, m in model.ternary_layers())
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    embed = model.model.embed_tokens.weight.numel()
    params = {"ternary": ternary, "embedding": embed, "head": 0, "norms": norms, "total": ternary + embed + norms}
    nbytes = dict.fromkeys(["ternary weights", "ternary scales", "embedding", "head", "norms"], 0)
    f = model_dir / "model.safetensors"
    with safe_open(str(f), framework="pt") as st:
        for name in st.keys():
            t = st.get_tensor(name)
            size = t.numel() * t.element_size()
            if name == "model.embed_tokens.weight":
                nbytes["embedding"] += size
            elif name.endswith("_proj.weight"):
                nbytes["ternary weights"] += size
            elif name.endswith("_proj.weight_scale"):
                nbytes["ternary scales"] += size
            else:
                assert name.endswith("norm.weight"), name
                nbytes["norms"] += size
    return params, {**nbytes, "total": f.stat().st_size}


def test_info_counts_and_bytes(tiny_model_dir, torch_model, capsys):
    params, nbytes = expected_sizes(tiny_model_dir, torch_model)
    assert nbytes["ternary weights"] * 4 == params["ternary"]  # 2 bits per weight
    assert main(["info", str(tiny_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == params
    assert {k: info["bytes"][k] for k in nbytes} == nbytes
    assert sum(v for k, v in info["bytes"].items() if k != "total") == nbytes["total"]
    assert info["bits_per_ternary_weight"] == 2.0
    assert info["format"]["quantization_mode"] == "offline"
    assert info["format"]["dtypes"]["ternary weights"] == ["U8"]
    assert info["config"]["hidden_size"] == 64 and info["config"]["num_hidden_layers"] == 2

    assert main(["info", str(tiny_model_dir)]) == 0
    text = capsys.readouterr().out
    assert "packed (quantization_mode offline, linear_class autobitlinear)" in text
    for k in ("ternary", "embedding", "norms", "total"):
        assert re.search(rf"^  {k} +{params[k]:,}", text, re.M), k
    for k in ("ternary weights", "ternary scales", "embedding", "norms", "total"):
        assert re.search(rf"^  {k} +{nbytes[k]:,} ", text, re.M), k
    assert re.search(r"^  hidden_size +64$", text, re.M)


# ---- bad input: exit 2, one line, no traceback (broken checkpoints: tests/test_broken_inputs.py) -------
def test_prompt_longer_than_context(tiny_model_dir, capsys):
    assert main(["generate", "-m", str(tiny_model_dir), "-p", "To be " * 300]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"bitlm: error: the prompt is \d+ tokens, longer than the model's context of 256 tokens; "
                        r"shorten the prompt\n", err), err


@pytest.mark.parametrize("argv,pattern", [
    (["generate", "-p", "hi", "--temperature", "-1"], "temperature must be"),
    (["generate", "-p", "hi", "--top-p", "0"], "top_p must be"),
    (["generate", "-p", "hi", "-n", "-3"], "max_new_tokens must be"),
    (["generate", "-p", "hi", "-t", "0"], "threads must be at least 1"),
])
def test_bad_flag_values(tiny_model_dir, capsys, argv, pattern):
    assert main(argv[:1] + ["-m", str(tiny_model_dir)] + argv[1:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and pattern in err, err


def test_usage_errors(capsys):
    assert main(["generate", "-m", "x", "-p", "hi", "--frobnicate"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "bitlm: error: unrecognized arguments: --frobnicate"
    assert main(["generate", "-m", "x", "-n", "many", "-p", "hi"]) == 2
    assert "argument -n/--max-tokens: invalid int value: 'many'" in capsys.readouterr().err
    for cmd in (["generate", "-m", "x", "-p", "hi"], ["bench", "--shape", "tiny"], ["serve", "-m", "x"]):
        assert main([*cmd, "--kv", "q4"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) >= 1 and "argument --kv: invalid choice: 'q4' (choose from" in err[-1] and "q8_0" in err[-1]
    assert main([]) == 2
    assert main(["--help"]) == 0


def test_the_kv_choices_are_the_native_runtimes_kv_types():
    from bitlm.cli import KV_TYPES
    from bitlm.engine.native import KV_KINDS
    assert set(KV_TYPES) == set(KV_KINDS)


def test_ctrl_c_exits_130_quietly(tiny_model_dir, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bitlm, "load", interrupted)
    monkeypatch.setattr(bitlm.io.native, "load_native", interrupted)
    assert main(["generate", "-m", str(tiny_model_dir), "-p", "hi"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_as_a_process_errors_are_one_line(tmp_path):
    code, out, err = run_cli("generate", "-m", tmp_path / "missing", "-p", "hi")
    assert (code, out) == (2, "") and err == (f"bitlm: error: {tmp_path / 'missing'}: no such model directory (and "
                                              "not a Hugging Face repo id like microsoft/bitnet-b1.58-2B-4T)\n")
    code, out, err = run_cli("info", "--bogus")
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1] == "bitlm: error: unrecognized arguments: --bogus"


def test_hub_repo_id_offline(tmp_path):
    code, out, err = run_cli("generate", "-m", "someorg/some-model", "-p", "hi", env={"HF_HOME": str(tmp_path)})
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "'someorg/some-model'" in err and "HF_HUB_OFFLINE" in err and "pass the local directory" in err
