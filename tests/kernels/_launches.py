"""The Triton launches a call makes on a GPU, recorded without one; and the Scorer's and trainer's calls.

Test-only machinery (issue 15: production modules carry no test hooks). Three pieces:

``recording(sms)``
    Replaces the three functions through which ``freeprm.kernels.triton_common`` reaches a device
    (``launch``, ``interpreting``, ``sm_count``; see that module's docstring) so that launchers called on
    meta tensors take their GPU branch (pinned tile configs, vocab splits for ``sms`` multiprocessors)
    and append a ``Launch`` instead of running.
``compile_spec(launch, target)``
    What Triton's JIT would compile for a recorded launch: signature, constexprs, attributes and its
    cache key, from Triton's own binder (private API: ``JITFunction._pack_args``; tests only).
``capture_calls()`` / ``replay(call, n, dtype)``
    The calls the Scorer and the trainer really make into the Triton entry points
    (``triton_linear_logprobs``, ``triton_policy_ref_rewards``, ``triton_token_rewards``,
    ``triton_segment_*``), captured from real runs on tiny models under the interpreter as JSON-able
    ``Call`` forms (which entry, which options, which inputs are None / need gradients, dtypes), and
    replayed at GPU shapes on meta tensors under ``recording``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json

import torch

from freeprm.kernels import triton_common as tc

# ------------------------------------------------------------------------------------------------
# recording launches
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch: what ``kernel[grid](*args, **consts, **options)`` receives."""

    kernel: object  # a triton JITFunction (or the interpreter's wrapper of one)
    grid: tuple
    args: tuple
    consts: dict
    options: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__.strip("_")


@contextlib.contextmanager
def recording(sms: int = 132):
    """Record launches instead of running them, as if on a CUDA GPU with ``sms`` SMs; yields the list.

    Call the launchers with meta tensors (no memory, no device work).
    """
    launches: list[Launch] = []

    def launch(kernel, grid, args, consts, config=None, **options):
        consts, options = tc.with_config(consts, options, config)
        launches.append(Launch(kernel, tuple(grid), tuple(args), consts, options))

    saved = tc.launch, tc.interpreting, tc.sm_count
    tc.launch, tc.interpreting, tc.sm_count = launch, (lambda t: False), (lambda device: sms)
    try:
        yield launches
    finally:
        tc.launch, tc.interpreting, tc.sm_count = saved


# ------------------------------------------------------------------------------------------------
# what the JIT would compile
# ------------------------------------------------------------------------------------------------


def compile_spec(rec: Launch, target=None) -> dict:
    """What Triton's JIT would compile for a recorded launch on ``target`` (default: sm_90), without a GPU.

    Returns dict(fn, signature, constexprs, attrs, options, key); ``key`` is the JIT's cache key
    (launches with equal keys share one compiled kernel).
    """
    from triton.backends.compiler import GPUTarget

    fn, backend, binder = _binder(rec.kernel, target or GPUTarget("cuda", 90, 32))
    kwargs = {**rec.consts, **rec.options}
    bound, spec, opts = binder(*rec.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    key = (fn.fn.__qualname__, str(spec), str(sorted(rec.options.items())))
    return dict(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs, options=rec.options, key=key)


@functools.cache
def _binder(kernel, target):
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = kernel
    if not isinstance(fn, JITFunction):  # TRITON_INTERPRET=1 wraps kernels; rebuild the JIT view
        fn = JITFunction(fn.fn, **fn.kwargs)
    backend = make_backend(target)
    return fn, backend, create_function_from_signature(fn.signature, fn.params, backend)


def compile_key(rec: Launch) -> str:
    """The JIT cache key of a recorded launch for sm_90, as a string (JSON-able)."""
    return json.dumps(compile_spec(rec)["key"])


# ------------------------------------------------------------------------------------------------
# the Scorer's and the trainer's calls into the Triton entry points
# ------------------------------------------------------------------------------------------------

# entry name -> (module, function): what ``freeprm.kernels.ops`` dispatches to for impl="triton"
ENTRIES = {
    "linear_logprobs": ("freeprm.kernels.linear_logprob_kernel", "triton_linear_logprobs"),
    "policy_ref_rewards": ("freeprm.kernels.reward_kernel", "triton_policy_ref_rewards"),
    "token_rewards": ("freeprm.kernels.reward_kernel", "triton_token_rewards"),
    "segment_sum": ("freeprm.kernels.segment_kernel", "triton_segment_sum"),
    "segment_cumsum": ("freeprm.kernels.segment_kernel", "triton_segment_cumsum"),
    "segment_reduce": ("freeprm.kernels.segment_kernel", "triton_segment_reduce"),
}


@dataclasses.dataclass(frozen=True)
class Call:
    """The form of one call: entry name, and per argument a tensor form ``(dtype, requires_grad)``,
    None, or a plain value (JSON-able, hashable through ``key``). ``backward``: gradients were on and
    some input needed one, so the call's backward runs too."""

    entry: str
    args: tuple
    kwargs: tuple  # sorted (name, form) pairs
    backward: bool

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_key(text: str) -> Call:
        d = json.loads(text)
        args = tuple(tuple(a) if isinstance(a, list) else a for a in d["args"])
        kwargs = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d["kwargs"])
        return Call(d["entry"], args, kwargs, d["backward"])


def _form(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype).replace("torch.", ""), bool(x.requires_grad))
    return x


@contextlib.contextmanager
def capture_calls():
    """Wrap the Triton entry points (they still run) and yield the set of distinct ``Call`` keys seen."""
    import importlib

    seen: set[str] = set()
    saved = []
    for entry, (mod_name, fn_name) in ENTRIES.items():
        mod = importlib.import_module(mod_name)
        real = getattr(mod, fn_name)

        def spy(*args, _entry=entry, _real=real, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            seen.add(Call(_entry, tuple(_form(a) for a in args),
                          tuple(sorted((k, _form(v)) for k, v in kwargs.items())), grad).key())
            return _real(*args, **kwargs)

        saved.append((mod, fn_name, real))
        setattr(mod, fn_name, spy)
    try:
        yield seen
    finally:
        for mod, fn_name, real in saved:
            setattr(mod, fn_name, real)


def replay(call: Call, n: int, dtype: torch.dtype, *, d: int = 4096, v: int = 128256) -> None:
    """Make ``call`` again at N tokens of a (D, V) head on meta tensors (run it under ``recording``).

    Hidden states and LM-head weights take ``dtype`` (the model's dtype on the GPU); log-probs, masks,
    targets and segment values keep the dtypes seen. Segment calls get N values in N // 32 segments.
    """
    import importlib

    mod_name, fn_name = ENTRIES[call.entry]
    fn = getattr(importlib.import_module(mod_name), fn_name)

    def meta(form, *shape, model=False):
        if not (isinstance(form, tuple) and form and form[0] == "tensor"):
            return form
        dt = dtype if model else getattr(torch, form[1])
        return torch.empty(*shape, dtype=dt, device="meta", requires_grad=form[2] and dt.is_floating_point)

    a = call.args
    kw = {k: f for k, f in call.kwargs}
    if call.entry == "linear_logprobs":
        args = (meta(a[0], n, d, model=True), meta(a[1], v, d, model=True), meta(a[2], n))
    elif call.entry == "policy_ref_rewards":
        args = (meta(a[0], n, d, model=True), meta(a[1], v, d, model=True), meta(a[2], n, d, model=True),
                meta(a[3], v, d, model=True), meta(a[4], n), a[5], *(meta(x, n) for x in a[6:]))
    elif call.entry == "token_rewards":
        args = tuple(meta(x, n) for x in a)
    else:  # segment_*: values [N], cu [K + 1], then plain values (op)
        k = max(1, n // 32)
        args = (meta(a[0], n), meta(a[1], k + 1), *a[2:])
    kwargs = {k: meta(f, n) for k, f in kw.items()}
    grad_ctx = contextlib.nullcontext() if call.backward else torch.no_grad()
    with grad_ctx:
        out = fn(*args, **kwargs)
        if call.backward:
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.backward(out, torch.empty_like(out))


def record_call(call: Call, ns, dtypes, sms: int = 132, precision: str = "highest") -> list[Launch]:
    """Launches of ``call`` replayed at every N in ``ns`` and dtype in ``dtypes`` (fp32 dots at ``precision``)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with recording(sms) as launches:
            for dt in dtypes:
                for n in ns:
                    replay(call, n, dt)
    finally:
        torch.set_float32_matmul_precision(prev)
    return launches


# ------------------------------------------------------------------------------------------------
# the real runs
# ------------------------------------------------------------------------------------------------

# one group of three responses to one prompt (the shared-prompt path) and two lone prompts of other
# lengths (padded or packed batches)
ITEMS = [{"prompt": "What is 48 / 2?", "response": r} for r in
         ("48 / 2 = 24.\n\nThe answer is 24.", "48 / 2 = 23.\n\nThe answer is 23.", "Half of 48 is 24.")] + [
    {"prompt": "What is 3 + 4?", "response": "3 + 4 = 7.\n\nSo 7."},
    {"prompt": "Add 10 and 25, then double it.", "response": "10 + 25 = 35.\n\n35 * 2 = 70.\n\nThe answer is 70."},
]
TRAIN_ROWS = [{"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b + w}.", "label": int(w == 0)}
              for a, b in ((3, 4), (5, 8)) for w in (0, 1)]


def tiny_softcap_model(vocab: int, seed: int = 0):
    """A tiny random Gemma 2 (final-logit soft-cap 3.0): the soft-capped launches."""
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=256, final_logit_softcapping=3.0, pad_token_id=None,
                                    bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(cfg).float().eval()


def scorer_and_trainer_calls(tmp_dir) -> dict[str, list[str]]:
    """Run the Scorer (reference-free, with a reference, fused; shared-prompt, packed and padded batches)
    and one trainer step (CE loss, the trainer's backward) on tiny Llama and soft-capped Gemma 2 models
    with ``impl="triton"`` under the interpreter; returns {source: sorted distinct ``Call`` keys}."""
    from pathlib import Path

    from freeprm.engine import Scorer
    from freeprm.testing import make_tiny_llama, make_tiny_tokenizer
    from freeprm.trainer import TrainConfig, Trainer
    from freeprm.trainer.data import build_items, load_examples
    from freeprm.trainer.ref_cache import compute_ref_logprobs

    tok = make_tiny_tokenizer()
    models = {"llama": lambda s: make_tiny_llama(len(tok), seed=s), "gemma2": lambda s: tiny_softcap_model(len(tok), s)}
    data = Path(tmp_dir) / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    out: dict[str, set] = {"scorer": set(), "trainer": set()}
    for kind, make in models.items():
        policy, ref = make(0), make(1)
        for reference, fuse in ((None, False), (ref, False), (ref, True)):
            for opts in (dict(), dict(share_prompt=False, pack=True), dict(share_prompt=False, pack=False)):
                scorer = Scorer((policy, tok), None if reference is None else (reference, tok), impl="triton",
                                fuse_reference=fuse, **opts)
                with capture_calls() as seen:
                    scorer.score(ITEMS)
                assert seen, f"no Triton call from the Scorer ({kind}, {opts})"
                out["scorer"] |= seen
        items, _ = build_items(tok, load_examples(data, "ce"), "ce")
        cfg = TrainConfig(lr=1e-3, beta=0.05, batch_size=4, max_steps=1, progress=False, reference_free=True,
                          impl="triton", seed=0)
        with capture_calls() as seen:
            compute_ref_logprobs(ref, [s for it in items for s in it.seqs], pad_id=0, impl="triton")
            Trainer(policy.train(), tok, items, cfg).train_step()
        assert any(Call.from_key(k).backward for k in seen), "the trainer step made no backward call"
        out["trainer"] |= seen
    return {k: sorted(v) for k, v in out.items()}
