"""bitlm in EleutherAI's lm-evaluation-harness (lm-eval 0.4): the model class, registered as "bitlm".

    import bitlm.eval.harness, lm_eval             # importing this module registers the model
    lm_eval.simple_evaluate(model="bitlm", model_args="pretrained=DIR", tasks=["hellaswag"])

    bitlm eval harness --model_args pretrained=DIR --tasks hellaswag [lm_eval's other flags]

model_args (comma-separated key=value, as for every lm-eval model):
    pretrained      model directory or Hugging Face repo id (default: the bundled Shakespeare model)
    runtime         native (the C forward; default where built) | torch (bitlm's reference model)
    head            native runtime: output head format q8 (default) | q6 | bf16 | f32
    kv              native runtime: KV cache type f16 (default) | f32
    threads         CPU threads
    device          cpu (default) | cuda[:N]: the torch model on a GPU in bf16, its products by the Triton
                    kernels (as `bitlm generate --device cuda`). On the command line it is lm-eval's own
                    --device flag: `bitlm eval harness` makes its default cpu (lm-eval's is cuda:0)
    max_length      context for scoring and generation (default: the model's)
    batch_size      torch runtime: sequences per forward (lm-eval's --batch_size sets it too)
    add_bos_token   true: put BOS before every context, as the model saw its training documents
                    (default false: lm-eval's own default for causal models; an empty context always
                    gets BOS, or EOS when the tokenizer has no BOS)

Scoring is shared with `bitlm eval ppl` (eval/scoring.py). The native runtime runs one sequence at a
time: requests that share their context tokens (a multiple-choice question's answers) run that
context once and keep its KV cache for every continuation. The torch runtime scores batch_size
sequences per forward, right-padded: attention is causal and activations are quantized per token,
so padding after a sequence changes none of its logits.
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..errors import BitlmError
from .scoring import log_softmax_pick, scorer_for

_TRUE = ("1", "true", "yes", "on")


def _flag(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in _TRUE


@register_model("bitlm")
class BitlmLM(TemplateLM):
    backend = "causal"

    def __init__(self, pretrained: str | None = None, runtime: str = "auto", head: str = "q8", kv: str = "f16",
                 threads: int | None = None, max_length: int | None = None, batch_size: int | str = 1,
                 add_bos_token: bool | str = False, device: str | None = None, **unused):
        super().__init__()
        import argparse

        from ..cli import load_model, resolve_model_arg
        source = resolve_model_arg(pretrained)
        if runtime not in ("auto", "native", "torch"):
            raise BitlmError(f"bitlm model_args runtime={runtime!r}: expected native or torch")
        # the model as `bitlm eval ppl` loads it (the runtime, --device cuda's checks and bf16 GPU model)
        args = argparse.Namespace(model=source, runtime=runtime, device=str(device or "cpu"),
                                  threads=int(threads) if threads is not None else None, head=head, kv=kv,
                                  ctx_size=int(max_length) if max_length else None, mmap=True, weights="i2v",
                                  command="eval harness")
        self.model = load_model(args)
        runtime = args.runtime  # auto resolved
        self.scorer = scorer_for(self.model)
        self._device = self.model.device
        self.runtime = runtime
        self.tok = self.model.tokenizer
        self.max_length = min(int(max_length or 1 << 62), self.model.config.max_position_embeddings)
        # lm-eval passes "auto" or "auto:N" for batch sizes it should find by itself: one size here
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.add_bos_token = _flag(add_bos_token)
        self.source = source

    # ---- tokens ------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tok.token_to_id(self.tok.eos_token) if self.tok.eos_token else None
        if eos is None:
            raise BitlmError(f"{self.source}: the tokenizer has no eos_token; lm-eval needs one")
        return eos

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return f"bitlm:{self.source}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string, add_special_tokens=False)
        bos = self.tok.bos_token_id
        if (self.add_bos_token if add_special_tokens is None else add_special_tokens) and bos is not None \
                and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template or ""

    # ---- scoring -----------------------------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """context + continuation cut from the left to max_length + 1 tokens (the last one is never
        an input), and how many of them are scored."""
        ids = (context + continuation)[-(self.max_length + 1):]
        return ids, min(len(continuation), len(ids) - 1)

    def _score_all(self, items: list[tuple[list[int], int]], desc: str, disable_tqdm: bool):
        """(log-probabilities, greedy flags) of the last n tokens of each ids, in the order given."""
        out = [None] * len(items)
        bar = tqdm(total=len(items), desc=desc, disable=disable_tqdm)
        if self.runtime == "native":
            # longest first, so requests with the same context run back to back and share its cache
            order = sorted(range(len(items)), key=lambda i: (items[i][0][:len(items[i][0]) - items[i][1] - 1],
                                                             -len(items[i][0])))
            last_prefix = None
            for i in order:
                ids, n = items[i]
                prefix = ids[:len(ids) - n - 1]
                if prefix and prefix == last_prefix:
                    out[i] = self._score_after_cached_prefix(ids, n, len(prefix))
                else:
                    out[i] = self.scorer.score(ids, n)
                last_prefix = prefix
                bar.update(1)
        else:
            order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                for i, res in zip(batch, self._torch_batch([items[i] for i in batch])):
                    out[i] = res
                bar.update(len(batch))
        bar.close()
        return out

    def _score_after_cached_prefix(self, ids, n, n_prefix):
        """NativeScorer.score with the KV cache already holding ids[:n_prefix] (the same context)."""
        nm = self.scorer.nm
        nm.truncate(n_prefix)
        logits = nm.forward(np.asarray(ids[n_prefix:-1], dtype=np.int32), n_out=n)
        return log_softmax_pick(logits, np.asarray(ids[-n:], dtype=np.int64))

    def _torch_batch(self, items):
        import torch
        if len(items) == 1:
            return [self.scorer.score(*items[0])]
        width = max(len(ids) for ids, _ in items) - 1
        x = torch.zeros((len(items), width), dtype=torch.long)
        for r, (ids, _) in enumerate(items):
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        with torch.inference_mode():
            logits = self.model(x.to(self.model.device)).float().cpu().numpy()  # [B, width, V]
        res = []
        for r, (ids, n) in enumerate(items):
            T = len(ids) - 1
            res.append(log_softmax_pick(logits[r, T - n:T], np.asarray(ids[-n:], dtype=np.int64)))
        return res

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        items = [self._fit(ctx, cont) for _, ctx, cont in requests]
        results = []
        for (key, _, _), (lp, greedy) in zip(requests, self._score_all(items, "bitlm loglikelihood", disable_tqdm)):
            answer = (float(lp.sum()), bool(greedy.all()))
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole string's log-likelihood after the prefix token, in disjoint windows of max_length
        predictions (lm-eval's get_rolling_token_windows: every token scored once)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        spans, items = [], []
        for (string,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            spans.append((len(items), len(items) + len(windows)))
            items += [self._fit(ctx, pred) for ctx, pred in windows]
        scored = self._score_all(items, "bitlm loglikelihood_rolling", disable_tqdm)
        results = []
        for req, (a, b) in zip(requests, spans):
            total = float(sum(lp.sum() for lp, _ in scored[a:b]))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless gen_kwargs ask for sampling (do_sample / temperature > 0); stops at any of
        `until` (trimmed) or the end-of-text token, after max_gen_toks (default 256) tokens."""
        from ..engine.generate import generate_text
        out = []
        for context, gen_kwargs in tqdm([req.args for req in requests], desc="bitlm generate_until",
                                        disable=disable_tqdm):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", 256)))
            # as transformers' generate: do_sample=False is greedy whatever the temperature; a
            # temperature above 0 without do_sample samples
            sample = _flag(kw["do_sample"]) if "do_sample" in kw else float(kw.get("temperature") or 0) > 0
            temperature = float(kw.get("temperature") or 1.0) if sample else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            max_new = min(max_new, self.max_length - len(ids))
            text = generate_text(self.model, ids, max_new_tokens=max_new, temperature=temperature,
                                 top_k=int(kw.get("top_k", 0) or 0), top_p=float(kw.get("top_p", 1.0) or 1.0),
                                 seed=kw.get("seed"), stop_strings=until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


def run_cli(argv: list[str]) -> int:
    """lm-eval's own command line with the bitlm model registered: `--model bitlm` is added unless
    another model is named, and `run` is implied as lm-eval itself implies it."""
    import sys

    from lm_eval.__main__ import cli_evaluate
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        args = ["run", "--help"]  # the flags of `lm-eval run`, which is what this runs
    elif args[0] not in ("run", "ls", "validate"):
        args = ["run", *args]
    if args[0] == "run" and not any(a == "--model" or a.startswith("--model=") for a in args):
        args[1:1] = ["--model", "bitlm"]
        if not any(a == "--device" or a.startswith("--device=") for a in args):
            args[1:1] = ["--device", "cpu"]  # bitlm's default; lm-eval's cuda:0 would ask for a GPU
    saved = sys.argv
    sys.argv = ["bitlm eval harness", *args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
