"""Any PyTorch CNN as the op graph private inference runs (`deepreduce.graph`), and its ReLU count.

`trace(model, example_input)` follows the model's forward pass with torch.fx in eval mode and writes
the ops of `deepreduce.graph`::

    conv2d (stride, padding, dilation, groups, depthwise), linear   batch-norm 1d/2d folded into the
        conv or linear layer right before it, else a scale_shift op
    ReLU (nn.ReLU, F.relu, torch.relu, x.relu(), in place or not, clamp(min=0))
    MaskedReLU and SNL's ``relu(x) * m + x * (1 - m)`` with a constant 0/1 m: a masked relu op whose
        ReLU count is its kept positions (an all-zero mask is no op at all)
    average pooling (windowed, adaptive, global, x.mean((2, 3))), max pooling (its comparisons counted
        apart from ReLUs), flatten / view / reshape, residual add, concatenation along channels,
        identity, dropout (nothing in eval mode), multiplying or adding a constant (scalar, or one value
        per channel)

Anything else is a `UserError` of one line naming the operator and the module path where it occurs
(``unsupported operator sigmoid at layer3.1.attn ...``). Shapes come from running the traced graph on a
batch of two copies of the example image, so a forward pass that mixes the images of a batch is refused
too. `relu_count` and `comparison_count` count any such module; `load_module("FILE.py:FACTORY")` builds
a user's module for the command line (`deepreduce count --module`, `deepreduce export --module`).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import operator
import os
import sys
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import UserError
from .graph import GraphBuilder, Op
from .masks import MaskedReLU

BATCH = 2  # shapes are recorded on a batch of two images, so that a forward pass mixing them shows

SUPPORTED = ("conv2d, linear, batch-norm, ReLU (also masked), average/max/adaptive/global pooling, "
             "flatten/view/reshape, residual add, concatenation along channels, identity, dropout, "
             "scalar or per-channel constant multiply/add")


# -- counting -------------------------------------------------------------------------------------

def relu_count(model, example_input=None) -> int:
    """ReLUs one image costs: `relu_count(spec)` for a `ModelSpec` (analytic, `deepreduce.relus`), or
    `relu_count(module, example_input)` for any traceable module (kept positions of masked ReLUs only).
    `example_input`: an N x C x H x W tensor or the per-image shape (C, H, W)."""
    from .spec import ModelSpec
    if isinstance(model, ModelSpec):
        from .relus import relu_count as spec_relu_count
        return spec_relu_count(model)
    if example_input is None:
        raise TypeError("relu_count(module, example_input) needs an example input or its (C, H, W) shape")
    return count_module(model, example_input)["relu_count"]


def comparison_count(model: nn.Module, example_input) -> int:
    """Comparisons one image costs in max pooling (each output element: kernel elements - 1)."""
    return count_module(model, example_input)["comparison_count"]


def count_module(model: nn.Module, example_input) -> dict:
    """{"relu_count", "comparison_count", "sites": {relu site: ReLUs}, "comparisons": {maxpool: n},
    "input_shape", "output_shape"} per image."""
    ops, _ = trace(model, example_input)
    return {"relu_count": sum(op.relu_count for op in ops if op.kind == "relu"),
            "comparison_count": sum(op.comparison_count for op in ops if op.kind == "maxpool"),
            "sites": {op.site: op.relu_count for op in ops if op.kind == "relu"},
            "comparisons": {op.name: op.comparison_count for op in ops if op.kind == "maxpool"},
            "input_shape": list(ops[0].shape), "output_shape": list(ops[-1].shape)}


# -- user modules for the command line ------------------------------------------------------------

def load_module(ref: str, weights: str | None = None) -> nn.Module:
    """The module `FACTORY()` returns, from ``FILE.py:FACTORY`` (FILE loaded from its path), with the state
    dict in `weights` loaded (torch.load with weights_only=True); every problem is one-line UserError."""
    path, sep, factory_name = ref.rpartition(":")
    if not sep or not path or not factory_name:
        raise UserError(f"--module {ref!r}: expected FILE.py:FACTORY, e.g. models.py:resnet18")
    if not os.path.isfile(path):
        raise UserError(f"--module {ref!r}: {path} does not exist")
    name = "deepreduce_user_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    folder = os.path.dirname(os.path.abspath(path))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, folder)  # the file may import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(folder)
    except Exception as exc:  # the user's code: any error becomes one line
        sys.modules.pop(name, None)
        raise UserError(f"--module {ref!r}: {path} failed to load ({_one_line(exc)})") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UserError(f"--module {ref!r}: {path} defines no callable {factory_name!r}")
    try:
        model = factory()
    except Exception as exc:
        raise UserError(f"--module {ref!r}: {factory_name}() failed ({_one_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--module {ref!r}: {factory_name}() returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict file (or a dict holding one under "state_dict") with weights_only=True."""
    if not os.path.isfile(path):
        raise UserError(f"--weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--weights {path} is not a readable state dict ({_one_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"--weights {path} does not fit the module ({_one_line(exc)})") from None


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """"3,32,32" -> (3, 32, 32); a UserError otherwise."""
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input-shape {text!r}: expected C,H,W, e.g. 3,32,32")
    return shape


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


# -- tracing ---------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """torch.fx's tracer with MaskedReLU kept as one call (torch.nn modules are leaves already)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, MaskedReLU) or super().is_leaf_module(m, qualname)


class _Val(NamedTuple):
    """A traced activation: the op holding its values (C order) and its per-image shape in PyTorch,
    which may differ from the op's shape by a reshape not yet written."""
    op: int
    shape: tuple[int, ...]


def trace(model: nn.Module, example_input) -> tuple[list[Op], dict[str, torch.Tensor]]:
    """(ops, tensors) of `model` (eval mode; its train/eval flags are restored afterwards).
    `example_input`: an N x C x H x W tensor or the per-image shape (C, H, W)."""
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got a {type(model).__name__}")
    x = _example_batch(model, example_input)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _Emitter(model, x).run()
    finally:
        for m, training in modes.items():
            m.training = training


def _example_batch(model: nn.Module, example_input) -> torch.Tensor:
    if isinstance(example_input, torch.Tensor):
        if example_input.dim() != 4 or example_input.shape[0] < 1:
            raise UserError(f"the example input has shape {tuple(example_input.shape)}: expected N x C x H x W")
        first = example_input[:1].detach()
        x = torch.cat([first, example_input[1:2].detach() if len(example_input) > 1 else first])
    else:
        shape = tuple(int(d) for d in example_input)
        if len(shape) != 3:
            raise UserError(f"the example input shape {shape} is not (C, H, W)")
        x = torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(0))
    param = next(iter(model.parameters()), None)
    return x.to(param.device if param is not None else "cpu", torch.float32 if param is None else param.dtype)


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            v = (v[0], v[0])
        if len(v) != 2:
            raise ValueError(f"{what} {v!r} is not a pair")
        return int(v[0]), int(v[1])
    return int(v), int(v)


# Functions by what they are (call_function targets; call_method names are in _METHODS).
_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu_", torch.relu_: "relu_",
    torch.clamp: "clamp", torch.clamp_min: "clamp_min",
    operator.add: "add", torch.add: "add", operator.iadd: "add_",
    operator.sub: "sub", torch.sub: "sub", operator.isub: "sub_",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul_",
    operator.truediv: "div", torch.div: "div", operator.itruediv: "div_", operator.neg: "neg", torch.neg: "neg",
    F.conv2d: "conv2d", torch.conv2d: "conv2d", F.linear: "linear",
    F.batch_norm: "batch_norm",
    F.max_pool2d: "max_pool2d", torch.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    F.adaptive_max_pool2d: "adaptive_max_pool2d",
    torch.mean: "mean",
    torch.flatten: "reshape", torch.reshape: "reshape", torch.squeeze: "reshape", torch.unsqueeze: "reshape",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    F.dropout: "dropout", F.dropout1d: "dropout", F.dropout2d: "dropout", F.dropout3d: "dropout",
    F.alpha_dropout: "dropout", F.feature_alpha_dropout: "dropout",
}
_FUNCTION_IDS = {id(f): kind for f, kind in _FUNCTIONS.items()}
_METHODS = {
    "relu": "relu", "relu_": "relu_", "clamp": "clamp", "clamp_": "clamp_", "clamp_min": "clamp_min",
    "clamp_min_": "clamp_min_", "add": "add", "add_": "add_", "sub": "sub", "sub_": "sub_", "mul": "mul",
    "mul_": "mul_", "div": "div", "div_": "div_", "neg": "neg", "mean": "mean",
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "squeeze": "reshape", "unsqueeze": "reshape",
    "unflatten": "reshape", "view_as": "reshape", "reshape_as": "reshape",
    "contiguous": "identity", "clone": "identity", "detach": "identity", "float": "identity",
}
_SIGNATURES = {  # parameter names in call order, for binding positional and keyword arguments
    "relu": ("input", "inplace"), "relu_": ("input",), "clamp": ("input", "min", "max"),
    "clamp_": ("input", "min", "max"), "clamp_min": ("input", "min"), "clamp_min_": ("input", "min"),
    "add": ("input", "other", "alpha"), "add_": ("input", "other", "alpha"),
    "sub": ("input", "other", "alpha"), "sub_": ("input", "other", "alpha"),
    "mul": ("input", "other"), "mul_": ("input", "other"), "div": ("input", "other", "rounding_mode"),
    "div_": ("input", "other", "rounding_mode"), "neg": ("input",),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "linear": ("input", "weight", "bias"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"),
    "adaptive_avg_pool2d": ("input", "output_size"), "adaptive_max_pool2d": ("input", "output_size", "return_indices"),
    "mean": ("input", "dim", "keepdim", "dtype"), "cat": ("tensors", "dim"),
    "dropout": ("input", "p", "training", "inplace"), "identity": ("input",), "reshape": ("input",),
}
_INPLACE = {"relu_", "clamp_", "clamp_min_", "add_", "sub_", "mul_", "div_"}


class _Emitter:
    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x
        self.input_shape = tuple(int(d) for d in x.shape[1:])
        try:
            tracer = _Tracer()
            graph = tracer.trace(model, concrete_args=_defaults_after_first(model))
        except Exception as exc:  # the user's forward pass under torch.fx
            raise UserError(f"torch.fx cannot trace {type(model).__name__} ({_one_line(exc)}): the forward "
                            "pass must not branch on input values or call untraceable code") from None
        self.gm = fx.GraphModule(tracer.root, graph)
        self.nodes = list(self.gm.graph.nodes)
        # the image batch, then parameters fixed at their defaults (concrete_args)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders or any(not n.args for n in placeholders[1:]):
            raise UserError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs without "
                            "defaults: export needs exactly one (the image batch)")
        self.dynamic: set[fx.Node] = set()  # nodes that depend on the input
        for n in self.nodes:
            if n is placeholders[0] or any(a in self.dynamic for a in n.all_input_nodes):
                self.dynamic.add(n)
        self.shapes: dict[fx.Node, tuple] = {}  # full shapes of tensor-valued input-dependent nodes
        self.holds_tensors: set[fx.Node] = set()  # input-dependent nodes that produce tensors
        self.consts: dict[fx.Node, object] = {}  # values of the nodes that do not depend on the input
        self.sizes: dict[fx.Node, object] = {}  # values of input-dependent nodes that hold no tensor
        self._record()
        self.b = GraphBuilder(self.input_shape)
        self.vals: dict[fx.Node, _Val] = {placeholders[0]: _Val(0, self.input_shape)}
        self.skip: set[fx.Node] = set()  # absorbed into another node's op (BN folds, SNL masks)
        self.folded: dict[fx.Node, fx.Node] = {}  # conv/linear node -> the batch-norm node folded into it
        self.masked: dict[fx.Node, tuple[fx.Node, torch.Tensor]] = {}  # SNL add node -> (x, mask)
        self.names: Counter = Counter()
        self.reshaped: dict[tuple[int, tuple], int] = {}

    # -- running the graph once, for shapes and constants --------------------------------------
    def _record(self) -> None:
        emitter = self

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                if n in emitter.dynamic:
                    if isinstance(result, torch.Tensor):
                        emitter.shapes[n] = tuple(result.shape)
                        emitter.holds_tensors.add(n)
                    elif _contains_tensor(result):
                        emitter.holds_tensors.add(n)
                    else:  # sizes read from activations (x.size(3)): fixed by the per-image shape
                        emitter.sizes[n] = result
                else:
                    emitter.consts[n] = result.detach() if isinstance(result, torch.Tensor) else result
                return result

        try:
            with torch.no_grad():
                Recorder(self.gm).run(self.x)
        except Exception as exc:
            raise UserError(f"{type(self.model).__name__} fails on a batch of {BATCH} images of shape "
                            f"{'x'.join(map(str, self.input_shape))} ({_one_line(exc)})") from None

    # -- naming and errors -------------------------------------------------------------------------
    def path(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack") or {}
        return str(list(stack.values())[-1][0]) if stack else ""

    def op_name(self, n: fx.Node) -> str:
        """What the operator is, for errors: a module's class, a function's or method's name."""
        if n.op == "call_module":
            return type(self.gm.get_submodule(n.target)).__name__
        if n.op == "call_method":
            return str(n.target)
        return getattr(n.target, "__name__", None) or str(n.target)

    def where(self, n: fx.Node) -> str:
        return self.path(n) or f"the top level of {type(self.model).__name__}.forward"

    def fail(self, n: fx.Node, why: str | None = None):
        what = f"{self.op_name(n)} at {self.where(n)}"
        if why is None:
            raise UserError(f"unsupported operator {what}: a plan holds {SUPPORTED}")
        raise UserError(f"unsupported use of {what}: {why}")

    def name(self, n: fx.Node, what: str | None = None) -> str:
        parts = (self.path(n),) if n.op == "call_module" else (self.path(n), what or self.op_name(n))
        base = ".".join(p for p in parts if p)
        self.names[base] += 1
        return base if self.names[base] == 1 else f"{base}#{self.names[base]}"

    # -- node classification ----------------------------------------------------------------------
    def kind(self, n: fx.Node) -> str | None:
        if n.op == "call_function":
            return _FUNCTION_IDS.get(id(n.target))
        if n.op == "call_method":
            return _METHODS.get(n.target)
        if n.op == "call_module":
            m = self.gm.get_submodule(n.target)
            for cls, kind in _MODULES:
                if isinstance(m, cls):
                    return kind
        return None

    def bind_args(self, n: fx.Node, kind: str) -> dict:
        """The node's arguments by parameter name (modules: just "input")."""
        if n.op == "call_module":
            return {"input": n.args[0]} if len(n.args) == 1 and not n.kwargs else {"input": None}
        names = _SIGNATURES.get(kind, ("input",))
        if len(n.args) > len(names) and kind not in ("reshape",):
            self.fail(n, f"{len(n.args)} positional arguments")
        bound = dict(zip(names, n.args))
        bound.update(n.kwargs)
        return bound

    def const(self, n: fx.Node, a, what: str):
        """A constant argument's value (a Python value, or a float64 CPU tensor); sizes read from
        activations (F.avg_pool2d(x, x.size(3))) count as constants."""
        if isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
            return type(a)(self.const(n, v, what) for v in a)
        if isinstance(a, fx.Node):
            if a in self.sizes:
                return self.sizes[a]
            if a in self.dynamic:
                self.fail(n, f"its {what} depends on the input (only constants are supported there)")
            a = self.consts[a]
        if isinstance(a, torch.Tensor):
            return a.detach().to("cpu", torch.float64)
        return a

    def value(self, n: fx.Node, a) -> _Val:
        if not isinstance(a, fx.Node) or a not in self.vals:
            self.fail(n, "its input is not an activation the plan computes")
        return self.vals[a]

    def out_shape(self, n: fx.Node) -> tuple[int, ...]:
        shape = self.shapes[n]
        if not shape or shape[0] != BATCH:
            self.fail(n, f"its output of shape {shape} for {BATCH} images does not keep the batch dimension")
        return tuple(shape[1:])

    def need(self, v: _Val, shape=None) -> int:
        """An op holding `v` with exactly its PyTorch per-image shape (writing the reshape if needed)."""
        shape = list(v.shape if shape is None else shape)
        if self.b.shape(v.op) == shape:
            return v.op
        key = (v.op, tuple(shape))
        if key not in self.reshaped:
            self.reshaped[key] = self.b.reshape(v.op, shape, self.b.ops[v.op].name + ".reshape")
        return self.reshaped[key]

    # -- the pass ------------------------------------------------------------------------------------
    def run(self) -> tuple[list[Op], dict[str, torch.Tensor]]:
        output = next(n for n in self.nodes if n.op == "output")
        result = output.args[0]
        if not isinstance(result, fx.Node) or result not in self.shapes:
            raise UserError(f"{type(self.model).__name__}.forward must return one tensor (the logits)")
        live = self._live(result)
        self._find_snl_masks(live)
        for n in self.nodes:
            if n in live and n in self.holds_tensors and n.op != "placeholder" and n not in self.skip:
                self.emit(n)
                if n not in self.vals:
                    raise AssertionError(f"no value for {n}")
                target = self._inplace_target(n)
                if target is not None and target in self.dynamic:
                    self.vals[target] = self.vals[n]  # later readers of the mutated tensor see the result
        if result not in self.vals:
            self.fail(result, "its output is not computed from the input")
        last = self.need(self.vals[result])
        if last == 0:
            raise UserError(f"{type(self.model).__name__} computes nothing from its input")
        if last != len(self.b.ops) - 1:  # the logits must be the last op
            last = self.b.reshape(last, self.b.shape(last), "output")
        return self.b.ops, self.b.tensors

    def _inplace_target(self, n: fx.Node) -> fx.Node | None:
        kind = self.kind(n)
        if kind is None:
            return None
        inplace = kind in _INPLACE
        if n.op == "call_module":
            inplace = bool(getattr(self.gm.get_submodule(n.target), "inplace", False))
        elif n.kwargs.get("inplace") or (kind in ("relu", "dropout") and self.bind_args(n, kind).get("inplace")):
            inplace = True
        return n.args[0] if inplace and n.args and isinstance(n.args[0], fx.Node) else None

    def _live(self, result: fx.Node) -> set[fx.Node]:
        """Nodes the output depends on; an in-place op is live when a live later node reads its target."""
        needed, live = {result}, set()
        for n in reversed(self.nodes):
            target = self._inplace_target(n) if n.op.startswith("call") else None
            if n in needed or (target is not None and target in needed):
                live.add(n)
                needed.update(n.all_input_nodes)
        return live

    # -- SNL: relu(x) * m + x * (1 - m) ----------------------------------------------------------------
    def _find_snl_masks(self, live: set[fx.Node]) -> None:
        for n in self.nodes:
            if n not in live or n not in self.shapes or self.kind(n) != "add":
                continue
            args = self.bind_args(n, "add")
            if args.get("alpha", 1) != 1:
                continue
            a, b = args.get("input"), args.get("other")
            terms = [self._mul_by_const(t) for t in (a, b)]
            if None in terms:
                continue
            for (r_mul, r, m), (x_mul, x, m_rest) in (terms, terms[::-1]):
                if not (self._is_plain_relu(r) and len(r.users) == 1 and r.args[0] is x):
                    continue
                if x not in self.shapes or self.shapes[x] != self.shapes[n]:
                    continue
                try:
                    m, m_rest = torch.broadcast_tensors(torch.as_tensor(m, dtype=torch.float64),
                                                        torch.as_tensor(m_rest, dtype=torch.float64))
                except RuntimeError:
                    continue
                if bool(((m == 0) | (m == 1)).all()) and bool((m + m_rest == 1).all()):
                    self.masked[n] = (x, m)
                    self.skip.update((r, r_mul, x_mul))
                    break

    def _mul_by_const(self, t) -> tuple[fx.Node, fx.Node, object] | None:
        """(mul node, its input-dependent operand, the constant) when `t` is activation * constant used once."""
        if not isinstance(t, fx.Node) or t not in self.shapes or self.kind(t) != "mul" or len(t.users) != 1:
            return None
        args = self.bind_args(t, "mul")
        a, b = args.get("input"), args.get("other")
        if isinstance(a, fx.Node) and a in self.dynamic and not (isinstance(b, fx.Node) and b in self.dynamic):
            return t, a, self.const(t, b, "factor")
        if isinstance(b, fx.Node) and b in self.dynamic and not (isinstance(a, fx.Node) and a in self.dynamic):
            return t, b, self.const(t, a, "factor")
        return None

    def _is_plain_relu(self, n) -> bool:
        if not isinstance(n, fx.Node) or self.kind(n) != "relu":
            return False
        if n.op == "call_module":
            return not self.gm.get_submodule(n.target).inplace
        return not self.bind_args(n, "relu").get("inplace", False)

    # -- one node ----------------------------------------------------------------------------------
    def emit(self, n: fx.Node) -> None:
        kind = self.kind(n)
        if kind is None:
            self.fail(n)
        shape = self.out_shape(n) if n in self.shapes else self.fail(n, "it returns several tensors")
        args = self.bind_args(n, kind)
        module = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        if kind != "cat" and args.get("input") is None:
            self.fail(n, "unexpected arguments")
        handler = getattr(self, "_" + kind.rstrip("_"))
        op = handler(n, args, module, shape)
        if isinstance(op, _Val):
            self.vals[n] = op
            return
        if math.prod(self.b.shape(op)) != math.prod(shape):  # geometry check against PyTorch's own shapes
            raise AssertionError(f"{n}: op shape {self.b.shape(op)} vs PyTorch {shape}")
        self.vals[n] = _Val(op, shape)
        if n in self.folded:  # the batch-norm folded into this op reads as it
            self.vals[self.folded[n]] = self.vals[n]

    def _identity(self, n, args, module, shape):
        if self.kind(n) == "dropout" and module is None and self.const(n, args.get("training", True), "training"):
            self.fail(n, "dropout with training=True is random even in eval mode (pass training=self.training)")
        return self.value(n, args["input"])

    _dropout = _identity

    def _reshape(self, n, args, module, shape):
        v = self.value(n, args["input"])
        if math.prod(v.shape) != math.prod(shape):
            self.fail(n, f"it changes {v.shape} into {shape}")
        return _Val(v.op, shape)

    def _relu(self, n, args, module, shape):
        if n in self.masked:
            raise AssertionError("masked ReLUs are add nodes")
        kind = self.kind(n)
        if kind.startswith("clamp"):
            lo, hi = self.const(n, args.get("min"), "min"), self.const(n, args.get("max"), "max")
            if hi is not None or lo is None or float(lo) != 0.0:
                self.fail(n, "only clamp(min=0), a ReLU, is supported")
        v = self.value(n, args["input"])
        if isinstance(module, MaskedReLU):
            mask = module.broadcast_mask(torch.zeros(1, *v.shape))[0]
            x = self.need(v)
            op = self.b.masked_relu(x, self.name(n), mask)
            return _Val(op, v.shape)
        return _Val(self.b.masked_relu(v.op, self.name(n, "relu")), v.shape)

    _clamp = _clamp_min = _relu

    def _conv2d(self, n, args, module, shape):
        v = self.value(n, args["input"])
        if len(v.shape) != 3:
            self.fail(n, f"its input has per-image shape {v.shape}, not C x H x W")
        if module is not None:
            if module.padding_mode != "zeros":
                self.fail(n, f"padding_mode={module.padding_mode!r} (only zero padding is supported)")
            weight, bias = module.weight, module.bias
            stride, padding, dilation, groups = module.stride, module.padding, module.dilation, module.groups
        else:
            weight, bias = self.const(n, args["weight"], "weight"), self.const(n, args.get("bias"), "bias")
            stride, padding, dilation, groups = (self.const(n, args.get(key, default), key) for key, default in
                                                 (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))
        weight = weight.detach().to("cpu", torch.float64)
        bias = None if bias is None else bias.detach().to("cpu", torch.float64)
        dilation = _pair(dilation, "dilation")
        if isinstance(padding, str):
            padding = _same_padding(padding, weight.shape[2:], dilation) or self.fail(
                n, "padding='same' with an even kernel pads unevenly")
        weight, bias = self._fold_bn(n, weight, bias)
        op = self.b.conv_from(self.need(v), self.name(n, "conv2d"), weight, bias, _pair(stride, "stride"),
                              _pair(padding, "padding"), dilation, int(groups))
        if tuple(self.b.shape(op)) != shape:
            self.fail(n, f"output shape {shape} differs from the plan's {self.b.shape(op)}")
        return op

    def _linear(self, n, args, module, shape):
        v = self.value(n, args["input"])
        if len(v.shape) != 1:
            self.fail(n, f"its input has per-image shape {v.shape}: flatten it first")
        if module is not None:
            weight, bias = module.weight, module.bias
        else:
            weight, bias = self.const(n, args["weight"], "weight"), self.const(n, args.get("bias"), "bias")
        weight = weight.detach().to("cpu", torch.float64)
        bias = None if bias is None else bias.detach().to("cpu", torch.float64)
        weight, bias = self._fold_bn(n, weight, bias)
        return self.b.linear_from(self.need(v), self.name(n, "linear"), weight, bias)

    def _fold_bn(self, n, weight, bias):
        """Fold the batch-norm that is this conv/linear's only reader into its weight and bias (then the
        batch-norm node reads as this op). A layer without bias gets a zero one (the engines add one)."""
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=torch.float64)
        users = list(n.users)
        if len(users) == 1 and users[0] not in self.skip and self.kind(users[0]) == "batch_norm" \
                and users[0].args and users[0].args[0] is n:
            bn = users[0]
            scale, shift = self._bn_affine(bn, self.bind_args(bn, "batch_norm"),
                                           self.gm.get_submodule(bn.target) if bn.op == "call_module" else None)
            if scale.shape == (weight.shape[0],):
                self.skip.add(bn)
                self.folded[n] = bn
                weight = weight * scale.view(-1, *[1] * (weight.dim() - 1))
                bias = bias * scale + shift
        return weight, bias

    def _bn_affine(self, n, args, module):
        if module is not None:
            if module.running_mean is None or module.running_var is None:
                self.fail(n, "batch-norm without running statistics normalises by the batch in eval mode")
            mean, var, eps = module.running_mean, module.running_var, module.eps
            weight, bias = module.weight, module.bias
        else:
            if args.get("training", False):
                self.fail(n, "batch_norm with training=True normalises by the batch")
            mean, var = self.const(n, args.get("running_mean"), "mean"), self.const(n, args.get("running_var"), "var")
            if mean is None or var is None:
                self.fail(n, "batch-norm without running statistics normalises by the batch in eval mode")
            weight, bias, eps = self.const(n, args.get("weight"), "weight"), self.const(n, args.get("bias"), "bias"), \
                args.get("eps", 1e-5)
        mean, var = mean.detach().to("cpu", torch.float64), var.detach().to("cpu", torch.float64)
        scale = 1.0 / torch.sqrt(var + float(eps))
        if weight is not None:
            scale = scale * weight.detach().to("cpu", torch.float64)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.detach().to("cpu", torch.float64)
        return scale, shift

    def _batch_norm(self, n, args, module, shape):
        v = self.value(n, args["input"])
        if len(v.shape) not in (1, 3):
            self.fail(n, f"its input has per-image shape {v.shape} (batch-norm 1d on N x C x L is not supported)")
        scale, shift = self._bn_affine(n, args, module)
        if scale.shape != (v.shape[0],):
            self.fail(n, f"{scale.numel()} features for {v.shape[0]} channels")
        return self.b.scale_shift_from(self.need(v), self.name(n, "batch_norm"), scale, shift)

    def _pool_args(self, n, args, module):
        if module is not None:
            get = lambda key, default=None: getattr(module, key, default)  # noqa: E731
        else:
            get = lambda key, default=None: self.const(n, args.get(key, default), key)  # noqa: E731
        kernel = _pair(get("kernel_size"), "kernel_size")
        stride = get("stride")
        stride = kernel if stride is None or stride == [] or stride == () else _pair(stride, "stride")
        return get, kernel, stride, _pair(get("padding", 0), "padding")

    def _max_pool2d(self, n, args, module, shape):
        v = self.value(n, args["input"])
        get, kernel, stride, padding = self._pool_args(n, args, module)
        if _pair(get("dilation", 1), "dilation") != (1, 1) or get("return_indices", False):
            self.fail(n, "max pooling with dilation or return_indices")
        op = self.b.pool("maxpool", self.need(v), self.name(n, "max_pool2d"), kernel, stride, padding)
        if tuple(self.b.shape(op)) != shape:  # ceil_mode=True with a partial window
            self.fail(n, f"ceil_mode gives {shape}, the plan's pooling {self.b.shape(op)}")
        return op

    def _avg_pool2d(self, n, args, module, shape):
        v = self.value(n, args["input"])
        get, kernel, stride, padding = self._pool_args(n, args, module)
        if get("divisor_override") is not None:
            self.fail(n, "divisor_override")
        if padding != (0, 0) and not get("count_include_pad", True):
            self.fail(n, "count_include_pad=False with padding")
        if len(v.shape) == 3 and padding == (0, 0) and kernel == tuple(v.shape[1:]) and shape[1:] == (1, 1):
            return _Val(self.b.global_avgpool(self.need(v), self.name(n, "avg_pool2d")), shape)
        op = self.b.pool("avgpool2d", self.need(v), self.name(n, "avg_pool2d"), kernel, stride, padding)
        if tuple(self.b.shape(op)) != shape:
            self.fail(n, f"ceil_mode gives {shape}, the plan's pooling {self.b.shape(op)}")
        return op

    def _adaptive(self, n, args, module, shape, kind):
        v = self.value(n, args["input"])
        if len(v.shape) != 3:
            self.fail(n, f"its input has per-image shape {v.shape}, not C x H x W")
        if kind == "maxpool" and (module.return_indices if module is not None else args.get("return_indices")):
            self.fail(n, "return_indices")
        (h, w), (oh, ow) = v.shape[1:], shape[1:]
        if (oh, ow) == (1, 1) and kind == "avgpool2d":
            return _Val(self.b.global_avgpool(self.need(v), self.name(n)), shape)
        if (oh, ow) == (h, w):
            return v
        if h % oh or w % ow:
            self.fail(n, f"adaptive pooling of {h}x{w} to {oh}x{ow} has uneven windows")
        k = (h // oh, w // ow)
        return self.b.pool(kind, self.need(v), self.name(n), k, k, (0, 0))

    def _adaptive_avg_pool2d(self, n, args, module, shape):
        return self._adaptive(n, args, module, shape, "avgpool2d")

    def _adaptive_max_pool2d(self, n, args, module, shape):
        return self._adaptive(n, args, module, shape, "maxpool")

    def _mean(self, n, args, module, shape):
        v = self.value(n, args["input"])
        dims = self.const(n, args.get("dim"), "dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if len(v.shape) != 3 or {d % 4 for d in dims} != {2, 3} or args.get("dtype") is not None:
            self.fail(n, "only the mean over the spatial dimensions (2, 3) is supported")
        return _Val(self.b.global_avgpool(self.need(v), self.name(n, "mean")), shape)

    def _cat(self, n, args, module, shape):
        tensors = args.get("tensors")
        if not isinstance(tensors, (list, tuple)) or not tensors:
            self.fail(n, "unexpected arguments")
        vals = [self.value(n, t) for t in tensors]
        dim = self.const(n, args.get("dim", 0), "dim")
        if len(vals) == 1:
            return vals[0]
        rank = len(vals[0].shape) + 1
        if not isinstance(dim, int) or dim % rank != 1:
            self.fail(n, f"concatenation along dimension {dim} (only along channels, dimension 1)")
        return self.b.concat([self.need(x) for x in vals], self.name(n, "cat"))

    # -- add, sub, mul, div, neg ---------------------------------------------------------------------
    def _add(self, n, args, module, shape, sign: float = 1.0):
        if n in self.masked:
            x, mask = self.masked[n]
            v = self.vals[x]
            return _Val(self.b.masked_relu(self.need(v), self.name(n, "relu"), mask), v.shape)
        a, b = args.get("input"), args.get("other")
        alpha = self.const(n, args.get("alpha", 1), "alpha")
        alpha = float(alpha) if not isinstance(alpha, torch.Tensor) else float(alpha.item())
        dyn_a, dyn_b = (isinstance(t, fx.Node) and t in self.dynamic for t in (a, b))
        if dyn_a and dyn_b:
            va, vb = self.value(n, a), self.value(n, b)
            if va.shape != vb.shape or va.shape != shape:
                self.fail(n, f"adding shapes {va.shape} and {vb.shape} (broadcasting is not supported)")
            if sign * alpha != 1.0:
                vb = _Val(self.b.scale(vb.op, self.name(n, "scale"), sign * alpha, 0.0), vb.shape)
            if self.b.shape(va.op) == self.b.shape(vb.op):
                return _Val(self.b.add(va.op, vb.op, self.name(n, "add")), shape)
            return self.b.add(self.need(va), self.need(vb), self.name(n, "add"))
        if dyn_a:  # x + alpha * c, or x - alpha * c
            return self._affine(n, self.value(n, a), 1.0, self.const(n, b, "constant"), sign * alpha, shape)
        # c + alpha * x, or c - alpha * x
        return self._affine(n, self.value(n, b), sign * alpha, self.const(n, a, "constant"), 1.0, shape)

    def _sub(self, n, args, module, shape):
        return self._add(n, args, module, shape, sign=-1.0)

    def _mul(self, n, args, module, shape):
        a, b = args.get("input"), args.get("other")
        dyn_a, dyn_b = (isinstance(t, fx.Node) and t in self.dynamic for t in (a, b))
        if dyn_a and dyn_b:
            self.fail(n, "multiplying two activations")
        x, c = (a, b) if dyn_a else (b, a)
        return self._affine(n, self.value(n, x), self.const(n, c, "factor"), 0.0, 1.0, shape)

    def _div(self, n, args, module, shape):
        a, b = args.get("input"), args.get("other")
        if isinstance(b, fx.Node) and b in self.dynamic:
            self.fail(n, "dividing by an activation")
        if args.get("rounding_mode") is not None:
            self.fail(n, "rounding division")
        c = self.const(n, b, "divisor")
        return self._affine(n, self.value(n, a), 1.0 / (c if isinstance(c, torch.Tensor) else float(c)),
                            0.0, 1.0, shape)

    def _neg(self, n, args, module, shape):
        return self._affine(n, self.value(n, args["input"]), -1.0, 0.0, 1.0, shape)

    def _affine(self, n, v: _Val, factor, offset, offset_sign: float, shape):
        """x * factor + offset_sign * offset, for constants that are scalars or one value per channel."""
        if tuple(shape) != v.shape:
            self.fail(n, f"a constant of another shape turns {v.shape} into {shape}")
        factor, offset = _per_channel(factor, v.shape), _per_channel(offset, v.shape)
        if factor is None or offset is None:
            self.fail(n, "a constant that is neither a scalar nor one value per channel")
        offset = offset * offset_sign
        if factor.numel() == 1 and offset.numel() == 1:
            if float(factor) == 1.0 and float(offset) == 0.0:  # x * 1.0, x + 0: nothing to compute
                return v
            return _Val(self.b.scale(v.op, self.name(n), float(factor), float(offset)), v.shape)
        channels = v.shape[0]
        return self.b.scale_shift_from(self.need(v), self.name(n), factor.expand(channels).clone(),
                                       offset.expand(channels).clone())


def _per_channel(c, shape: tuple) -> torch.Tensor | None:
    """A scalar as a 1-element tensor, one value per channel (or per feature of a flat value) as a
    (C,) tensor, else None."""
    t = c if isinstance(c, torch.Tensor) else torch.tensor(float(c), dtype=torch.float64)
    t = t.to(torch.float64)
    if t.numel() == 1:
        return t.reshape(1)
    while t.dim() > len(shape) and t.shape[0] == 1:
        t = t[0]
    if t.dim() > len(shape):
        return None
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
    if t.shape[0] == shape[0] and all(d == 1 for d in t.shape[1:]):
        return t.reshape(-1)
    return None


def _defaults_after_first(model: nn.Module) -> dict | None:
    """forward(x, flag=False, ...): the later parameters fixed at their defaults (one input is traced)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    fixed = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return fixed or None


def _same_padding(mode: str, kernel, dilation) -> tuple[int, int] | None:
    if mode == "valid":
        return (0, 0)
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if mode != "same" or any(t % 2 for t in totals):
        return None
    return (totals[0] // 2, totals[1] // 2)


def _contains_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_tensor(v) for v in value.values())
    return False


_MODULES = [  # module classes by what they are (checked in order, with isinstance)
    (MaskedReLU, "relu"), (nn.ReLU, "relu"),
    (nn.Conv2d, "conv2d"), (nn.Linear, "linear"),
    (nn.BatchNorm1d, "batch_norm"), (nn.BatchNorm2d, "batch_norm"), (nn.SyncBatchNorm, "batch_norm"),
    (nn.MaxPool2d, "max_pool2d"), (nn.AvgPool2d, "avg_pool2d"),
    (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"), (nn.AdaptiveMaxPool2d, "adaptive_max_pool2d"),
    (nn.Flatten, "reshape"), (nn.Unflatten, "reshape"),
    (nn.Identity, "identity"), (nn.Dropout, "identity"), (nn.Dropout1d, "identity"), (nn.Dropout2d, "identity"),
    (nn.Dropout3d, "identity"), (nn.AlphaDropout, "identity"), (nn.FeatureAlphaDropout, "identity"),
]
