"""Float models as the pipeline builds and checks them: a built-in architecture (`tidlq.models.builtin`) or a user
model from an import path, its weights, and the checks that turn a model the pipeline cannot handle into a clear
error before any work is spent on it."""

from __future__ import annotations

import importlib
import pickle
import re
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.models.builtin import BUILTINS


def from_spec(spec: dict[str, Any]) -> nn.Module:
    """A fresh float model from a model.json spec: {source, kwargs, num_classes, in_channels}."""
    source = spec["source"]
    if source in BUILTINS:
        return BUILTINS[source](num_classes=spec["num_classes"], in_channels=spec["in_channels"])
    make, kwargs = resolve_callable(source), spec.get("kwargs", {})
    try:
        model = make(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's constructor may raise anything (TypeError on a bad kwarg)
        raise UserError(f"model.source {source!r} cannot be built with model.kwargs {kwargs!r}: "
                        f"{type(exc).__name__}: {_first_line(exc)}. Fix model.kwargs to match its signature, or the "
                        "code that builds the model.") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.source {source!r} returned a {type(model).__name__}, not a torch.nn.Module. "
                        "Point it at a function or class that builds the model.")
    return model


def load(model_dir: Path) -> nn.Module:
    """The float model of a float_model stage folder, weights loaded, in eval mode."""
    model = from_spec(files.read_json(Path(model_dir) / "model.json"))
    model.load_state_dict(torch.load(Path(model_dir) / "float.pt", weights_only=True))
    return model.eval()


def resolve_callable(source: str) -> Callable[..., Any]:
    """Import `package.module:callable`; a UserError that says which part did not resolve."""
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or whatever the user's module raises while importing
        reason = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {_first_line(exc)}"
        raise UserError(f"model.source {source!r}: module {module_name!r} cannot be imported ({reason}). Install the "
                        "package or put it on PYTHONPATH, fix the error in it, or use a built-in model.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"model.source {source!r}: module {module_name!r} has no callable {attr!r}. "
                        "Check the name after the ':'.")
    return fn


def load_weights(model: nn.Module, path: Path, field: str = "model.weights") -> None:
    """Load a state_dict file into `model` without executing pickles; a UserError on any mismatch."""
    where = f"{field} {str(path)!r}"
    if not Path(path).is_file():
        raise UserError(f"{where} does not exist. Give the path of a state_dict saved with torch.save.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(exc), re.S)
        reason = found.group(1).strip() if found else _first_line(exc)
        raise UserError(f"{where} cannot be loaded as a tensor-only state_dict (torch.load with weights_only=True: "
                        f"{reason}). Save it with torch.save(model.state_dict(), path).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where} is not a state_dict (a mapping of names to tensors). Save it with "
                        "torch.save(model.state_dict(), path).")
    result = _load_strict(model, state)
    if result:
        raise UserError(f"{where} does not match the model: {result}. Use the weights trained for this architecture.")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label} {', '.join(items[:5])}{more}")
    if not problems:
        model.load_state_dict(state)
    return "; ".join(problems)


def check_model(model: nn.Module, input_shape: list[int], num_classes: int, source: str) -> None:
    """Fail early, with a clear message, on a model the pipeline cannot quantize or export."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(input_shape))
    except Exception as exc:  # noqa: BLE001 - any failure here means the model rejects the input
        raise UserError(f"model {source!r} rejects an input of shape {tuple(input_shape)} (from data.image_size and "
                        f"the data's channels): {_first_line(exc)}. Set data.image_size / data.channels to what the "
                        "model expects.") from None
    if not isinstance(out, torch.Tensor):
        raise UserError(f"model {source!r} returns a {type(out).__name__}; tidlq needs one tensor of logits "
                        f"(N, num_classes). Wrap the model so that forward returns only the logits.")
    if tuple(out.shape) != (input_shape[0], num_classes):
        raise UserError(f"model {source!r} returns shape {tuple(out.shape)} but the data has {num_classes} classes; "
                        f"expected ({input_shape[0]}, {num_classes}). Set the model's number of classes "
                        "(model.kwargs) to match the data.")
    trace_or_explain(model, source)


class _PathTracer(torch.fx.Tracer):
    """An FX tracer that remembers which submodule it was tracing when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m) if m is not self.root else "")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace_or_explain(model: nn.Module, source: str) -> None:
    """Symbolically trace `model`; on failure a UserError naming the submodule and the line of code."""
    tracer = _PathTracer()
    try:
        tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - FX raises many types (TraceError, TypeError, ...)
        raise UserError(explain_trace_failure(exc, source, tracer.failed_in)) from None


def explain_trace_failure(exc: BaseException, source: str, module_path: str | None = None) -> str:
    """The message for a model torch.fx cannot trace: the submodule, the user's line of code, FX's reason."""
    where = f"submodule {module_path!r}" if module_path else "the model's forward"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    line = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    return (f"model {source!r} cannot be traced by torch.fx in {where}{line}: {_first_line(exc)}. FX graph mode "
            "quantization needs a forward without data-dependent control flow; move that logic out of forward or "
            "mark the submodule as a leaf.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
