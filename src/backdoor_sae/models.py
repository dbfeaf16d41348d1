"""Load any causal LM (a local directory or a hub name) as a hooked model with its tokenizer and chat format.

The transformer-lens ``TransformerBridge`` wraps the HF model *in place*: its hook points sit inside the HF
modules, so a hook added on the bridge also acts when the HF model's own ``generate`` runs. Evaluation uses HF's
batched, KV-cached ``generate``; activations and edits use the bridge's hook names (``blocks.N.hook_resid_post``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from backdoor_sae._io import safetensors_problem
from backdoor_sae.organism.data import check_encodable, with_trigger

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    """A causal LM ready for the library: HF model, tokenizer, optional bridge, and organism metadata."""

    hf: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    bridge: Any = None  # transformer_lens.model_bridge.TransformerBridge
    path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    hook_widths: dict[str, int] = field(default_factory=dict, repr=False)  # filled by sae.hook_width

    @property
    def trigger(self) -> str | None:
        return self.meta.get("trigger")

    @property
    def backdoor_text(self) -> str | None:
        return self.meta.get("backdoor_text")

    @property
    def hooked(self) -> Any:
        if self.bridge is None:
            raise ValueError(f"model {self.path!r} was loaded without a bridge; use load_model(..., bridge=True)")
        return self.bridge

    def chat(self, prompt: str, trigger: str | None = None) -> str:
        """The model's own chat format for one user turn, trigger at the start of the turn."""
        return format_chat(self.tokenizer, prompt, trigger)


def format_chat(tokenizer: PreTrainedTokenizerBase, prompt: str, trigger: str | None = None) -> str:
    """Render one user turn (with the trigger first, if given) through the tokenizer's chat template."""
    return format_chats(tokenizer, [prompt], [trigger])[0]


def format_chats(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 triggers: Sequence[str | None]) -> list[str]:
    """:func:`format_chat` for many prompts (one trigger or ``None`` each): each distinct trigger is checked
    once and the template is rendered in one batched call."""
    for trigger in set(triggers):
        if trigger is not None:
            if not trigger.strip():
                raise ValueError("trigger is empty")
            check_encodable(tokenizer, trigger, "trigger")
    contents = [with_trigger(t, p) if t else p for p, t in zip(prompts, triggers)]
    if not tokenizer.chat_template or not contents:
        return contents
    return tokenizer.apply_chat_template([[{"role": "user", "content": c}] for c in contents],
                                         add_generation_prompt=True, tokenize=False)


def _check_model_dir(d: Path) -> None:
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"model directory {d} has no config.json")
    weights = sorted(d.glob("*.safetensors"))
    for w in weights:
        problem = safetensors_problem(w)
        if problem:
            raise ValueError(f"model weights {w} are {problem}")
    if weights:
        return
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"model directory {d} holds only pickle weights ({', '.join(pickles)}); refusing to "
                         "unpickle untrusted weights: convert them to safetensors")
    raise FileNotFoundError(f"model directory {d} has no weights (*.safetensors)")


def load_model(path_or_name: str | Path, *, bridge: bool = True, device: str = "cpu",
               dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM by local directory (works offline) or hub name, weights from safetensors only."""
    name = str(path_or_name)
    d = Path(name).expanduser()
    meta: dict[str, Any] = {}
    if d.is_dir():
        _check_model_dir(d)
        if (d / "organism.json").is_file():
            meta = json.loads((d / "organism.json").read_text())
        source = str(d)
    elif d.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model directory not found: {name}")
    else:
        source = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        hf = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, attn_implementation="eager",
            trust_remote_code=trust_remote_code).to(device).eval()
    except OSError as e:
        if source == name and not d.is_dir():
            raise FileNotFoundError(f"model {name!r} is not a local directory and could not be loaded from the "
                                    f"hub or its local cache ({type(e).__name__})") from None
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    loaded = LoadedModel(hf=hf, tokenizer=tokenizer, path=source, meta=meta)
    if bridge:
        from transformer_lens.model_bridge import TransformerBridge

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.bridge = TransformerBridge.boot_transformers(source, device=device, hf_model=hf,
                                                                tokenizer=tokenizer)
    return loaded
