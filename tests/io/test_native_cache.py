"""The native cache cannot poison a run: a damaged, older, foreign or stale file under the cache's name
is rebuilt with one line on stderr, two processes converting at once both get the same whole file, and
an unwritable cache is one clear error. Each rebuilt file is checked by its logits against a fresh
conversion of the checkpoint."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bitlm
from bitlm.cli import main
from bitlm.errors import BitlmError
from bitlm.io import native, st

pytestmark = pytest.mark.skipif(not __import__("bitlm.kernels", fromlist=["x"]).available(),
                                reason="native kernels not built")

IDS = np.array([3, 17, 101, 5, 77, 200, 9], dtype=np.int64)


@pytest.fixture
def model(tiny_model_dir, tmp_path, monkeypatch):
    """A private copy of the tiny checkpoint (the tests touch its files) and an empty cache."""
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    return d


def logits(nm) -> np.ndarray:
    return nm.forward(IDS, n_out=len(IDS))


def reference(model_dir: Path, tmp_path: Path, name: str = "ref") -> np.ndarray:
    """The logits of a fresh conversion of the checkpoint as it is now, outside the cache."""
    f = native.convert(model_dir, tmp_path / f"{name}.safetensors", "q8")
    return logits(native.open_native(f))


def load_expecting(model_dir, capsys, reason: str | None):
    """load_native, asserting stderr is exactly the one rebuild line with `reason` (a regex), or empty."""
    capsys.readouterr()
    nm = bitlm.load_native(model_dir, tokenizer=False)
    err = capsys.readouterr().err
    dest = native.cache_path(model_dir, "q8")
    if reason is None:
        assert err == "" and not nm.source["converted"]
    else:
        lines = err.splitlines()
        assert len(lines) == 1, err
        prefix = f"bitlm: rebuilding the native file {dest}: "
        assert lines[0].startswith(prefix), lines[0]
        assert re.fullmatch(reason, lines[0][len(prefix):]), lines[0]
        assert nm.source["converted"]
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")) == [dest.name]
    return nm


def first_load(model_dir, capsys):
    """The first load converts, and says so in one line (no bar: stderr is not a terminal here)."""
    from bitlm.io.native import cache_dir
    capsys.readouterr()
    nm = bitlm.load_native(model_dir, tokenizer=False)
    err = capsys.readouterr().err
    assert nm.source["converted"]
    assert err == f"bitlm: converting {model_dir} for the native runtime (once; cached in {cache_dir()})\n", err
    return nm


def test_a_good_file_is_used_as_it_is(model, tmp_path, capsys):
    first_load(model, capsys)
    dest = native.cache_path(model, "q8")
    before = dest.stat().st_mtime_ns
    again = load_expecting(model, capsys, None)
    assert dest.stat().st_mtime_ns == before
    assert np.array_equal(logits(again), reference(model, tmp_path))


@pytest.mark.parametrize("damage, reason", [
    ("cut the data", r"truncated: the header promises \d+ bytes of data, the file holds \d+"),
    ("cut the header", r"truncated: its header length is \d+ bytes, the file has 40"),
    ("empty", r"not a safetensors file \(only 0 bytes\)"),
    ("garbage", r"not a safetensors file: its header length is \d+ bytes, the file has 4096"),
    ("trailing bytes", r"3 bytes after the last tensor \(the header accounts for \d+ of \d+\)"),
])
def test_a_damaged_file_is_rebuilt(model, tmp_path, capsys, damage, reason):
    first_load(model, capsys)
    dest = native.cache_path(model, "q8")
    data = dest.read_bytes()
    dest.write_bytes({"cut the data": data[:-100], "cut the header": data[:40], "empty": b"",
                      "garbage": np.random.default_rng(0).bytes(4096), "trailing bytes": data + b"abc"}[damage])
    nm = load_expecting(model, capsys, reason)
    assert dest.read_bytes() == data  # the same file again, byte for byte
    assert np.array_equal(logits(nm), reference(model, tmp_path))


def test_a_file_left_half_written_by_a_killed_conversion_is_removed(model, tmp_path, capsys):
    """A conversion killed midway leaves its temporary file (never the final name, written by rename):
    the next load removes it and converts, saying so."""
    first_load(model, capsys)
    dest = native.cache_path(model, "q8")
    data = dest.read_bytes()
    dest.unlink()
    (dest.parent / f".{dest.name}.k1ll3d.tmp").write_bytes(data[:len(data) // 2])
    nm = load_expecting(model, capsys, r"an earlier conversion was interrupted \(its partial file is removed\)")
    assert dest.read_bytes() == data
    assert np.array_equal(logits(nm), reference(model, tmp_path))


def rewrite_metadata(path: Path, **changes) -> None:
    """The native file at path written again with the same arrays and changed metadata."""
    arrays, meta = st.open_arrays(path)
    header, _ = st.read_header(path)
    tensors = {k: (header[k]["dtype"], np.array(v)) if header[k]["dtype"] == "BF16" else np.array(v)
               for k, v in arrays.items()}
    meta = {**meta, **changes}
    meta["data_size"] = changes.get("data_size", str(st.data_size(tensors)))
    st.write(path, tensors, meta)


@pytest.mark.parametrize("change, reason", [
    ({"bitlm_format": "native-v1"}, r"it is in format 'native-v1'; this bitlm reads native-v2"),
    ({"bitlm_format": None}, r"not a bitlm native file \(no bitlm_format in its metadata\)"),
    ({"data_size": "12"}, r"its metadata records '12' bytes of data, the file holds \d+"),
    ({"source": "{"}, r"its record of what it was made from is missing or malformed"),
    ({"source": json.dumps({"dir": "/elsewhere", "head": "q8", "files": {}})},
     r"it was made from dir '/elsewhere', not '.*/m'"),
])
def test_an_older_or_foreign_file_is_rebuilt(model, tmp_path, capsys, change, reason):
    first_load(model, capsys)
    dest = native.cache_path(model, "q8")
    data = dest.read_bytes()
    rewrite_metadata(dest, **{k: v for k, v in change.items() if v is not None})
    if change.get("bitlm_format", "") is None:  # a plain safetensors file: no bitlm metadata at all
        arrays, _ = st.open_arrays(dest)
        st.write(dest, {k: np.array(v) for k, v in arrays.items()}, {})
    assert dest.read_bytes() != data
    nm = load_expecting(model, capsys, reason)
    assert dest.read_bytes() == data
    assert np.array_equal(logits(nm), reference(model, tmp_path))


def test_a_file_of_an_earlier_state_of_the_checkpoint_is_rebuilt(model, tmp_path, capsys):
    """Touching config.json, then new weights of the same size: each a rebuild, the second with the new
    model's numbers."""
    old = logits(first_load(model, capsys))
    st_ = (model / "config.json").stat()
    os.utime(model / "config.json", ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    nm = load_expecting(model, capsys, r"the checkpoint's config.json changed since it was converted")
    assert np.array_equal(logits(nm), old)

    from helpers import make_tiny_model_dir
    other = make_tiny_model_dir(tmp_path / "other", seed=5)
    assert (other / "model.safetensors").stat().st_size == (model / "model.safetensors").stat().st_size
    shutil.copyfile(other / "model.safetensors", model / "model.safetensors")
    nm = load_expecting(model, capsys, r"the checkpoint's model.safetensors changed since it was converted")
    new = logits(nm)
    assert np.array_equal(new, reference(model, tmp_path)) and not np.array_equal(new, old)


def test_an_explicit_damaged_file_is_one_line_and_left_alone(model, tmp_path):
    """open_native of a path (not the cache) has no checkpoint to rebuild from: a one-line error."""
    f = native.convert(model, tmp_path / "x.safetensors", "q8")
    cut = f.read_bytes()[:-7]
    f.write_bytes(cut)
    with pytest.raises(BitlmError) as e:
        native.open_native(f)
    msg = str(e.value)
    assert re.fullmatch(rf"{re.escape(str(f))}: truncated: the header promises (\d+) bytes of data, the file "
                        r"holds (\d+); convert the checkpoint again", msg)
    promised, held = map(int, re.fullmatch(r".*promises (\d+) .* holds (\d+);.*", msg).groups())
    assert promised - held == 7
    assert f.read_bytes() == cut


def test_a_synthetic_bench_file_is_rebuilt_too(tmp_path, monkeypatch, capsys):
    from bitlm.engine.bench import synthetic_native_file
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    f = synthetic_native_file("tiny")
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    capsys.readouterr()
    assert synthetic_native_file("tiny") == f
    assert capsys.readouterr().err.startswith(f"bitlm: rebuilding the native file {f}: truncated: ")
    assert f.read_bytes() == data  # the same seed: the same bytes
    native.open_native(f)


def test_an_unwritable_cache_is_one_clear_error(model, tmp_path, monkeypatch, capsys):
    """BITLM_CACHE below a regular file: no process, root included, can make the directory."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "a-file" / "cache"))
    want = (f"cannot write the native cache {tmp_path / 'a-file' / 'cache' / 'native'} (Not a directory); "
            "set BITLM_CACHE to a writable directory")
    with pytest.raises(BitlmError) as e:
        bitlm.load_native(model)
    assert str(e.value) == want
    capsys.readouterr()
    assert main(["generate", "-m", str(model), "-p", "hi", "-n", "2", "--runtime", "native"]) == 2
    assert capsys.readouterr().err == f"bitlm: error: {want}\n"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_cache_is_one_clear_error(model, tmp_path, monkeypatch):
    cache = tmp_path / "ro"
    (cache / "native").mkdir(parents=True)
    (cache / "native").chmod(0o555)
    monkeypatch.setenv("BITLM_CACHE", str(cache))
    try:
        with pytest.raises(BitlmError, match=r"^cannot write the native cache .*/ro/native \(Permission denied\); "
                                             r"set BITLM_CACHE to a writable directory$"):
            bitlm.load_native(model)
    finally:
        (cache / "native").chmod(0o755)


CONVERTER = r"""
import os, sys, time
import numpy as np
import bitlm
model_dir, out, me, other = sys.argv[1:5]
open(me, "w").close()
t = time.monotonic()
while not os.path.exists(other):  # start converting together
    if time.monotonic() - t > 120:
        sys.exit("the other process never started")
    time.sleep(0.001)
nm = bitlm.load_native(model_dir, tokenizer=False)
np.save(out, nm.forward(np.array(%s), n_out=%d))
print(int(nm.source["converted"]))
""" % (IDS.tolist(), len(IDS))


def test_two_processes_converting_at_once_share_one_whole_file(model, tmp_path, capsys):
    env = {**os.environ, "BITLM_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(bitlm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERTER, str(model), str(tmp_path / f"out{i}.npy"),
                               str(tmp_path / f"ready{i}"), str(tmp_path / f"ready{1 - i}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        # the one that converts says so; the one that waited says nothing
        assert err == ("" if out.strip() == "0" else
                       f"bitlm: converting {model} for the native runtime (once; cached in {tmp_path / 'cache' / 'native'})\n"), err
    # one converted; the other waited on the lock and then found the whole file
    assert sorted(int(out) for out, _ in results) == [0, 1]
    a, b = np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy")
    assert np.array_equal(a, b) and np.array_equal(a, reference(model, tmp_path))
    dest = native.cache_path(model, "q8")
    assert dest.parent == tmp_path / "cache" / "native"
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([dest.name, f".{dest.name}.lock"])


def test_generate_without_config_json_is_one_line(model, capsys):
    """The native path checks the checkpoint before it names its cache file (issue 11)."""
    (model / "config.json").unlink()
    assert main(["generate", "-m", str(model), "-p", "hi", "-n", "2", "--runtime", "native"]) == 2
    assert capsys.readouterr().err == (f"bitlm: error: {model / 'config.json'}: missing; a model directory "
                                       "needs config.json\n")


def test_generate_without_weights_is_one_line(model, capsys):
    (model / "model.safetensors").unlink()
    assert main(["generate", "-m", str(model), "-p", "hi", "-n", "2", "--runtime", "native"]) == 2
    assert capsys.readouterr().err == (f"bitlm: error: {model}: no model.safetensors (or "
                                       "model.safetensors.index.json) found\n")
