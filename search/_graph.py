"""Build a torch ``GraphModule`` from a checked ``.pt2`` graph, node by node, from an op allowlist.

Every node's target must be a key of ``_OPS``; its arguments must be plain data (tensors by name,
ints, floats, bools, lists of them). Convolutions whose weight is a parameter become ``nn.Conv2d``
submodules at the parameter's module path, so a site can be swapped by replacing a submodule and the
state dict keeps the original names.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch import fx, nn

from search._pt2_reader import RawProgram, check_symbolic_expr
from search.errors import UnsafeArchiveError, UnsupportedModelError

aten = torch.ops.aten

# Serialised target -> callable. Nothing outside this table is ever called.
_OPS: dict[str, Any] = {
    "torch.ops.aten.conv2d.default": aten.conv2d.default,
    "torch.ops.aten.convolution.default": aten.convolution.default,
    "torch.ops.aten.batch_norm.default": aten.batch_norm.default,
    "torch.ops.aten._native_batch_norm_legit_no_training.default": (
        aten._native_batch_norm_legit_no_training.default
    ),
    "torch.ops.aten.relu.default": aten.relu.default,
    "torch.ops.aten.relu_.default": aten.relu.default,
    "torch.ops.aten.relu6.default": aten.relu6.default,
    "torch.ops.aten.hardtanh.default": aten.hardtanh.default,
    "torch.ops.aten.hardtanh_.default": aten.hardtanh.default,
    "torch.ops.aten.hardswish.default": aten.hardswish.default,
    "torch.ops.aten.hardswish_.default": aten.hardswish.default,
    "torch.ops.aten.hardsigmoid.default": aten.hardsigmoid.default,
    "torch.ops.aten.silu.default": aten.silu.default,
    "torch.ops.aten.silu_.default": aten.silu.default,
    "torch.ops.aten.sigmoid.default": aten.sigmoid.default,
    "torch.ops.aten.tanh.default": aten.tanh.default,
    "torch.ops.aten.gelu.default": aten.gelu.default,
    "torch.ops.aten.leaky_relu.default": aten.leaky_relu.default,
    "torch.ops.aten.add.Tensor": aten.add.Tensor,
    "torch.ops.aten.add_.Tensor": aten.add.Tensor,
    "torch.ops.aten.sub.Tensor": aten.sub.Tensor,
    "torch.ops.aten.mul.Tensor": aten.mul.Tensor,
    "torch.ops.aten.mul_.Tensor": aten.mul.Tensor,
    "torch.ops.aten.mul.Scalar": aten.mul.Scalar,
    "torch.ops.aten.div.Tensor": aten.div.Tensor,
    "torch.ops.aten.cat.default": aten.cat.default,
    "torch.ops.aten.max_pool2d.default": aten.max_pool2d.default,
    "torch.ops.aten.max_pool2d_with_indices.default": aten.max_pool2d_with_indices.default,
    "torch.ops.aten.avg_pool2d.default": aten.avg_pool2d.default,
    "torch.ops.aten.adaptive_avg_pool2d.default": aten.adaptive_avg_pool2d.default,
    "torch.ops.aten._adaptive_avg_pool2d.default": aten._adaptive_avg_pool2d.default,
    "torch.ops.aten.adaptive_max_pool2d.default": aten.adaptive_max_pool2d.default,
    "torch.ops.aten.flatten.using_ints": aten.flatten.using_ints,
    # view needs a contiguous input; reshape gives the same values for any memory format.
    "torch.ops.aten.view.default": aten.reshape.default,
    "torch.ops.aten._unsafe_view.default": aten.reshape.default,
    "torch.ops.aten.reshape.default": aten.reshape.default,
    "torch.ops.aten.linear.default": aten.linear.default,
    "torch.ops.aten.addmm.default": aten.addmm.default,
    "torch.ops.aten.mm.default": aten.mm.default,
    "torch.ops.aten.t.default": aten.t.default,
    "torch.ops.aten.permute.default": aten.permute.default,
    "torch.ops.aten.mean.dim": aten.mean.dim,
    "torch.ops.aten.sym_size.int": aten.sym_size.int,
    "torch.ops.aten.clone.default": aten.clone.default,
    "torch.ops.aten.contiguous.default": aten.contiguous.default,
    "torch.ops.aten.alias.default": aten.alias.default,
    "torch.ops.aten.detach.default": aten.detach.default,
    "torch.ops.aten.dropout.default": None,  # identity at inference
    "torch.ops.aten.dropout_.default": None,
    "torch.ops.aten.feature_dropout.default": None,
}

# Arguments renamed where a target is served by another op (view -> reshape).
_RENAMED_ARGS: dict[str, dict[str, str]] = {
    "torch.ops.aten.view.default": {"size": "shape"},
    "torch.ops.aten._unsafe_view.default": {"size": "shape"},
}

_IDENTIFIER = re.compile(r"[A-Za-z0-9_]{1,64}")
_SCALAR_KEYS = {"as_int": int, "as_float": float, "as_bool": bool}
_LIST_KEYS = {"as_ints": int, "as_floats": float, "as_bools": bool}


def supported_ops() -> list[str]:
    """The serialised operator names the reader accepts."""
    return sorted(_OPS)


def _module_path(fqn: str) -> list[str]:
    parts = fqn.split(".")
    for part in parts:
        if not _IDENTIFIER.fullmatch(part) or part.startswith("__"):
            raise UnsafeArchiveError(f"refused parameter name {fqn[:80]!r}")
    return parts


def _container(root: nn.Module, parts: list[str]) -> nn.Module:
    module = root
    for part in parts:
        child = module._modules.get(part)
        if child is None:
            if hasattr(module, part):
                raise UnsupportedModelError(f"name clash at {'.'.join(parts)!r}")
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module


class _Builder:
    def __init__(self, raw: RawProgram) -> None:
        self.raw = raw
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.values: dict[str, Any] = {}
        self.attr_nodes: dict[str, fx.Node] = {}
        self.placeholder_to_fqn: dict[str, str] = {}
        self.user_input: str | None = None
        self.use_count: dict[str, int] = {}

    # -- signature -------------------------------------------------------------------------------
    def read_signature(self) -> None:
        specs = self.raw.signature.get("input_specs")
        if not isinstance(specs, list):
            raise UnsafeArchiveError("signature has no input_specs")
        for spec in specs:
            if not isinstance(spec, dict) or len(spec) != 1:
                raise UnsafeArchiveError("malformed input spec")
            ((kind, body),) = spec.items()
            if kind == "user_input":
                name = body.get("arg", {}).get("as_tensor", {}).get("name")
                if not isinstance(name, str) or self.user_input is not None:
                    raise UnsupportedModelError("the model must take exactly one tensor input")
                self.user_input = name
            elif kind in ("parameter", "buffer", "tensor_constant"):
                arg = body.get("arg", {}).get("name")
                fqn = body.get(f"{kind}_name")
                if not isinstance(arg, str) or not isinstance(fqn, str):
                    raise UnsafeArchiveError(f"malformed {kind} spec")
                if fqn not in self.raw.tensors:
                    raise UnsafeArchiveError(f"{kind} {fqn!r} has no stored value")
                self.placeholder_to_fqn[arg] = fqn
            else:
                raise UnsupportedModelError(f"input kind {kind!r} is not supported")
        if self.user_input is None:
            raise UnsupportedModelError("the model takes no tensor input")
        outputs = self.raw.signature.get("output_specs")
        if not isinstance(outputs, list) or len(outputs) != 1 or "user_output" not in outputs[0]:
            raise UnsupportedModelError(
                "the model must return exactly one tensor and mutate no buffers "
                "(export it in eval mode)"
            )

    # -- arguments -------------------------------------------------------------------------------
    def tensor(self, name: Any) -> Any:
        if not isinstance(name, str):
            raise UnsafeArchiveError("tensor reference without a name")
        if name in self.values:
            return self.values[name]
        fqn = self.placeholder_to_fqn.get(name)
        if fqn is None:
            raise UnsafeArchiveError(f"tensor {name[:60]!r} is used before it is defined")
        if fqn not in self.attr_nodes:
            self.attr_nodes[fqn] = self.graph.get_attr(fqn)
        return self.attr_nodes[fqn]

    def argument(self, arg: Any, what: str) -> Any:
        if not isinstance(arg, dict) or len(arg) != 1:
            raise UnsafeArchiveError(f"{what}: malformed argument")
        ((key, value),) = arg.items()
        if key == "as_tensor":
            return self.tensor(value.get("name") if isinstance(value, dict) else None)
        if key in ("as_tensors", "as_optional_tensors"):
            if not isinstance(value, list):
                raise UnsafeArchiveError(f"{what}: malformed tensor list")
            return [self._optional_tensor(v, what) for v in value]
        if key == "as_none":
            return None
        if key in _SCALAR_KEYS:
            return self._scalar(value, _SCALAR_KEYS[key], what)
        if key in _LIST_KEYS:
            if not isinstance(value, list) or len(value) > 64:
                raise UnsafeArchiveError(f"{what}: malformed list")
            return [self._scalar(v, _LIST_KEYS[key], what) for v in value]
        if key == "as_sym_int":
            return self._sym_int(value, what)
        if key == "as_sym_ints":
            if not isinstance(value, list) or len(value) > 64:
                raise UnsafeArchiveError(f"{what}: malformed list")
            return [self._sym_int(v, what) for v in value]
        if key == "as_scalar_type" or key == "as_memory_format" or key == "as_layout":
            raise UnsupportedModelError(f"{what}: argument kind {key!r} is not supported")
        raise UnsupportedModelError(f"{what}: argument kind {key[:40]!r} is not supported")

    def _optional_tensor(self, value: Any, what: str) -> Any:
        if isinstance(value, dict) and "as_none" in value:
            return None
        if isinstance(value, dict) and "as_tensor" in value:
            return self.tensor(value["as_tensor"].get("name"))
        if isinstance(value, dict) and "name" in value:
            return self.tensor(value["name"])
        raise UnsafeArchiveError(f"{what}: malformed tensor list entry")

    @staticmethod
    def _scalar(value: Any, kind: type, what: str) -> Any:
        if kind is float and type(value) in (int, float):
            return float(value)
        if type(value) is not kind:
            raise UnsafeArchiveError(f"{what}: expected {kind.__name__}, got {type(value).__name__}")
        return value

    def _sym_int(self, value: Any, what: str) -> Any:
        if isinstance(value, dict) and "as_int" in value:
            return self._scalar(value["as_int"], int, what)
        if isinstance(value, dict) and "as_name" in value:
            name = value["as_name"]
            if name not in self.values:
                raise UnsafeArchiveError(f"{what}: symbolic size {str(name)[:40]!r} is undefined")
            return self.values[name]
        raise UnsafeArchiveError(f"{what}: malformed symbolic int")

    # -- nodes -----------------------------------------------------------------------------------
    def check_values(self) -> None:
        graph = self.raw.graph
        for key in ("tensor_values", "sym_int_values"):
            entries = graph.get(key) or {}
            if not isinstance(entries, dict):
                raise UnsafeArchiveError(f"{key} is not a mapping")
            for name, meta in entries.items():
                self._check_meta_exprs(meta, f"{key}[{str(name)[:40]}]")

    def _check_meta_exprs(self, meta: Any, what: str) -> None:
        if isinstance(meta, dict):
            for key, value in meta.items():
                if key == "expr_str":
                    check_symbolic_expr(value, self.raw.batch_symbols, what)
                else:
                    self._check_meta_exprs(value, what)
        elif isinstance(meta, list):
            for value in meta:
                self._check_meta_exprs(value, what)

    def count_uses(self, nodes: list[Any]) -> None:
        for node in nodes:
            for inp in node.get("inputs", []):
                name = inp.get("arg", {}).get("as_tensor", {}).get("name")
                if isinstance(name, str):
                    self.use_count[name] = self.use_count.get(name, 0) + 1

    def conv_module(self, kwargs: dict[str, Any], target: str) -> tuple[str, nn.Conv2d] | None:
        """An ``nn.Conv2d`` for a conv node whose weight (and bias) are parameters used only here."""
        weight, bias = kwargs.get("weight"), kwargs.get("bias")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or len(weight.users) > 0:
            return None
        fqn = str(weight.target)
        if not fqn.endswith(".weight") or self.use_count.get(self._placeholder(fqn), 0) != 1:
            return None
        prefix = fqn[: -len(".weight")]
        if bias is not None:
            if not (isinstance(bias, fx.Node) and bias.op == "get_attr" and len(bias.users) == 0):
                return None
            if str(bias.target) != prefix + ".bias":
                return None
        if target.endswith("convolution.default"):
            if kwargs.get("transposed") or any(kwargs.get("output_padding") or []):
                return None
        w = self.raw.tensors[fqn]
        if w.dim() != 4:
            return None
        groups = int(kwargs.get("groups", 1))
        stride = kwargs.get("stride", [1, 1])
        padding = kwargs.get("padding", [0, 0])
        dilation = kwargs.get("dilation", [1, 1])
        if isinstance(padding, str) or groups < 1:
            return None
        pairs = []
        for value in (stride, padding, dilation):
            value = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(value) == 1:
                value = value * 2
            if len(value) != 2:
                return None
            pairs.append((int(value[0]), int(value[1])))
        conv = nn.Conv2d(
            w.shape[1] * groups,
            w.shape[0],
            (w.shape[2], w.shape[3]),
            pairs[0],
            pairs[1],
            pairs[2],
            groups=groups,
            bias=bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            if bias is not None:
                assert conv.bias is not None
                conv.bias.copy_(self.raw.tensors[prefix + ".bias"])
        return prefix, conv

    def _placeholder(self, fqn: str) -> str:
        for name, value in self.placeholder_to_fqn.items():
            if value == fqn:
                return name
        return ""

    def add_node(self, node: Any) -> None:
        if not isinstance(node, dict):
            raise UnsafeArchiveError("malformed node")
        target = node.get("target")
        if not isinstance(target, str) or target not in _OPS:
            raise UnsupportedModelError(f"operator {str(target)[:120]!r} is not supported")
        inputs = node.get("inputs")
        outputs = node.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise UnsafeArchiveError(f"{target}: malformed node")
        kwargs: dict[str, Any] = {}
        for inp in inputs:
            name = inp.get("name") if isinstance(inp, dict) else None
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
                raise UnsafeArchiveError(f"{target}: malformed argument name")
            name = _RENAMED_ARGS.get(target, {}).get(name, name)
            kwargs[name] = self.argument(inp.get("arg"), f"{target}({name})")
        op = _OPS[target]
        result: Any
        if op is None:  # dropout: identity at inference
            result = kwargs["input"]
        elif target.endswith((".conv2d.default", ".convolution.default")) and (
            made := self.conv_module(kwargs, target)
        ):
            prefix, conv = made
            parts = _module_path(prefix)
            parent = _container(self.root, parts[:-1])
            if parts[-1] in parent._modules or hasattr(parent, parts[-1]):
                raise UnsupportedModelError(f"name clash at {prefix!r}")
            parent.add_module(parts[-1], conv)
            for attr in ("weight", "bias"):
                self.attr_nodes.pop(f"{prefix}.{attr}", None)
                unused = [n for n in self.graph.nodes if n.op == "get_attr" and n.target == f"{prefix}.{attr}"]
                for n in unused:
                    self.graph.erase_node(n)
            self._consumed.update({f"{prefix}.weight", f"{prefix}.bias"})
            result = self.graph.call_module(prefix, (kwargs["input"],))
        else:
            try:
                result = self.graph.call_function(op, (), kwargs)
            except Exception as exc:
                raise UnsupportedModelError(f"{target}: {exc}") from None
        self._bind_outputs(outputs, result, target)

    _consumed: set[str]

    def _bind_outputs(self, outputs: list[Any], result: Any, target: str) -> None:
        if len(outputs) == 1 and isinstance(outputs[0], dict) and "as_tensor" in outputs[0]:
            self._define(outputs[0]["as_tensor"].get("name"), result)
            return
        if len(outputs) == 1 and isinstance(outputs[0], dict) and "as_sym_int" in outputs[0]:
            self._define(outputs[0]["as_sym_int"].get("as_name"), result)
            return
        flat: list[Any] = []
        for out in outputs:
            if isinstance(out, dict) and "as_tensors" in out:
                flat.extend(out["as_tensors"])
            else:
                flat.append(out)
        for index, out in enumerate(flat):
            if not isinstance(out, dict):
                raise UnsafeArchiveError(f"{target}: malformed output")
            if "as_none" in out:
                continue
            name = out.get("as_tensor", out).get("name") if "as_tensor" in out else out.get("name")
            self._define(name, self.graph.call_function(operator.getitem, (result, index)))

    def _define(self, name: Any, value: Any) -> None:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise UnsafeArchiveError("node output without a proper name")
        if name in self.values or name in self.placeholder_to_fqn:
            raise UnsafeArchiveError(f"value {name[:60]!r} is defined twice")
        self.values[name] = value

    def build(self) -> fx.GraphModule:
        self._consumed = set()
        self.read_signature()
        self.check_values()
        assert self.user_input is not None
        self.values[self.user_input] = self.graph.placeholder("x")
        nodes = self.raw.graph.get("nodes")
        if not isinstance(nodes, list) or len(nodes) > 100_000:
            raise UnsafeArchiveError("the graph's node list is missing or too long")
        self.count_uses(nodes)
        for node in nodes:
            self.add_node(node)
        outputs = self.raw.graph.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != 1:
            raise UnsupportedModelError("the model must return exactly one tensor")
        out = self.argument(outputs[0], "graph output")
        if not isinstance(out, fx.Node):
            raise UnsupportedModelError("the model's output is not a tensor")
        self.graph.output(out)
        self._register_attrs()
        self.graph.lint()
        module = fx.GraphModule(self.root, self.graph, class_name="SlimModel")
        return module.eval()

    def _register_attrs(self) -> None:
        buffers = set(self.raw.tensors) - self.raw.parameter_names
        for node in self.graph.nodes:
            if node.op != "get_attr":
                continue
            fqn = str(node.target)
            if fqn in self._consumed:
                continue
            parts = _module_path(fqn)
            owner = _container(self.root, parts[:-1])
            if parts[-1] in owner._parameters or parts[-1] in owner._buffers:
                continue
            if hasattr(owner, parts[-1]):
                raise UnsupportedModelError(f"name clash at {fqn!r}")
            value = self.raw.tensors[fqn]
            if fqn in buffers or not value.is_floating_point():
                owner.register_buffer(parts[-1], value)
            else:
                owner.register_parameter(parts[-1], nn.Parameter(value))


def build_module(raw: RawProgram) -> fx.GraphModule:
    """Build an eval-mode ``GraphModule`` from a checked archive.

    Raises:
        UnsupportedModelError: an operator or argument outside the allowlist (named in the message).
        UnsafeArchiveError: a malformed graph.
    """
    return _Builder(raw).build()
