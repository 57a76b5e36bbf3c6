"""LoRA adapters through PEFT (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A LoRA layer keeps a frozen weight W and learns W + (α / r) · B A, with A: r x in, B: out x r, B = 0 at
the start (so the adapted model starts as the base model, exactly). ``train.lora.*`` of SFT and the RM
(docs/lora.md) switches it on:

    model = apply_lora(model, settings)              # in place; only adapters (+ an RM's head) train
    with adapter_disabled(model): ...                # the base model, e.g. PPO's reference policy
    save_adapter(model, path) / load_adapter(model, path)   # adapter (+ head) only, safetensors
    save_merged(model, tokenizer, path)              # a plain Hugging Face folder, no PEFT needed

The adapters are injected with ``peft.inject_adapter_in_model``, not wrapped with ``get_peft_model``:
the model keeps its class (``LlamaForCausalLM``, ``LlamaForSequenceClassification``), its forward,
``model.score``, ``model.config`` and ``model.model`` (the trunk, which ``models.decoder`` and
``reward_model.score`` read). A ``PeftModel`` would put its own ``base_model`` and ``save_pretrained``
in their place. The price: never call ``save_pretrained`` on an adapted model (it writes PEFT's
internal key names); use :func:`save_adapter` or :func:`save_merged`.

A reward model's scalar head is new, so it is trained in full next to the adapters, saved with them,
and left untouched by :func:`adapter_disabled`. The adapter folder is PEFT's format (keys
``base_model.model.…``, ``adapter_config.json``, the head under ``modules_to_save``), so
``peft.PeftModel.from_pretrained(base, folder)`` reads it too.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from instructrl.config import ConfigError, check, param

# Every linear projection of a Llama-type block (Llama, Mistral, Qwen2/3, SmolLM2).
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."  # PEFT's key prefix in a saved adapter
_HEAD = "score"                # the scalar head of a reward model (AutoModelForSequenceClassification)


@dataclass
class LoraSettings:
    rank: int = param(0, "LoRA rank r of every adapted weight; 0 = off, full fine-tuning (Hu et al. 2021: on "
                         "GPT-3, r = 1-8 about as good as r = 64)", min=0)
    alpha: float = param(16.0, "LoRA α: the update B·A is scaled by α / rank (Hu et al. 2021 set α to the first "
                               "rank they try and leave it, so the learning rate need not change with r)",
                         min=0, min_exclusive=True)
    dropout: float = param(0.1, "dropout on each adapter's input while training (Hu et al. 2021, GPT-2: 0.1)",
                           min=0, max=1, max_exclusive=True)
    target_modules: list[str] = param(
        help="linear modules that get adapters, by name or name suffix. Default: all seven projections of a "
             "Llama block (Hu et al. 2021 adapt only q_proj,v_proj; Dettmers et al. 2023 find adapting every "
             "linear layer is needed to match full fine-tuning)",
        factory=lambda: list(LLAMA_LINEAR))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def validate(self):
        if not self.enabled:
            return
        check(bool(self.target_modules), "train.lora.target_modules: give at least one module name (e.g. [q_proj, v_proj])")
        for i, t in enumerate(self.target_modules):
            check(isinstance(t, str) and bool(t.strip()) and t == t.strip(),
                  f"train.lora.target_modules[{i}]: {t!r} is not a module name")
        check(len(set(self.target_modules)) == len(self.target_modules),
              f"train.lora.target_modules: a name is listed twice: {self.target_modules}")


# ---------------------------------------------------------------------------
# Which modules get adapters
# ---------------------------------------------------------------------------


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layer


def _head_names(model: torch.nn.Module) -> set[str]:
    """Module names of the output head: a causal LM's unembedding, a reward model's scalar head."""
    out = {_HEAD} if isinstance(getattr(model, _HEAD, None), torch.nn.Module) else set()
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    out |= {n for n, m in model.named_modules() if emb is not None and m is emb}
    return out


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear modules (what ``target_modules`` may name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear(m)})


def check_target_modules(model: torch.nn.Module, settings: LoraSettings) -> None:
    """ConfigError unless every name in ``settings.target_modules`` matches a linear module of the trunk.

    A name matches a module called exactly that or ending in ``.name`` (PEFT's rule). The output head is
    refused: an RM's head is trained in full already, and a causal LM's is often tied to the input
    embeddings, which merging an adapter into it would change too.
    """
    names = [n for n, m in model.named_modules() if n and _is_linear(m)]
    heads = _head_names(model)
    for t in settings.target_modules:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise ConfigError(f"train.lora.target_modules: {t!r} matches no linear module of {type(model).__name__}; "
                              f"its linear modules are: {', '.join(linear_module_names(model))}")
        if any(h in heads for h in hits):
            raise ConfigError(f"train.lora.target_modules: {t!r} is the model's output head; adapters go on the "
                              f"transformer blocks ({', '.join(sorted(set(linear_module_names(model)) - heads))})")
        modules = dict(model.named_modules())
        # B·A has rank <= min(in, out): a larger r only adds zeros to train, and a typo (rank=1000000)
        # would allocate rank x width matrices for every module before anything says so
        (width, name) = min((min(modules[n].weight.shape), n) for n in hits)
        if settings.rank > width:
            raise ConfigError(f"train.lora.rank={settings.rank} is more than {name}'s smaller dimension ({width}); "
                              f"an adapter's update B·A has rank at most {width}")


def check_model_targets(path: str | Path, settings: LoraSettings, reward_model: bool = False) -> None:
    """:func:`check_target_modules` for the model in folder ``path``, built on the meta device: no weights
    are read, so a bad ``target_modules`` is reported before a large model is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(path), **({"num_labels": 1} if reward_model else {}))
    cls = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = cls.from_config(config)
    check_target_modules(skeleton, settings)


# ---------------------------------------------------------------------------
# Adding, switching off, saving and loading adapters
# ---------------------------------------------------------------------------


def _lora_layers(model: torch.nn.Module) -> list:
    if getattr(model, "peft_config", None) is None:  # set by inject_adapter_in_model; cheap test first
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds LoRA adapters added by :func:`apply_lora` / :func:`load_adapter`."""
    return bool(_lora_layers(model))


def _train_head(model: torch.nn.Module) -> None:
    head = getattr(model, _HEAD, None)
    if isinstance(head, torch.nn.Module):
        head.requires_grad_(True)


def apply_lora(model: torch.nn.Module, settings: LoraSettings, top_layers: int = -1) -> torch.nn.Module:
    """Add LoRA adapters to ``model`` in place and freeze everything else but a reward model's head.

    ``top_layers`` = N >= 1 puts adapters in the top N transformer blocks only (``train.trainable_layers``
    with LoRA); -1 = every block. The adapters start at B = 0, so the model's outputs are unchanged.
    Returns ``model``.
    """
    from peft import LoraConfig

    if not settings.enabled:
        raise ValueError("apply_lora: train.lora.rank is 0 (LoRA off)")
    if is_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    check_target_modules(model, settings)
    layers = None
    if top_layers >= 0:
        n = int(getattr(model.config, "num_hidden_layers", 0))
        if not 1 <= top_layers <= n:
            raise ConfigError(f"train.trainable_layers={top_layers} with train.lora: must be -1 or 1..{n} "
                              f"(the model has {n} blocks)")
        layers = list(range(n - top_layers, n))
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), layers_to_transform=layers, bias="none")
    _inject(config, model)
    return model


def _inject(config, model: torch.nn.Module) -> None:
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model)  # also freezes every non-adapter parameter
    model.train(model.training)  # the new dropout modules start in training mode; follow the model's
    _train_head(model)


@contextmanager
def adapter_disabled(model: torch.nn.Module):
    """Within the block ``model`` computes its base model: every LoRA layer returns its frozen base output.

    This is PPO's reference policy with LoRA (one copy of the base weights). Modules trained in full
    (an RM's head) are not affected. Pass the unwrapped model (not a DDP wrapper). Which parameters
    require grad is restored on exit.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("adapter_disabled: the model has no LoRA adapters")
    grads = [(p, p.requires_grad) for p in model.parameters()]  # PEFT's switch also toggles requires_grad
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, g in grads:
            p.requires_grad_(g)


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights of an adapted model in PEFT's saved form: LoRA A/B (+ ``score.weight`` of an RM)."""
    from peft import get_peft_model_state_dict

    if not is_lora(model):
        raise ValueError("adapter_state_dict: the model has no LoRA adapters")
    sd = dict(get_peft_model_state_dict(model))
    head = getattr(model, _HEAD, None)
    if isinstance(head, torch.nn.Module):
        sd.update({f"{_HEAD}.{k}": v for k, v in head.state_dict().items()})
    return {_PREFIX + k: v.detach().contiguous() for k, v in sd.items()}


def save_adapter(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the adapter (+ an RM's head) to folder ``path`` atomically: ``adapter_model.safetensors`` and
    ``adapter_config.json``. The base weights are not written."""
    from safetensors.torch import save_file

    from instructrl.io import atomic_dir

    path = Path(path)
    sd = adapter_state_dict(model)
    config = copy.deepcopy(model.peft_config["default"])
    config.base_model_name_or_path = str(getattr(model.config, "_name_or_path", "") or "") or None
    head = isinstance(getattr(model, _HEAD, None), torch.nn.Module)
    config.task_type = "SEQ_CLS" if head else "CAUSAL_LM"
    config.modules_to_save = [_HEAD] if head else None
    with atomic_dir(path) as tmp:
        save_file(sd, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    return path


def load_adapter(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` (its base), in place; returns ``model``.

    A model without adapters gets them first, shaped as the folder's ``adapter_config.json`` says. Every
    tensor must fit: a missing or extra key is an error naming the folder.
    """
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"{path}: not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    if not is_lora(model):
        config = LoraConfig.from_pretrained(str(path))
        config.modules_to_save, config.task_type = None, None  # the head stays the model's own module
        _inject(config, model)
    sd = {k.removeprefix(_PREFIX): v for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}
    head = getattr(model, _HEAD, None)
    head_sd = {k.removeprefix(_HEAD + "."): sd.pop(k) for k in list(sd) if k.startswith(_HEAD + ".")}
    want = set(get_peft_model_state_dict(model))
    missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
    if isinstance(head, torch.nn.Module) != bool(head_sd):
        extra += [f"{_HEAD}.*"] if head_sd else []
        missing += [] if head_sd else [f"{_HEAD}.*"]
    if missing or extra:
        raise ConfigError(f"{path}: the adapter does not fit this model; missing {missing[:4]}, unexpected {extra[:4]}")
    result = set_peft_model_state_dict(model, sd)
    if result.unexpected_keys:
        raise ConfigError(f"{path}: PEFT did not place {result.unexpected_keys[:4]}")
    if head_sd:
        head.load_state_dict(head_sd, strict=True)
    return model


# ---------------------------------------------------------------------------
# Merging: a plain Hugging Face model
# ---------------------------------------------------------------------------


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every adapter folded into its weight (W + α/r · B A) and the LoRA layers
    replaced by plain ``nn.Linear``: the same class, PEFT-free, ready for ``save_pretrained``.

    Holds a second copy of the weights while it exists. ``model`` itself is unchanged.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("merged_copy: the model has no LoRA adapters")
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if _is_tuner(module):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, module.get_base_layer())
    del out.peft_config
    for p in out.parameters():  # as a model loaded from a folder: everything trainable again
        p.requires_grad_(True)
    return out


def _is_tuner(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def save_merged(model: torch.nn.Module, tokenizer, path: str | Path) -> Path:
    """Write the merged model (:func:`merged_copy`) + tokenizer to ``path`` atomically: a folder that
    ``AutoModelForCausalLM.from_pretrained`` loads with no PEFT installed."""
    from instructrl.io import atomic_dir

    path = Path(path)
    merged = merged_copy(model)
    with atomic_dir(path) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path
