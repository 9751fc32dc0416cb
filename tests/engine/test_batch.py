"""The many-sequence engine (engine/batch.py over kernels/forward.c bn_forward_paged) against the
single-sequence NativeModel, one sequence at a time, on every kernel path.

The bar is bit-for-bit equality (np.array_equal), not closeness: the single-sequence forward and the
batched one run the same kernels, every float operation is per row (norms, int8 quantization, the
dequantization of exact integer sums, the head), and attention reduces over chunks of 256 keys counted
from position 0, merged in chunk order, whatever the rows around, so a row's logits depend only on its
sequence's tokens.""" 

import numpy as np
import pytest

import bitlm
from bitlm.errors import BitlmError
from helpers import make_tiny_model_dir

native = pytest.importorskip("bitlm.engine.native")
if not __import__("bitlm.kernels", fromlist=["available"]).available():
    pytest.skip("native kernels not built", allow_module_level=True)
from bitlm import kernels  # noqa: E402
from bitlm.engine.batch import BatchEngine, kv_block_bytes  # noqa: E402

PATHS = kernels.info()["paths"]
SHAPES = {
    "relu2-gqa": dict(),
    # head_dim 6: the attention loops' tails (not a multiple of 8 or 16)
    "ragged": dict(hidden_size=36, intermediate_size=58, num_attention_heads=6, num_key_value_heads=2),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, tmp_path_factory):
    return bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp(request.param), None, **SHAPES[request.param]),
                      tokenizer=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 360 positions: sequences past the 256-key attention chunks
    return bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), None, max_position_embeddings=360),
                      tokenizer=False)


def plans(rng, V, n_seqs=16):
    """Per sequence: the step it starts at and its chunks (a prompt in one to three chunks, then single
    tokens), lengths spread so that sequences cross the 64-key attention blocks at different steps."""
    out = []
    for i in range(n_seqs):
        prompt = int(rng.integers(1, 90))
        cuts = sorted(set(rng.integers(1, prompt, size=int(rng.integers(0, 3))).tolist())) if prompt > 1 else []
        chunks = np.split(rng.integers(0, V, prompt), cuts)
        chunks += [rng.integers(0, V, 1) for _ in range(int(rng.integers(2, 8)))]
        out.append((int(rng.integers(0, 5)), chunks))
    return out


def run_batched(eng, plans):
    """Every sequence's chunks through the engine: at each step, each started, unfinished sequence adds
    its next chunk; a sequence is freed after its last. Returns the logits of every chunk."""
    got = [[] for _ in plans]
    sids = [None] * len(plans)
    step = 0
    while any(len(g) < len(c) for g, (_, c) in zip(got, plans)):
        work, who = [], []
        for i, (start, chunks) in enumerate(plans):
            if start <= step and len(got[i]) < len(chunks):
                if sids[i] is None:
                    sids[i] = eng.add_sequence()
                work.append((sids[i], chunks[len(got[i])]))
                who.append(i)
        for i, logits in zip(who, eng.step(work)):
            got[i].append(logits)
            if len(got[i]) == len(plans[i][1]):
                eng.free_sequence(sids[i])
        step += 1
    assert eng.used_blocks == 0 and not eng.sequences
    return got


def run_alone(nm, chunks):
    nm.reset()
    return [nm.forward(c)[0] for c in chunks]


def assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w)
        for j, (a, b) in enumerate(zip(g, w)):
            assert np.array_equal(a, b), f"{what}: sequence {i}, chunk {j}"


@pytest.mark.parametrize("kv", ["f16", "f32", "q8_0"])
def test_batched_steps_equal_the_native_model_one_sequence_at_a_time(model, kv):
    """16 sequences joining at different steps, prompts in chunks beside decode rows, against a
    NativeModel running each sequence alone: equal bit for bit, on every kernel path."""
    V = model.config.vocab_size
    arrays = native.arrays_from_model(model, "q8")
    p = plans(np.random.default_rng(1), V)
    for path in PATHS:
        nm = native.NativeModel(model.config, arrays, max_len=128, kv=kv, path=path)
        got = run_batched(BatchEngine(nm, max_seqs=16, block_size=16), p)
        want = [run_alone(nm, chunks) for _, chunks in p]
        assert_same(got, want, path)


@pytest.mark.parametrize("head", ["f32", "bf16", "q6"])
def test_every_head_format_batched_equals_alone(tiny, head):
    V = tiny.config.vocab_size
    arrays = native.arrays_from_model(tiny, head)
    p = plans(np.random.default_rng(2), V, n_seqs=6)
    for path in PATHS:
        nm = native.NativeModel(tiny.config, arrays, max_len=128, kv="f16", path=path)
        assert_same(run_batched(BatchEngine(nm, max_seqs=6), p), [run_alone(nm, c) for _, c in p], path)


@pytest.mark.parametrize("block_size", [1, 5, 48, 64, 100])
def test_block_sizes_that_cut_the_attention_blocks_anywhere(tiny, block_size):
    """Cache blocks of 1, 5, 48, 64 and 100 positions, dividing the 256 keys of an attention chunk or not:
    the keys are read in runs across blocks, with the same sums. A q8_0 cache holds its keys in tiles of
    16, so its blocks are whole tiles (48, 64); other sizes get a one-line error."""
    V = tiny.config.vocab_size
    arrays = native.arrays_from_model(tiny, "q8")
    p = plans(np.random.default_rng(3), V, n_seqs=5)
    for kv in ("f16", "f32", "q8_0"):
        nm = native.NativeModel(tiny.config, arrays, max_len=128, kv=kv)
        if kv == "q8_0" and block_size % 16:
            with pytest.raises(BitlmError, match=f"block_size {block_size} with a q8_0 KV cache must be a "
                                                 "multiple of 16"):
                BatchEngine(nm, max_seqs=5, block_size=block_size)
            continue
        got = run_batched(BatchEngine(nm, max_seqs=5, block_size=block_size), p)
        assert_same(got, [run_alone(nm, c) for _, c in p], kv)


def test_the_c_forward_refuses_a_q8_0_pool_of_partial_tiles(tiny):
    """bn_forward_paged itself (BatchEngine checks first) refuses a q8_0 pool whose block_size is not a
    multiple of 16, the keys' tile: its blocks could not hold whole tiles. The same call with 16 runs."""
    nm = native.NativeModel(tiny.config, native.arrays_from_model(tiny, "q8"), max_len=64, kv="q8_0")
    for bs, ok in ((8, False), (16, True)):
        pool = np.zeros((4, kv_block_bytes(tiny.config, "q8_0", bs)), np.uint8)
        blocks = np.arange(4, dtype=np.int32)
        toks = np.array([1, 2, 3], np.int32)
        seqs = np.array([[3, 0, 1, blocks.ctypes.data]], np.int64)
        logits = np.empty((1, tiny.config.vocab_size), np.float32)
        call = lambda: nm.n.forward_paged(nm._handle, toks.ctypes.data, seqs.ctypes.data, 1, pool.ctypes.data,  # noqa: E731
                                          bs, 4, logits.ctypes.data)
        if ok:
            call()
            assert np.isfinite(logits).all()
        else:
            with pytest.raises(ValueError, match="block_size not a multiple of 16"):
                call()


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_sequences_past_one_attention_chunk_batched_equal_alone(tiny, kv):
    """Contexts past the 256-key chunks of attention (their partial softmaxes merged per row): prompts of
    200 to 300 tokens in chunks, then decode rows across the chunk boundary, beside each other, in
    blocks of 5 positions (q8_0: 48, whole tiles of keys) that do not divide a chunk; equal bit for bit to
    each sequence alone, on every kernel path, and for 1 or 2 threads (a row's chunks may run on either)."""
    V = tiny.config.vocab_size
    rng = np.random.default_rng(4)
    p = []
    for i in range(3):
        prompt = rng.integers(0, V, int(rng.integers(200, 300)))
        p.append((i, np.split(prompt, [100, 180]) + [rng.integers(0, V, 1) for _ in range(40)]))
    arrays = native.arrays_from_model(tiny, "q8")
    for path in PATHS:
        nm = native.NativeModel(tiny.config, arrays, max_len=360, kv=kv, path=path)
        want = [run_alone(nm, c) for _, c in p]
        for threads in (1, 2):
            kernels.set_num_threads(threads)
            try:
                eng = BatchEngine(nm, max_seqs=3, block_size=48 if kv == "q8_0" else 5)
                assert_same(run_batched(eng, p), want, (path, threads))
            finally:
                kernels.set_num_threads(0)


def serve(eng, prompt, n_new, others=()):
    """Greedy continuation of one request (its prompt in two chunks), with others served beside it:
    each other starts at its step, feeds its chunks, then either leaves (every third) or keeps
    decoding greedily. The request sits at a different place in each step's work list. Returns the
    request's logits per step and its n_new new tokens."""
    sid = eng.add_sequence()
    feed = [prompt[:20], prompt[20:]]
    logits, tokens = [], []
    live = {}  # other index -> [sid, chunks fed, last logits]
    step = 0
    while len(tokens) < n_new:
        work, who = [], []
        for i, (start, chunks) in enumerate(others):
            if start == step:
                live[i] = [eng.add_sequence(), 0, None]
            if i in live:
                osid, k, last = live[i]
                work.append((osid, chunks[k] if k < len(chunks) else [int(last.argmax())]))
                who.append(i)
        mine = step % (len(work) + 1)
        work.insert(mine, (sid, feed.pop(0) if feed else [tokens[-1]]))
        out = eng.step(work)
        logits.append(out.pop(mine))
        if not feed:  # the prompt is in: a new token
            tokens.append(int(logits[-1].argmax()))
        for i, lg in zip(who, out):
            live[i][1] += 1
            live[i][2] = lg
            if live[i][1] == len(others[i][1]) and i % 3 == 0:
                eng.free_sequence(live.pop(i)[0])
        step += 1
    return logits, tokens


def test_a_request_alone_equals_it_among_15_others(tiny):
    """Batch invariance: one request's logits and greedy continuation, served alone and served among
    15 others (prompts in prefill chunks, others decoding, joining and leaving at other steps), equal
    bit for bit and token for token, on every kernel path."""
    V = tiny.config.vocab_size
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, V, 37)
    others = plans(rng, V, n_seqs=15)
    arrays = native.arrays_from_model(tiny, "q8")
    for path in PATHS:
        nm = native.NativeModel(tiny.config, arrays, max_len=128, kv="f16", path=path)
        alone_logits, alone_tokens = serve(BatchEngine(nm, max_seqs=16), prompt, 14)
        crowd = BatchEngine(nm, max_seqs=16)
        crowd_logits, crowd_tokens = serve(crowd, prompt, 14, others)
        assert len(crowd.sequences) > 8  # the crowd was there to the end
        assert crowd_tokens == alone_tokens, path
        for a, b in zip(crowd_logits, alone_logits):
            assert np.array_equal(a, b), path
        # and the NativeModel alone: the same logits again
        nm.reset()
        want = [nm.forward(prompt[:20])[0], nm.forward(prompt[20:])[0]]
        want += [nm.forward([t])[0] for t in alone_tokens[:-1]]
        for a, b in zip(alone_logits, want):
            assert np.array_equal(a, b), path


def test_pool_blocks_hold_what_the_native_models_own_cache_holds(tiny):
    """The documented block layout, [layers][2][kv_heads][block_size][head_dim], read back from the pool
    against the NativeModel's own cache (read by head: kv_rows) after the same tokens."""
    V = tiny.config.vocab_size
    arrays = native.arrays_from_model(tiny, "q8")
    nm = native.NativeModel(tiny.config, arrays, max_len=64, kv="f16")
    eng = BatchEngine(nm, max_seqs=2, block_size=4)
    ids = np.random.default_rng(5).integers(0, V, 23)
    eng.add_sequence()  # a first sequence, so the second one's blocks are not 0, 1, 2, ...
    eng.step([(0, ids[:6])])
    sid = eng.add_sequence()
    eng.step([(sid, ids[:10])])
    eng.step([(sid, ids[10:])])
    nm.reset()
    nm.forward(ids)
    table = eng._seqs[sid].blocks[:6]
    assert sorted(table.tolist()) == list(range(2, 8))
    rows = [nm.kv_rows(l) for l in range(tiny.config.num_hidden_layers)]
    for p in range(23):
        block = eng.pool[table[p // 4]]
        for l, (k, v) in enumerate(rows):
            assert np.array_equal(block[l, 0, :, p % 4], k[:, p])
            assert np.array_equal(block[l, 1, :, p % 4], v[:, p])


def test_blocks_are_taken_on_demand_and_given_back(tiny):
    nm = native.NativeModel.from_model(tiny, max_len=64)
    eng = BatchEngine(nm, max_seqs=4, kv_blocks=10, block_size=8)
    c = tiny.config
    assert eng.total_blocks == 10 and eng.free_blocks == 10 and eng.used_blocks == 0
    assert eng.pool.shape == (10, c.num_hidden_layers, 2, c.num_key_value_heads, 8, c.head_dim)
    assert eng.block_bytes == c.num_hidden_layers * 2 * c.num_key_value_heads * 8 * c.head_dim * 2  # f16
    a, b = eng.add_sequence(), eng.add_sequence()
    assert eng.blocks_needed(a, 1) == 1 and eng.blocks_needed(a, 8) == 1 and eng.blocks_needed(a, 9) == 2
    eng.step([(a, [1])])
    assert eng.used_blocks == 1 and eng.blocks_needed(a, 7) == 0 and eng.blocks_needed(a, 8) == 1
    eng.step([(a, list(range(7))), (b, list(range(17)))])  # a: exactly 8 positions, one block; b: three
    assert (eng.seq_len(a), eng.seq_len(b), eng.used_blocks) == (8, 17, 4)
    eng.step([(a, [2]), (b, [3])])
    assert eng.used_blocks == 5 and eng.free_blocks == 5
    eng.truncate(b, 9)  # positions 0..8: two blocks kept, one returned
    assert eng.seq_len(b) == 9 and eng.used_blocks == 4
    eng.truncate(b, 100)  # never grows
    assert eng.seq_len(b) == 9
    eng.free_sequence(a)
    assert eng.used_blocks == 2 and eng.sequences == [b]
    with pytest.raises(BitlmError, match="no live sequence"):
        eng.seq_len(a)
    eng.free_sequence(b)
    assert eng.free_blocks == 10


def test_exhaustion_and_bad_steps_consume_nothing(tiny):
    V = tiny.config.vocab_size
    nm = native.NativeModel.from_model(tiny, max_len=40)
    eng = BatchEngine(nm, max_seqs=3, kv_blocks=4, block_size=8)
    a, b = eng.add_sequence(), eng.add_sequence()
    first = eng.step([(a, [5, 6, 7])])[0]
    state = lambda: (eng.seq_len(a), eng.seq_len(b), eng.free_blocks)  # noqa: E731
    before = state()
    bad = [
        ([(a, [1]), (b, list(range(25)))], "the KV pool has 3 free blocks, this step needs 4"),
        ([(a, list(range(38)))], "sequence 0 of 41 tokens exceeds the context length 40"),
        ([(a, [1]), (b, [V])], "token id out of range"),
        ([(a, [1]), (b, [-1])], "token id out of range"),
        ([(a, [1]), (a, [2])], "appears twice"),
        ([(a, [1]), (99, [2])], "no live sequence 99"),
        ([(a, [])], "no tokens"),
        ([(a, [1, 2], 3)], "n_out must be an integer in 0..2"),
        ([(a, [1]), (b, [2], -1)], "n_out must be an integer in 0..1"),
        ([(a, [1], 1.0)], "n_out must be an integer"),
        ([(a,)], "an entry is"),
    ]
    for work, msg in bad:
        with pytest.raises(BitlmError, match=msg):
            eng.step(work)
        assert state() == before, msg
    eng.add_sequence()
    with pytest.raises(BitlmError, match="3 sequences are live"):
        eng.add_sequence()
    with pytest.raises(BitlmError, match="exceeds the native model's context 40"):
        BatchEngine(nm, max_len=41)
    # after all that, a's next step is what it would have been
    again = BatchEngine(nm, max_seqs=1, block_size=8)
    s = again.add_sequence()
    assert np.array_equal(again.step([(s, [5, 6, 7])])[0], first)
    assert np.array_equal(eng.step([(a, [9])])[0], again.step([(s, [9])])[0])
    # a full pool refuses a block to another sequence
    eng.truncate(a, 0)
    eng.step([(a, list(range(32)))])
    assert eng.free_blocks == 0
    with pytest.raises(BitlmError, match="free blocks"):
        eng.step([(b, [1])])
    # the context is usable to its last position, not past it
    short = BatchEngine(nm, max_seqs=1, max_len=16, block_size=8)
    assert short.max_len == 16
    s = short.add_sequence()
    short.step([(s, list(range(15)))])
    short.step([(s, [1])])
    with pytest.raises(BitlmError, match="of 17 tokens exceeds the context length 16"):
        short.step([(s, [1])])
    assert short.seq_len(s) == 16


def test_truncate_rolls_back_to_the_same_logits(tiny):
    """Rolled back to a position, a sequence continues as if the later tokens had never been run
    (their keys and values are overwritten; blocks past the new end go back to the pool)."""
    V = tiny.config.vocab_size
    ids = np.random.default_rng(6).integers(0, V, 30)
    nm = native.NativeModel.from_model(tiny, max_len=64)
    eng = BatchEngine(nm, max_seqs=1, block_size=4)
    s = eng.add_sequence()
    eng.step([(s, ids[:11])])
    want = eng.step([(s, ids[11:20])])[0]
    eng.step([(s, np.arange(9))])  # a wrong continuation, then rolled back
    eng.truncate(s, 11)
    assert eng.seq_len(s) == 11 and eng.used_blocks == 3
    assert np.array_equal(eng.step([(s, ids[11:20])])[0], want)


def test_a_step_of_more_rows_than_a_native_call_takes(tiny):
    """Over ubatch rows a step runs as several native calls, a long chunk split between them: the
    logits are those of one call."""
    V = tiny.config.vocab_size
    arrays = native.arrays_from_model(tiny, "q8")
    p = plans(np.random.default_rng(7), V, n_seqs=8)
    nm = native.NativeModel(tiny.config, arrays, max_len=128)
    want = run_batched(BatchEngine(nm, max_seqs=8), p)
    for ubatch in (1, 5, 13):
        eng = BatchEngine(nm, max_seqs=8)
        eng.ubatch = ubatch
        assert_same(run_batched(eng, p), want, ubatch)


def test_every_rows_logits_equal_the_last_row_path_and_one_row_at_a_time(tiny):
    """(sid, tokens, n_out) entries give the logits of the last n_out rows (speculative verification
    asks for all of them): bit for bit the rows a NativeModel gives running the same tokens one at a
    time, and the last of them what a (sid, tokens) entry gives, also when the wanted rows of an entry
    are split over native calls (small ubatch) and beside entries asking for none (n_out = 0)."""
    V = tiny.config.vocab_size
    rng = np.random.default_rng(11)
    arrays = native.arrays_from_model(tiny, "q8")
    seqs = [rng.integers(0, V, n) for n in (37, 9, 21, 4)]
    for path in PATHS:
        nm = native.NativeModel(tiny.config, arrays, max_len=64, path=path)
        one_by_one = []
        for s in seqs:
            nm.reset()
            one_by_one.append(np.concatenate([nm.forward(s[i:i + 1]) for i in range(len(s))]))
        for ubatch in (64, 5, 1):
            eng = BatchEngine(nm, max_seqs=4, block_size=8)
            eng.ubatch = ubatch
            last = BatchEngine(nm, max_seqs=4, block_size=8)
            sids, lids = [eng.add_sequence() for _ in seqs], [last.add_sequence() for _ in seqs]
            done = [0] * len(seqs)
            for sizes in ([12, 1, 6, 4], [1, 8, 6, 0], [24, 0, 9, 0]):
                work = [(sid, seqs[i][done[i]:done[i] + k], min(k, (3, k, 0, 2)[i]))
                        for i, (sid, k) in enumerate(zip(sids, sizes)) if k]
                rows = eng.step(work)
                lrows = last.step([(lids[sids.index(sid)], t) for sid, t, _ in work])
                for (sid, t, n_out), got, lrow in zip(work, rows, lrows):
                    i = sids.index(sid)
                    done[i] += len(t)
                    assert got.shape == (n_out, V) and got.dtype == np.float32
                    assert np.array_equal(got, one_by_one[i][done[i] - n_out:done[i]]), (path, ubatch, i)
                    assert np.array_equal(lrow, one_by_one[i][done[i] - 1]), (path, ubatch, i)
                    if n_out:
                        assert np.array_equal(got[-1], lrow)
            assert done == [37, 9, 21, 4] and [eng.seq_len(s) for s in sids] == done


def test_speculative_rows_then_truncate_continue_as_plain_decoding(tiny):
    """A scheduler's round: [last, d1 .. dk] with all k + 1 rows, the rejected drafts truncated, then
    decoding on: the same logits as decoding the accepted tokens one at a time."""
    V = tiny.config.vocab_size
    rng = np.random.default_rng(12)
    nm = native.NativeModel.from_model(tiny, max_len=64)
    ids = rng.integers(0, V, 30)
    nm.reset()
    want = np.concatenate([nm.forward(ids[i:i + 1]) for i in range(len(ids))])
    eng = BatchEngine(nm, max_seqs=2, block_size=4)
    s, other = eng.add_sequence(), eng.add_sequence()
    eng.step([(s, ids[:10], 0), (other, rng.integers(0, V, 7))])
    c = 10  # the cache holds ids[:c]; ids[c] is the last token, not yet run
    for accepted in (2, 0, 5, 1):  # drafts: the true continuation up to `accepted`, then wrong tokens
        k = accepted + 2
        draft = list(ids[c + 1:c + 1 + accepted]) + [int(ids[c + 1 + accepted] + 1) % V, 3]
        rows = eng.step([(s, [ids[c]] + draft, k + 1), (other, [1])])[0]
        assert rows.shape == (k + 1, V)
        assert np.array_equal(rows[:accepted + 1], want[c:c + accepted + 1])
        assert not np.array_equal(rows[accepted + 1], want[c + accepted + 1])  # after a wrong draft
        c += 1 + accepted
        eng.truncate(s, c)  # the rejected drafts' positions rolled back
        assert eng.seq_len(s) == c
    assert np.array_equal(eng.step([(s, ids[c:c + 4])])[0], want[c + 3])


def test_bytes_per_block_at_the_2b4t_shape():
    """30 layers x (keys, values) x 5 KV heads x 16 positions x head_dim 128 x 2 bytes (f16): the figure
    the module docstring gives, and 16 sequences of 1,747 positions in the default 2 GiB budget."""
    from bitlm.engine.batch import DEFAULT_KV_BUDGET, kv_block_bytes
    cfg = bitlm.preset("2b4t")
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (30, 5, 128)
    assert kv_block_bytes(cfg, "f16", 16) == 1_228_800 and kv_block_bytes(cfg, "f32", 16) == 2_457_600
    assert kv_block_bytes(cfg, "q8_0", 16) == 30 * 2 * 5 * 16 * 136 == 652_800  # 4 blocks of 34 bytes a row
    with pytest.raises(BitlmError, match="KV cache type 'q4' is not one of f32, f16, q8_0"):
        kv_block_bytes(cfg, "q4")
    assert DEFAULT_KV_BUDGET // kv_block_bytes(cfg) == 1747


def test_default_pool_size_follows_max_seqs_under_the_budget(tiny, monkeypatch):
    from bitlm.engine import batch
    nm = native.NativeModel.from_model(tiny, max_len=100)
    eng = BatchEngine(nm, max_seqs=3, block_size=16)
    assert eng.total_blocks == 3 * 7  # ceil(100 / 16) blocks a full context
    monkeypatch.setattr(batch, "DEFAULT_KV_BUDGET", 10 * eng.block_bytes)
    assert BatchEngine(nm, max_seqs=3, block_size=16).total_blocks == 10
    monkeypatch.setattr(batch, "DEFAULT_KV_BUDGET", 1)
    assert BatchEngine(nm, max_seqs=3, block_size=16).total_blocks == 7  # one full context at least


def test_forked_sequences_share_blocks_and_copy_on_write(tiny):
    """A prompt run once and forked: both continuations equal sequences that ran the whole prompt
    themselves, bit for bit; the full blocks stay shared, the partly filled one is copied by the first
    sequence that writes into it, and a block returns to the pool when its last holder lets go."""
    V = tiny.config.vocab_size
    rng = np.random.default_rng(8)
    prompt, x, y = rng.integers(0, V, 37), rng.integers(0, V, 6), rng.integers(0, V, 20)
    nm = native.NativeModel.from_model(tiny, max_len=128)
    eng = BatchEngine(nm, max_seqs=5, block_size=16)
    a = eng.add_sequence()
    eng.step([(a, prompt)])
    assert eng.used_blocks == 3  # positions 0..36
    b = eng.fork_sequence(a)
    assert eng.seq_len(b) == 37 and eng.used_blocks == 3
    assert eng.blocks_needed(a, 1) == 1 and eng.blocks_needed(b, 11) == 1  # the shared third block, copied
    got = eng.step([(a, x), (b, y)])  # a copies block 2; b, then its only holder, writes in place
    assert eng.used_blocks == 3 + 1 + 1  # shared 0, 1; a's copy of 2; b's 2 and its new block 3
    fresh = BatchEngine(nm, max_seqs=2, block_size=16)
    fa, fb = fresh.add_sequence(), fresh.add_sequence()
    want = fresh.step([(fa, np.concatenate([prompt, x])), (fb, np.concatenate([prompt, y]))])
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    # forks of forks, then decode steps, still the fresh sequences' logits
    c = eng.fork_sequence(b)
    for tok in rng.integers(0, V, 5):
        got = eng.step([(a, [tok]), (b, [tok]), (c, [tok])])
        want = fresh.step([(fa, [tok]), (fb, [tok])])
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert np.array_equal(got[2], want[1])
    eng.free_sequence(a)
    eng.free_sequence(b)
    assert eng.used_blocks == 4  # c still holds blocks 0, 1 (shared by all three), b's block 2 and block 3
    eng.free_sequence(c)
    assert eng.used_blocks == 0 and eng.free_blocks == eng.total_blocks


def test_a_sequence_freed_from_another_thread_waits_for_the_step(tiny):
    """A server frees a sequence (its client left) from another thread: the free waits for the step in
    flight, which still gets the logits it would have had, and the blocks then return to the pool."""
    import threading
    V = tiny.config.vocab_size
    ids = np.random.default_rng(9).integers(0, V, 40)
    nm = native.NativeModel.from_model(tiny, max_len=64)
    eng = BatchEngine(nm, max_seqs=2, block_size=8)
    a, b = eng.add_sequence(), eng.add_sequence()
    eng.ubatch = 1  # a step of 80 native calls: long enough for the other thread to try in the middle
    started = threading.Event()
    real_run = eng._run

    still_there = []  # whether b was still live when the step's native calls ended

    def run(entries):
        started.set()
        out = real_run(entries)
        still_there.append(b in eng._seqs)
        return out

    eng._run = run
    freer = threading.Thread(target=lambda: (started.wait(), eng.free_sequence(b)))
    freer.start()
    got = eng.step([(a, ids), (b, ids)])
    freer.join()
    assert still_there == [True] and eng.sequences == [a] and eng.used_blocks == 5
    assert np.array_equal(got[0], got[1])
    alone = BatchEngine(nm, max_seqs=1, block_size=8)
    assert np.array_equal(got[1], alone.step([(alone.add_sequence(), ids)])[0])


def test_t5_weights_batched_equal_i2v_batched(model):
    """The same model with its projections in the 1.6-bit T5 format: the batched engine's logits equal
    I2V's bit for bit on every kernel path (the kernels' integer sums are exact, the float ops the same)."""
    V = model.config.vocab_size
    p = plans(np.random.default_rng(3), V, n_seqs=8)
    arrays = {w: native.arrays_from_model(model, "q8", w) for w in native.WEIGHTS}
    for path in PATHS:
        got = {w: run_batched(BatchEngine(native.NativeModel(model.config, a, max_len=128, kv="f16", path=path,
                                                             weights=w), max_seqs=8, block_size=16), p)
               for w, a in arrays.items()}
        assert_same(got["t5"], got["i2v"], path)
