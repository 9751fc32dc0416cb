"""`bitlm generate` and `bitlm chat` with speculative decoding: the same text as without (greedy), the
acceptance rate on the --stats line, and one-line errors for inconsistent flags and foreign drafts."""

import io
import re
import sys

import pytest

from bitlm.cli import main, native_available
from bitlm.data import bundled_model_dir
from helpers import make_tiny_model_dir, train_tiny_tokenizer

PASSAGE = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
           "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is")


def generate(capsys, *flags):
    """(stdout, stderr) of `bitlm generate` on the bundled model, greedy."""
    assert main(["generate", "-p", PASSAGE, "-n", "40", "--temperature", "0", "--ignore-eos", "-t", "1", *flags]) == 0
    return capsys.readouterr()


def error_line(err: str) -> str:
    """The one error line of a failed command's stderr (notes such as a first conversion may precede it)."""
    lines = err.splitlines()
    assert err.endswith("\n") and sum("error" in line for line in lines) == 1, err
    return lines[-1]


@pytest.fixture
def threads():
    """-t 1 (torch's threads spin against the other processes of a busy machine) changes the process's
    thread counts: put them back afterwards."""
    import torch

    from bitlm import kernels
    before = torch.get_num_threads(), kernels.info()["threads"]
    yield
    torch.set_num_threads(before[0])
    kernels.set_num_threads(before[1])


@pytest.mark.parametrize("runtime", ["native", "torch"])
def test_generate_speculative_prints_the_plain_continuation(capsys, runtime, threads):
    if runtime == "native" and not native_available():
        pytest.skip("the native kernels are not built")
    plain, _ = generate(capsys, "--runtime", runtime)
    variants = [["--speculative", "lookup"]]
    if runtime == "native":  # (a torch draft model is tested in tests/engine/test_speculative.py)
        variants += [["--speculative", "lookup", "--draft-max", "3", "--lookup-ngram", "1"],
                     ["--draft", str(bundled_model_dir())]]
    for flags in variants:
        out, err = generate(capsys, "--runtime", runtime, "--stats", *flags)
        if runtime == "native":  # the torch model is not batch-invariant: identity up to near-ties only
            assert out == plain
        m = re.search(r"40 new tokens, decode [\d.]+ tokens/s; drafts accepted (\d+)/(\d+) \((\d+)%\); "
                      r"finished: length\]\n$", err)
        assert m and 0 < int(m[1]) <= int(m[2]), err
        assert int(m[3]) == round(100 * int(m[1]) / int(m[2]))


def test_chat_speculative_replies_as_plain_chat(capsys, monkeypatch):
    outs = []
    for flags in ([], ["--speculative", "lookup"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("Who art thou?\nSay it again.\n"))
        assert main(["chat", "-n", "30", "--temperature", "0", *flags]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].count("> ") == 3


@pytest.mark.parametrize("flags, pattern", [
    (["--speculative", "draft"], r"--speculative draft needs a draft model: --draft MODEL"),
    (["--speculative", "lookup", "--draft", "x"], r"--draft MODEL drafts with a model: it goes with --speculative "
                                                  r"draft"),
    (["--speculative", "lookup", "--draft-max", "0"], r"speculative draft_max must be an integer >= 1, got 0"),
    (["--speculative", "lookup", "--lookup-ngram", "0"], r"speculative ngram_max must be an integer >= 1, got 0"),
])
def test_inconsistent_flags_are_one_line_errors(capsys, flags, pattern):
    assert main(["generate", "-p", "hi", "-n", "4", *flags]) == 2
    assert re.fullmatch(rf"bitlm: error: .*{pattern}.*", error_line(capsys.readouterr().err))


def test_a_draft_with_another_vocabulary_is_a_one_line_error(tiny_model_dir, tiny_tokenizer_dir, tmp_path, capsys):
    wider = make_tiny_model_dir(tmp_path / "wider", tiny_tokenizer_dir, vocab_size=640)
    other_tok = make_tiny_model_dir(tmp_path / "other", train_tiny_tokenizer(tmp_path / "tok300", vocab_size=300))
    for draft, pattern in ((wider, "its vocabulary has 640 tokens and the target's 512"),
                           (other_tok, "its tokenizer maps tokens to other ids than the target's")):
        assert main(["generate", "-m", str(tiny_model_dir), "-p", "hi", "-n", "4", "--draft", str(draft)]) == 2
        assert re.fullmatch(rf"bitlm: error: draft model: {pattern}; the draft must share the target's tokenizer",
                            error_line(capsys.readouterr().err))


def serve_or_skip():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    if not native_available():
        pytest.skip("bitlm serve needs the native kernels")


@pytest.mark.parametrize("flags, pattern", [
    (["--speculative", "draft"], r"bitlm serve: --speculative draft needs a draft model: --draft MODEL"),
    (["--speculative", "lookup", "--draft", "x"], r"bitlm serve: --draft MODEL goes with --speculative draft"),
    (["--speculative", "lookup", "--draft-max", "0"], r"bitlm serve: --draft-max must be an integer >= 1, got 0"),
    (["--speculative", "lookup", "--lookup-ngram", "0"], r"bitlm serve: --lookup-ngram must be an integer >= 1"),
])
def test_serve_speculative_flags_are_one_line_errors(capsys, flags, pattern):
    serve_or_skip()
    assert main(["serve", "--port", "0", *flags]) == 2
    assert re.fullmatch(rf"bitlm: error: {pattern}.*", error_line(capsys.readouterr().err))


def test_serve_refuses_a_draft_with_another_vocabulary(tiny_model_dir, tiny_tokenizer_dir, tmp_path, capsys):
    serve_or_skip()
    wider = make_tiny_model_dir(tmp_path / "wider", tiny_tokenizer_dir, vocab_size=640)
    assert main(["serve", "-m", str(tiny_model_dir), "--port", "0", "--draft", str(wider)]) == 2
    assert re.fullmatch(r"bitlm: error: draft model: its vocabulary has 640 tokens and the target's 512; the draft "
                        r"must share the target's tokenizer", error_line(capsys.readouterr().err))
