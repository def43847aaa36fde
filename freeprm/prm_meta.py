"""Self-describing PRM directories: ``freeprm_prm.json``, written beside the weights, read by every loader.

A PRM trained with freeprm (``freeprm train``'s ``final/`` and ``checkpoint-*/``, ``ImplicitPRM.save_pretrained``)
only means what it was trained to mean when it is scored with the same beta, the same reference ``pi_ref`` and
the same prompt format. Its directory therefore carries one small JSON file::

    {"format": "freeprm-prm-2",
     "scoring": ScoringConfig.to_dict(),          # beta, reference (spec or "none"), step split, prompt format, ...
     "reference_digest": "16 hex" | null,         # content digest of the reference (freeprm.identity), null: none
     "training": {"trainer", "loss", "data_sha256", "freeprm_version", ...},
     "implicit_prm": {...} | null}                # ImplicitPRM's online settings (lr, granularity, version, ...)

A relative ``scoring.reference`` (``ImplicitPRM``'s frozen reference, ``"reference"``) is relative to the
directory. ``resolve_config`` is the one place that reads it for scoring (``Scorer``, so ``score``, ``rerank``,
``serve``, ``bon``); ``fill_config`` (which ``resolve_config`` calls) for ``ImplicitPRM.from_pretrained``. The rules:

* beta, reference, prompt format and step split come from the file unless given;
* a given value that differs from the recorded one is used, with a warning naming both (for the step split only
  when the PRM was trained with it: ``ImplicitPRM(granularity="step")``; response-level training never splits);
* a given (or recorded) reference whose content digest differs from the recorded digest is a ``ValueError``
  unless ``force_reference=True`` (then a warning);
* a damaged file, or one naming a reference that is not there, is a ``ValueError`` naming the file;
* a directory without the file (a plain Hugging Face model, a checkpoint of an older freeprm) loads as before.

The first version of the file (``"format": "freeprm-implicit-prm-1"``, written by older ``ImplicitPRM``) is
read too: its beta, step delimiter and frozen reference are honoured; it has no digest to check.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_STEP_DELIMITER, NO_REFERENCE, ScoringConfig

META_FILE = "freeprm_prm.json"
REFERENCE_DIR = "reference"  # ImplicitPRM's frozen reference, inside the PRM directory
META_FORMAT = "freeprm-prm-2"
IMPLICIT_PRM_V1 = "freeprm-implicit-prm-1"
_KEYS = ("format", "scoring", "reference_digest", "training", "implicit_prm")


class PRMMetaWarning(UserWarning):
    """A setting given for a trained PRM differs from the one recorded in its ``freeprm_prm.json``."""


@dataclass(frozen=True)
class PRMMeta:
    """The parsed ``freeprm_prm.json`` of one directory (see the module docstring)."""

    file: Path
    scoring: ScoringConfig
    reference_digest: str | None
    training: dict
    implicit_prm: dict | None

    @property
    def directory(self) -> Path:
        return self.file.parent

    def reference_spec(self) -> str | None:
        """The recorded reference to load: a path (a relative one resolved against the directory), an alias or
        hub id; None when the PRM is reference-free. ``ValueError`` naming the file when it names a local
        reference that is missing, or when it records none that can be loaded (an in-memory model)."""
        ref = self.scoring.reference
        if ref == NO_REFERENCE:
            return None
        missing = (f"{self.file} names the reference {{}}, which does not exist; restore it, or pass the reference "
                   "explicitly (reference=..., --reference PATH)")
        if ref is None:
            raise ValueError(f"{self.file} records a reference that was an in-memory model (no path to load it "
                             "from); pass the reference explicitly (reference=..., --reference PATH)")
        path = Path(ref).expanduser()
        if path.is_absolute():
            if not path.exists():
                raise ValueError(missing.format(repr(ref)))
            return str(path)
        inside = self.directory / ref
        if inside.exists():
            return str(inside)
        if ref == REFERENCE_DIR:
            raise ValueError(missing.format(repr(str(inside))))
        return ref  # an alias or a hub id (training records local paths as absolute ones)


def freeprm_version() -> str:
    from . import __version__

    return __version__


def content_digest(spec) -> str | None:
    """What a reference *is*, not where it lies, as ``"kind:digest"``: ``files:`` the digests of its files
    (``freeprm.identity``) for a directory, alias or ``.gguf``; ``hub:`` the id for a hub id; ``params:`` the
    parameters' digest for a model object or ``(model, tokenizer)`` pair; None for no reference."""
    from .identity import identity_digest, model_identity, params_identity

    if spec is None:
        return None
    if isinstance(spec, tuple) or not isinstance(spec, (str, os.PathLike)):
        model = spec[0] if isinstance(spec, tuple) else spec
        return "params:" + params_identity(model, None)["params_sha256"][:16]
    ident = model_identity(spec)
    if "hub_id" in ident:
        return "hub:" + ident["hub_id"]
    return "files:" + identity_digest(ident["files"])  # not the path: a moved directory is the same model


def data_digest(data) -> str:
    """sha256 of a training-data file's bytes, or of the examples as sorted JSON when given in memory."""
    h = hashlib.sha256()
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    else:
        import dataclasses

        rows = [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in data]
        h.update(json.dumps(rows, sort_keys=True, default=str).encode())
    return h.hexdigest()


def meta_dict(scoring: ScoringConfig, *, reference_digest: str | None, training: Mapping,
              implicit_prm: Mapping | None = None) -> dict:
    """The JSON object of ``freeprm_prm.json`` (``freeprm_version`` added to ``training``)."""
    return {"format": META_FORMAT, "scoring": scoring.to_dict(), "reference_digest": reference_digest,
            "training": {"freeprm_version": freeprm_version(), **training},
            "implicit_prm": None if implicit_prm is None else dict(implicit_prm)}


def write_meta(directory: str | os.PathLike, meta: Mapping) -> Path:
    """Write ``meta`` (``meta_dict``) as ``directory/freeprm_prm.json`` (temp file + rename); returns the path."""
    path = Path(directory) / META_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_meta(directory) -> PRMMeta | None:
    """The parsed ``freeprm_prm.json`` of ``directory``, or None when there is none (or ``directory`` is not a
    local directory: an alias, a hub id, a model object). A damaged file is a ``ValueError`` naming it."""
    if not isinstance(directory, (str, os.PathLike)):
        return None
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    fix = f"delete {path} to load the directory as a plain model (then give beta and reference yourself), or restore it"
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({str(e).splitlines()[0]}); {fix}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); {fix}")
    try:
        if raw.get("format") == IMPLICIT_PRM_V1:
            return _from_v1(path, raw)
        if raw.get("format") != META_FORMAT:
            raise ValueError(f"format {raw.get('format')!r} is not one this freeprm reads ({META_FORMAT!r})")
        missing = [k for k in _KEYS if k not in raw]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        digest = raw["reference_digest"]
        if digest is not None and not isinstance(digest, str):
            raise ValueError("reference_digest is not a string")
        if not isinstance(raw["training"], dict) or not isinstance(raw["implicit_prm"], (dict, type(None))):
            raise ValueError("training / implicit_prm are not JSON objects")
        return PRMMeta(path, ScoringConfig.from_dict(raw["scoring"]), digest, raw["training"], raw["implicit_prm"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({e}); {fix}") from None


def _from_v1(path: Path, raw: dict) -> PRMMeta:
    kind = raw.get("reference", "none")
    ref = {"frozen": "reference", "none": NO_REFERENCE}.get(kind)  # "policy" / "model": not recorded (None)
    scoring = ScoringConfig(beta=raw["beta"], reference=ref, step_delimiter=raw.get("step_delimiter",
                                                                                     DEFAULT_STEP_DELIMITER))
    online = {k: v for k, v in raw.items() if k not in ("format", "beta", "step_delimiter")}
    online["reference_kind"] = online.pop("reference", "none")
    return PRMMeta(path, scoring, None, {"trainer": "ImplicitPRM", "loss": raw.get("loss")}, online)


# ---------------------------------------------------------------------------------------- scoring
def _warn(meta: PRMMeta, what: str, given, recorded, stacklevel: int = 4) -> None:
    warnings.warn(f"{what}: using the given {given!r}, but {meta.file} records {recorded!r} (the value this PRM was "
                  "trained with); its rewards mean something else under the given value", PRMMetaWarning,
                  stacklevel=stacklevel)


def check_reference_digest(meta: PRMMeta, reference, *, force_reference: bool = False, given: bool = True) -> None:
    """``ValueError`` when ``reference``'s content digest differs from ``meta``'s recorded one (a warning when
    ``force_reference``). Nothing to check when the file records no digest or the reference is none."""
    if meta.reference_digest is None or reference is None:
        return
    got = content_digest(reference)
    if got == meta.reference_digest:
        return
    if got is not None and got.split(":", 1)[0] != meta.reference_digest.split(":", 1)[0]:
        kinds = meta.reference_digest.split(":")[0], got.split(":")[0]
        warnings.warn(f"cannot check the reference against {meta.file}: it records a {kinds[0]} digest, the "
                      f"reference given has a {kinds[1]} one (a path vs a model object)",
                      PRMMetaWarning, stacklevel=3)
        return
    name = reference if isinstance(reference, (str, os.PathLike)) else f"<{type(reference).__name__}>"
    where = "the given reference" if given else "the recorded reference"
    msg = (f"{where} {str(name)!r} has content digest {got}, but {meta.file} records {meta.reference_digest} "
           f"(the reference this PRM was trained against; its weights changed, or it is another model)")
    if not force_reference:
        raise ValueError(msg + "; pass the right reference, or force_reference=True (--force-reference) to use it "
                               "anyway")
    warnings.warn(msg + "; used anyway (force_reference)", PRMMetaWarning, stacklevel=3)


def fill_config(config: ScoringConfig | None, meta: PRMMeta, *, _stacklevel: int = 4) -> ScoringConfig:
    """``config`` with its beta, prompt format and step split filled from ``meta.scoring`` where not given
    (``ScoringConfig.given``); a given one that differs from the recorded one is kept, with a ``PRMMetaWarning``
    naming both (the step split only when the PRM was trained per step). The reference is left as it is:
    ``resolve_config`` (scoring) and ``ImplicitPRM.from_pretrained`` resolve it by their own rules."""
    config = ScoringConfig() if config is None else config
    rec, changes = meta.scoring, {}
    if not config.is_given("beta"):
        changes["beta"] = rec.beta
    elif config.beta != rec.beta:
        _warn(meta, "beta", config.beta, rec.beta, _stacklevel)
    if not config.is_given("prompt_format"):
        changes["prompt_format"] = rec.prompt_format
    elif config.prompt_format != rec.prompt_format:
        _warn(meta, "prompt_format", config.prompt_format, rec.prompt_format, _stacklevel)
    rec_split = rec.step_delimiter, rec.pattern_text
    if not (config.is_given("step_delimiter") or config.is_given("step_pattern")):
        changes["step_delimiter"], changes["step_pattern"] = rec_split
    else:
        given_split = config.step_delimiter, config.pattern_text
        used = (meta.implicit_prm or {}).get("granularity") == "step"  # only step-granular training used the split
        if used and given_split != rec_split:
            _warn(meta, "step split (delimiter, pattern)", given_split, rec_split, _stacklevel)
    return config.replace(**changes) if changes else config


def resolve_config(policy, config: ScoringConfig | None = None, *,
                   force_reference: bool = False) -> tuple[ScoringConfig, PRMMeta | None]:
    """``(config to score policy with, its metadata or None)``: ``config``'s fields that are not given
    (``ScoringConfig.given``) filled from ``policy``'s ``freeprm_prm.json`` (module docstring: beta, reference,
    prompt format, step split); a given one that differs is kept, with a warning naming both values.

    The returned config's reference is resolved: the spec or model to load, or ``"none"``. Without a metadata
    file an unset reference is ``"none"`` (a bare model is scored without a reference) and the rest is ``config``.
    """
    config = ScoringConfig() if config is None else config
    meta = read_meta(policy)
    if meta is None:
        return config.with_reference_default(NO_REFERENCE), None
    config, rec = fill_config(config, meta, _stacklevel=5), meta.scoring
    reference = config.reference
    if reference is None:  # unset: the recorded one, checked against its digest
        reference = meta.reference_spec()
        check_reference_digest(meta, reference, force_reference=force_reference, given=False)
        reference = NO_REFERENCE if reference is None else reference
    elif reference == NO_REFERENCE:
        if rec.reference != NO_REFERENCE:
            _warn(meta, "reference", NO_REFERENCE, rec.reference)
    else:
        if rec.reference == NO_REFERENCE:
            _warn(meta, "reference", reference if isinstance(reference, (str, os.PathLike)) else "<model object>",
                  NO_REFERENCE)
        check_reference_digest(meta, reference, force_reference=force_reference)
    return config.replace(reference=reference), meta

