"""The Triton W1.58A8 kernels (bitlm.gpu) on a GPU: per-projection time against a bf16 matmul, and decode.

    python benchmarks/gpu_kernels.py [--repeats 50] [--pool-mb 512] [--shape 2b4t] [--n-gen 128] [--no-decode]
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --cpu-smoke     # the script's code paths, no GPU

1. Projections at the 2B4T shapes (K -> N: q|k|v 2560->3840, o 2560->2560, gate|up 2560->13824,
   down 6912->2560) for M = 1, 8, 128 activation rows: bitlm's kernels.bitlinear (the activation
   quantization included: the fused GEMV at M = 1, quantize + int8 tl.dot GEMM above) beside
   torch.matmul(x, W^T) in bf16 on the same shapes, microseconds per call (CUDA events, the median of
   --repeats). Weights are cold as in decode: each call takes the next of enough copies of the matrix to
   fill --pool-mb (past the L2 cache), for both sides. Each shape's int32 sums are first checked against
   torch's integer product of the unpacked codes (exactly).
2. Decode tokens/s of a random model of --shape (bf16 activations) through the Triton kernels and of
   its full-precision bf16 twin (nn.Linear projections), each eager and replayed from a CUDA graph
   (torch.cuda.CUDAGraph over a static-shape decode step: the KV cache at full length, the position a
   device tensor, attention masked to the positions written). The graph removes the per-kernel launch
   cost that dominates a batch-1 decode step; its logits are first checked against the model's own
   eager decode.

Exits with a message when there is no CUDA GPU or no Triton. Never imported by the tests. No figure from
it has been recorded yet (it has not been run on a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PROJECTIONS = [("q|k|v", 2560, 3840), ("o", 2560, 2560), ("gate|up", 2560, 13824), ("down", 6912, 2560)]
ROWS = (1, 8, 128)


def fail(msg: str) -> None:
    print(f"gpu_kernels.py: {msg}", file=sys.stderr)
    sys.exit(2)


# ---- timing --------------------------------------------------------------------------------------
def median_us(fn, repeats: int, device: torch.device) -> float:
    """Median microseconds of fn() over `repeats` calls after three warm-ups (compilation included in
    the first): CUDA events on a GPU, the wall clock on the CPU (smoke runs only)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


class Rotation:
    """Copies of one tensor filling pool_bytes; each next() is the following copy (cold in L2)."""

    def __init__(self, t: torch.Tensor, pool_bytes: int):
        n = max(2, -(-pool_bytes // (t.numel() * t.element_size())))
        self.copies = [t.clone() for _ in range(n)]
        self.i = 0

    def next(self) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


# ---- 1. projections ------------------------------------------------------------------------------
def projections(device, repeats: int, pool_bytes: int, shapes, rows) -> None:
    from bitlm.formats import hf_packed
    from bitlm.gpu import kernels
    print(f"\n| projection | K -> N | M | bitlm triton (us) | bf16 matmul (us) | bf16 / triton |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    g = torch.Generator(device=device).manual_seed(0)
    for name, K, N in shapes:
        codes = torch.randint(-1, 2, (N, K), generator=g, device=device, dtype=torch.int8)
        packed = torch.from_numpy(hf_packed.pack(codes.cpu().numpy())).to(device)
        scale = torch.tensor([0.02], device=device)
        w_bf16 = (codes.to(torch.bfloat16) * 0.02)
        # the int32 sums, exactly, against torch's integer product (on the CPU: no int matmul on CUDA)
        x = torch.randn(3, K, generator=g, device=device)
        xq, s = kernels.quantize_rows(x)
        got = kernels.gemm(xq, s, packed, scale, N, raw=True).cpu().long()
        if not torch.equal(got, xq.cpu().long() @ codes.cpu().long().t()):
            fail(f"{name} {K}->{N}: the kernel's int32 sums differ from the reference; no timings for a wrong kernel")
        packs, weights = Rotation(packed, pool_bytes), Rotation(w_bf16, pool_bytes)
        for M in rows:
            x = torch.randn(M, K, generator=g, device=device, dtype=torch.bfloat16)
            t_tri = median_us(lambda: kernels.bitlinear(x, packs.next(), scale, N), repeats, device)
            t_bf16 = median_us(lambda: torch.matmul(x, weights.next().t()), repeats, device)
            print(f"| {name} | {K} -> {N} | {M} | {t_tri:.1f} | {t_bf16:.1f} | {t_bf16 / t_tri:.2f} |")
        del packs, weights


# ---- 2. decode -----------------------------------------------------------------------------------
class StaticDecoder:
    """One decode step of a BitNetForCausalLM with static shapes, so that a CUDA graph can replay it:
    the KV cache is (1, n_kv, max_len, hd) and attention sees all of it with positions > pos masked;
    the token and position are device tensors written before each replay."""

    def __init__(self, model, max_len: int):
        cfg = model.config
        self.model, self.cfg = model, cfg
        shape = (1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        dev, dt = model.device, model.dtype
        self.k = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(cfg.num_hidden_layers)]
        self.tok = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((1,), dtype=torch.long, device=dev)
        self.positions = torch.arange(max_len, device=dev)

    def step(self) -> torch.Tensor:
        """Logits (1, V) after self.tok at position self.pos; writes that position's keys and values."""
        from bitlm.model import apply_rope
        m, cfg = self.model.model, self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = m.embed_tokens(self.tok)  # (1, 1, H)
        cos = m.rotary.cos.index_select(0, self.pos).to(x.dtype)  # (1, hd)
        sin = m.rotary.sin.index_select(0, self.pos).to(x.dtype)
        mask = (self.positions <= self.pos)[None]  # (1, max_len): the keys written so far, this one included
        for i, block in enumerate(m.layers):
            a = block.self_attn
            h = block.input_layernorm(x)
            q = a.q_proj(h).view(1, 1, nh, hd).transpose(1, 2)  # (1, nh, 1, hd)
            k = a.k_proj(h).view(1, 1, nkv, hd).transpose(1, 2)
            v = a.v_proj(h).view(1, 1, nkv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, enable_gqa=nkv != nh)
            x = x + a.o_proj(a.attn_sub_norm(y.transpose(1, 2).reshape(1, 1, nh * hd)))
            x = x + block.mlp(block.post_attention_layernorm(x))
        return self.model.lm_head(m.norm(x))[:, -1]


def check_static_decoder(model, steps: int = 4) -> float:
    """Max |difference| between StaticDecoder's logits and the model's own eager decode."""
    dec = StaticDecoder(model, steps + 1)
    cache = model.new_cache(max_len=steps + 1)
    worst = 0.0
    tok = 1
    for p in range(steps):
        dec.tok.fill_(tok)
        dec.pos.fill_(p)
        a = dec.step()
        b = model(torch.tensor([[tok]], device=model.device), cache, logits_to_keep=1)[:, -1]
        worst = max(worst, float((a.float() - b.float()).abs().max()))
        tok = int(b.argmax())
    return worst


def decode_tokens_per_s(model, n_gen: int, graph: bool) -> float:
    dec = StaticDecoder(model, n_gen + 1)
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile the kernels and settle the allocator before capture
                dec.step()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = dec.step()
        step = g.replay
    else:
        logits = None
        step = None
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def run():
        nonlocal logits
        dec.tok.fill_(1)
        for p in range(n_gen):
            dec.pos.fill_(p)
            if graph:
                step()
            else:
                logits = dec.step()
            dec.tok.copy_(logits.argmax(-1).view(1, 1))  # the next token stays on the device
        sync()

    run()  # warm-up
    t = time.perf_counter()
    run()
    return n_gen / (time.perf_counter() - t)


def decode(device, shape: str, n_gen: int, smoke: bool) -> None:
    from bitlm.engine.bench import random_torch_model
    from bitlm.model import BitNetForCausalLM
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ternary = random_torch_model(shape, device, dtype=dtype, kernel="triton")
    with torch.device(device):
        fp = BitNetForCausalLM(ternary.config, linear="fp").to(dtype).requires_grad_(False)
    print(f"\ndecode, random {shape} model, {str(dtype)[6:]} activations, {n_gen} tokens from an empty context")
    print("| model | launch | tokens/s |")
    print("| --- | --- | ---: |")
    with torch.inference_mode():
        for name, model in (("bitlm ternary, Triton kernels", ternary), ("full-precision twin, nn.Linear", fp)):
            err = check_static_decoder(model)
            tol = 0.5 if dtype == torch.bfloat16 else 1e-3  # bf16 logits of O(10): a few ulp
            if err > tol:
                fail(f"{name}: the static decode step's logits differ from the model's by {err:.3g}")
            for graph in ((False,) if smoke else (False, True)):
                rate = decode_tokens_per_s(model, n_gen, graph)
                print(f"| {name} | {'CUDA graph' if graph else 'eager'} | {rate:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--pool-mb", type=int, default=512, help="weight copies per shape, past the L2 cache")
    p.add_argument("--shape", default="2b4t", help="preset of the decode model (default 2b4t)")
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the script's code paths on the CPU under TRITON_INTERPRET=1 at tiny shapes; "
                        "the times it prints are the interpreter's and mean nothing")
    args = p.parse_args(argv)
    try:
        import triton
    except ImportError:
        fail("Triton is not installed: pip install 'bitlm[gpu]'")
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            fail("--cpu-smoke runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
        device = torch.device("cpu")
        print("CPU SMOKE RUN under Triton's interpreter: the code paths only; these times are not measurements")
        projections(device, 2, 1 << 20, [(n, k // 16, nn // 16) for n, k, nn in PROJECTIONS], (1, 8))
        if not args.no_decode:
            decode(device, "tiny", 8, smoke=True)
        return 0
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
             "TRITON_INTERPRET=1 ... --cpu-smoke runs its code paths on the CPU")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}")
    projections(device, args.repeats, args.pool_mb << 20, PROJECTIONS, ROWS)
    if not args.no_decode:
        decode(device, args.shape, args.n_gen, smoke=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
