"""The tokenizer (tokenizer.json through the `tokenizers` library) and the chat template (jinja, from
tokenizer_config.json or chat_template.jinja), with the special tokens a BitNet model stops on."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BitlmError
from ..io.files import read_json_object


def _token_str(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    def __init__(self, tok, tokenizer_config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | None = None, special_tokens_map: dict | None = None,
                 eos_token_ids: list[int] | None = None):
        self.tok = tok
        self.tokenizer_config = dict(tokenizer_config or {})
        self.generation_config = dict(generation_config or {})
        self.special_tokens_map = dict(special_tokens_map or {})
        self.chat_template = chat_template
        cfg = {**self.special_tokens_map, **self.tokenizer_config}
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else None
        stops = list(eos_token_ids or [])
        gen_eos = self.generation_config.get("eos_token_id")
        stops += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        for name in (self.eos_token, "<|eot_id|>", "<|end_of_text|>"):
            i = self.token_to_id(name) if name else None
            if i is not None:
                stops.append(i)
        self.stop_token_ids = sorted(set(stops))

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, tokenizer_json, **kwargs) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(str(tokenizer_json))
        except Exception as e:
            raise BitlmError(f"{tokenizer_json}: not a readable tokenizer.json ({str(e)[:120]})") from None
        return cls(tok, **kwargs)

    @classmethod
    def from_dir(cls, path: Path, config=None) -> "Tokenizer | None":
        """The tokenizer of a model directory, or None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        tcfg = read_json_object(path / "tokenizer_config.json", missing_ok=True)
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls.from_file(path / "tokenizer.json", tokenizer_config=tcfg,
                             generation_config=read_json_object(path / "generation_config.json", missing_ok=True),
                             special_tokens_map=read_json_object(path / "special_tokens_map.json", missing_ok=True),
                             chat_template=template,
                             eos_token_ids=config.eos_token_ids if config is not None else None)

    def save(self, path: Path) -> None:
        path = Path(path)
        self.tok.save(str(path / "tokenizer.json"))
        tcfg = dict(self.tokenizer_config)
        if self.chat_template is not None:
            tcfg["chat_template"] = self.chat_template
        tcfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
        if self.special_tokens_map:
            (path / "special_tokens_map.json").write_text(json.dumps(self.special_tokens_map, indent=2) + "\n")
        if self.generation_config:
            (path / "generation_config.json").write_text(json.dumps(self.generation_config, indent=2) + "\n")

    # ---- text <-> ids --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids. The tokenizer's own post-processor adds BOS where it should (Llama 3 does);
        never add a second one by hand."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise BitlmError("this model has no chat template (tokenizer_config.json chat_template); "
                             "use `bitlm generate` with a plain prompt instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BitlmError(f"chat message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise BitlmError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a chat. The template writes its own special tokens (BOS included), so none are added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
