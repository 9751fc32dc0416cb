"""The many-sequence engine interface the scheduler drives, on each engine that has it: logits of a step
equal one NativeModel's forward over the same tokens, blocks are counted as sequences grow and come back
when they end, and a refused step consumes nothing."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from bitlm.errors import BitlmError

if not __import__("bitlm.cli", fromlist=["native_available"]).native_available():
    pytest.skip("the engines need the native kernels", allow_module_level=True)

from bitlm.engine.native import NativeModel  # noqa: E402
from bitlm.io.native import load_native  # noqa: E402

ENGINES = {"sequential": ("bitlm.serve.sequential_engine", "SequentialEngine"),
           "batch": ("bitlm.engine.batch", "BatchEngine")}


@pytest.fixture(scope="module")
def nm(tiny_model_dir):
    return load_native(tiny_model_dir)


@pytest.fixture(params=list(ENGINES))
def make(request, nm):
    module, name = ENGINES[request.param]
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        pytest.skip(f"{module} is not in this tree")
    return lambda **kw: cls(nm, **kw)


def alone(nm, tokens):
    """Logits of every position of `tokens` run from position 0 on a fresh NativeModel."""
    m = NativeModel(nm.config, nm.arrays, max_len=nm.max_len, kv=nm.kv)
    return m.forward(tokens, len(tokens))


def test_steps_equal_forward_alone(make, nm):
    eng = make(max_seqs=3, block_size=16)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, nm.config.vocab_size, n).tolist() for n in (40, 5, 23)]
    refs = [alone(nm, s) for s in seqs]
    sids = [eng.add_sequence() for _ in seqs]
    done = [0, 0, 0]
    # uneven chunks in a mixed order: a long chunk beside single tokens
    for sizes in ([17, 1, 9], [1, 1, 14], [22, 3, 0], [0, 0, 0]):
        work = [(sid, s[d:d + k]) for sid, s, d, k in zip(sids, seqs, done, sizes) if k and d < len(s)]
        if not work:
            break
        out = eng.step(work)
        for (sid, toks), row in zip(work, out):
            i = sids.index(sid)
            done[i] += len(toks)
            np.testing.assert_array_equal(row, refs[i][done[i] - 1])
    assert done == [40, 5, 23]
    assert [eng.seq_len(s) for s in sids] == done
    assert eng.used_blocks == 3 + 1 + 2 and eng.free_blocks == eng.total_blocks - 6
    eng.free_sequence(sids[0])
    assert eng.used_blocks == 3


def test_steps_return_the_rows_asked_for(make, nm):
    """(sid, tokens, n_out) entries: the last n_out rows' logits, as the forward alone gives them; a
    speculative round's rejected rows rolled back by truncate."""
    eng = make(max_seqs=2, block_size=16)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, nm.config.vocab_size, n).tolist() for n in (30, 12)]
    refs = [alone(nm, s) for s in seqs]
    a, b = eng.add_sequence(), eng.add_sequence()
    out = eng.step([(a, seqs[0][:20], 0), (b, seqs[1][:5], 5)])
    assert out[0].shape == (0, nm.config.vocab_size)
    np.testing.assert_array_equal(out[1], refs[1][:5])
    out = eng.step([(a, seqs[0][20:] + [7, 7], 12), (b, seqs[1][5:])])
    np.testing.assert_array_equal(out[0][:10], refs[0][20:])
    np.testing.assert_array_equal(out[1], refs[1][-1])
    eng.truncate(a, 30)
    assert eng.seq_len(a) == 30 and eng.blocks_needed(a, 3) == 1
    with pytest.raises(BitlmError, match="n_out"):
        eng.step([(a, [1], 2)])


def test_refused_steps_consume_nothing(make, nm):
    eng = make(max_seqs=2, kv_blocks=3, block_size=16)
    a, b = eng.add_sequence(), eng.add_sequence()
    with pytest.raises(BitlmError):
        eng.add_sequence()  # max_seqs
    eng.step([(a, list(range(20)))])  # 2 blocks
    assert eng.blocks_needed(b, 17) == 2 and eng.blocks_needed(a, 12) == 0
    for work in ([(b, list(range(17)))],  # 2 more blocks, 1 free
                 [(a, [1]), (a, [2])],  # a sequence twice
                 [(b, [nm.config.vocab_size])],  # a token out of range
                 [(b, [])]):
        with pytest.raises(BitlmError):
            eng.step(work)
        assert (eng.seq_len(a), eng.seq_len(b), eng.used_blocks) == (20, 0, 2)
    with pytest.raises(BitlmError):
        eng.step([(a, [0] * (eng.max_len - 19))])  # past the context
    eng.free_sequence(a)
    assert eng.used_blocks == 0
    c = eng.add_sequence()  # a freed slot is usable again, and starts empty
    row = eng.step([(c, [3, 4, 5])])[0]
    np.testing.assert_array_equal(row, alone(nm, [3, 4, 5])[-1])


def test_serve_block_size_flag(tiny_model_dir, capsys):
    """--block-size reaches the engine's blocks; a bad one is a one-line error naming the flag, and with a
    q8_0 cache (keys in tiles of 16) one that is not a multiple of 16 names the rule."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from bitlm.cli import main
    from bitlm.engine.batch import BatchEngine
    from bitlm.serve.settings import ServeSettings
    for args, pattern in ((["--block-size", "0"], r"bitlm serve: --block-size must be an integer >= 1, got 0"),
                          (["-m", str(tiny_model_dir), "--kv", "q8_0", "--block-size", "24"],
                           r"BatchEngine: block_size 24 with a q8_0 KV cache must be a multiple of 16 .*")):
        assert main(["serve", "--port", "0", *args]) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("bitlm: error:")]
        assert len(lines) == 1 and __import__("re").fullmatch(rf"bitlm: error: {pattern}", lines[0]), lines
    assert ServeSettings(model_name="m", block_size=64).block_size == 64
    eng = BatchEngine(load_native(tiny_model_dir, kv="q8_0"), max_seqs=2, block_size=64)
    assert eng.block_size == 64 and eng.pool.shape[-2] == 64
