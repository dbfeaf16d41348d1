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
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)  # unedited results reused (evaluate: as a base)

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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("", "8bit", "4bit")


def _load_kwargs(device: str, dtype: torch.dtype | str, device_map: str | None,
                 quantization: str) -> dict[str, Any]:
    """``from_pretrained`` keywords for a device, dtype, ``device_map`` and bitsandbytes quantization, each bad
    combination a one-line error."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; valid: '8bit', '4bit' (or '' for none)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU on this machine")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        if not torch.cuda.is_available():
            raise ValueError(f"device_map={device_map!r} spreads a model over GPUs, and torch sees none on this "
                             "machine: leave device_map unset (device='cpu')")
        kwargs["device_map"] = device_map
    if quantization:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{quantization} loading needs bitsandbytes: pip install 'backdoor-sae[quant]'")
        import logging

        from transformers import BitsAndBytesConfig

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU: "no kernels" warning (STACK notes)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
            bnb_4bit_compute_dtype=dtype if dtype != torch.float16 or device != "cpu" else torch.float32)
        kwargs.setdefault("device_map", device if device_map is None else device_map)
    return kwargs


def read_chat_template(path: str | Path) -> str:
    """A Jinja chat template from a file (``--chat-template`` / ``[organism] chat_template``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"chat template file not found: {p}")
    return p.read_text()


def _plain_bnb_cpu_layout(hf: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit weights in their plain layout on CPU. On CPUs with AVX512-BF16, bitsandbytes
    0.50 repacks a 4-bit weight at its first forward and unpacks it again in ``state_dict()``, which the bridge
    and our saves call: measured here, every forward after a ``state_dict()`` gave other logits, and a weight
    narrower than a block raised inside bitsandbytes. The plain kernel is slower and correct."""
    for module in hf.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(path_or_name: str | Path, *, bridge: bool = True, device: str = "cpu",
               dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
               device_map: str | None = None, quantization: str = "",
               chat_template: str | Path | None = None) -> LoadedModel:
    """Load a causal LM by local directory (works offline) or hub name, weights from safetensors only.

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``), ``dtype`` (a torch dtype or ``"bfloat16"``...),
    ``device_map="auto"`` for a model larger than one GPU, ``quantization="8bit" | "4bit"`` through bitsandbytes
    (the ``quant`` extra), ``chat_template``: a Jinja file for a tokenizer without a template."""
    name = str(path_or_name)
    kwargs = _load_kwargs(device, dtype, device_map, quantization)
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
            source, use_safetensors=True, attn_implementation="eager", trust_remote_code=trust_remote_code,
            **kwargs)
    except OSError as e:
        if source == name and not d.is_dir():
            raise FileNotFoundError(f"model {name!r} is not a local directory and could not be loaded from the "
                                    f"hub or its local cache ({type(e).__name__})") from None
        raise
    if "device_map" not in kwargs:
        hf = hf.to(device)
    hf.eval()
    if quantization == "4bit" and device == "cpu" and device_map is None:
        _plain_bnb_cpu_layout(hf)
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    loaded = LoadedModel(hf=hf, tokenizer=tokenizer, path=source, meta=meta)
    if bridge:
        from transformer_lens.model_bridge import TransformerBridge

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.bridge = TransformerBridge.boot_transformers(
                source, device=str(next(hf.parameters()).device), hf_model=hf, tokenizer=tokenizer)
    return loaded
