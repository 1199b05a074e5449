"""API conformance of the GPU code without a GPU: every call checked against NVIDIA's real bindings.

None of our CI machines has a GPU, so the TensorRT, cuda-python and torch-tensorrt calls are checked against
what the libraries themselves publish:

- **TensorRT runtime** (``runtime/backends/trt*.py``, the engine reader of ``compile/torchtrt.py``): every
  attribute, method, enum member and keyword they use exists in NVIDIA's real TensorRT 11.4 runtime bindings
  (``tensorrt-lean-cu13-bindings``: ``import tensorrt_lean_bindings``, which imports on a CPU-only machine) with a
  signature the call fits, read from the pybind11 docstrings; and in TensorRT 10.13 (``tensorrt-stubs``, the
  full API typed as ``.pyi``).
- **TensorRT builder** (``compile/trt_builder.py``): the same against the 10.13 stubs (the lean runtime has no
  builder), and mypy over the module with the stubs where its version branches allow.
- **cuda-python** (``runtime/device.py``, ``compile/trt_builder.py``): every ``cudaXxx`` call exists in the
  installed ``cuda-bindings`` and accepts the number of arguments used; every enum member exists.
- **torch-tensorrt** (``compile/torchtrt.py``): the keywords passed to
  ``convert_exported_program_to_serialized_trt_engine`` exist in each supported release; the lists below were
  read from ``py/torch_tensorrt/dynamo/_compiler.py`` of pytorch/TensorRT at the tag named.

The calls are found in the source by their receivers (``engine.``, ``context.``, ``builder.``, ``trt.X``, ...),
so a new call is checked without editing this file; uses guarded by ``hasattr`` / ``getattr(..., default)`` are
version branches and may be missing from one version. ``test_the_checker_catches_a_misspelt_attribute`` shows
that a misspelt name fails.
"""

from __future__ import annotations

import ast
import inspect
import keyword
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from dmpo_edge._lazy import available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: files whose TensorRT calls are runtime calls (checked against 11.4 and 10.13) and builder calls (10.13)
RUNTIME_FILES = ("runtime/backends/trt.py", "runtime/backends/trt_graphs.py", "compile/torchtrt.py")
BUILDER_FILES = ("compile/trt_builder.py",)
CUDA_FILES = ("runtime/device.py", "compile/trt_builder.py")

#: receiver name (the last name before the dot) -> TensorRT class; "trt" is the module itself
RECEIVERS = {
    "trt": "<module>", "engine": "ICudaEngine", "context": "IExecutionContext", "ctx": "IExecutionContext",
    "_runtime": "Runtime", "runtime": "Runtime", "builder": "Builder", "config": "IBuilderConfig",
    "parser": "OnnxParser", "network": "INetworkDefinition", "cache": "ITimingCache", "opt_profile": "IOptimizationProfile",
    "creation": "NetworkDefinitionCreationFlag",
}

#: torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine keywords (after exported_program)
TORCH_TRT_KEYWORDS = {
    "v2.5.0": (
        'inputs', 'arg_inputs', 'kwarg_inputs', 'enabled_precisions', 'debug', 'assume_dynamic_shape_support',
        'workspace_size', 'min_block_size', 'torch_executed_ops', 'pass_through_build_failures', 'max_aux_streams',
        'version_compatible', 'optimization_level', 'use_python_runtime', 'truncate_double', 'use_fast_partitioner',
        'enable_experimental_decompositions', 'device', 'require_full_compilation', 'disable_tf32',
        'sparse_weights', 'make_refittable', 'engine_capability', 'num_avg_timing_iters', 'dla_sram_size',
        'dla_local_dram_size', 'dla_global_dram_size', 'calibrator', 'allow_shape_tensors', 'timing_cache_path',
    ),
    "v2.9.0": (
        'inputs', 'arg_inputs', 'kwarg_inputs', 'device', 'disable_tf32', 'assume_dynamic_shape_support',
        'sparse_weights', 'enabled_precisions', 'engine_capability', 'num_avg_timing_iters', 'workspace_size',
        'dla_sram_size', 'dla_local_dram_size', 'dla_global_dram_size', 'truncate_double',
        'require_full_compilation', 'min_block_size', 'torch_executed_ops', 'torch_executed_modules',
        'pass_through_build_failures', 'max_aux_streams', 'version_compatible', 'optimization_level',
        'use_python_runtime', 'use_fast_partitioner', 'enable_experimental_decompositions', 'dryrun',
        'hardware_compatible', 'timing_cache_path', 'lazy_engine_init', 'cache_built_engines',
        'reuse_cached_engines', 'engine_cache_dir', 'engine_cache_size', 'custom_engine_cache',
        'use_explicit_typing', 'use_fp32_acc', 'refit_identical_engine_weights', 'strip_engine_weights',
        'immutable_weights', 'enable_weight_streaming', 'tiling_optimization_level', 'l2_limit_for_tiling',
        'offload_module_to_cpu',
    ),
    "v2.10.0": (
        'inputs', 'arg_inputs', 'kwarg_inputs', 'device', 'disable_tf32', 'assume_dynamic_shape_support',
        'sparse_weights', 'enabled_precisions', 'engine_capability', 'num_avg_timing_iters', 'workspace_size',
        'dla_sram_size', 'dla_local_dram_size', 'dla_global_dram_size', 'truncate_double',
        'require_full_compilation', 'min_block_size', 'torch_executed_ops', 'torch_executed_modules',
        'pass_through_build_failures', 'max_aux_streams', 'version_compatible', 'optimization_level',
        'use_python_runtime', 'use_fast_partitioner', 'enable_experimental_decompositions', 'dryrun',
        'hardware_compatible', 'timing_cache_path', 'lazy_engine_init', 'cache_built_engines',
        'reuse_cached_engines', 'engine_cache_dir', 'engine_cache_size', 'custom_engine_cache',
        'use_explicit_typing', 'use_fp32_acc', 'refit_identical_engine_weights', 'strip_engine_weights',
        'immutable_weights', 'enable_weight_streaming', 'tiling_optimization_level', 'l2_limit_for_tiling',
        'offload_module_to_cpu', 'use_distributed_mode_trace',
    ),
    "v2.11.0": (
        'inputs', 'arg_inputs', 'kwarg_inputs', 'device', 'disable_tf32', 'assume_dynamic_shape_support',
        'sparse_weights', 'enabled_precisions', 'engine_capability', 'num_avg_timing_iters', 'workspace_size',
        'dla_sram_size', 'dla_local_dram_size', 'dla_global_dram_size', 'truncate_double',
        'require_full_compilation', 'min_block_size', 'torch_executed_ops', 'torch_executed_modules',
        'pass_through_build_failures', 'max_aux_streams', 'version_compatible', 'optimization_level',
        'use_python_runtime', 'use_fast_partitioner', 'enable_experimental_decompositions', 'dryrun',
        'hardware_compatible', 'timing_cache_path', 'lazy_engine_init', 'cache_built_engines',
        'reuse_cached_engines', 'engine_cache_dir', 'engine_cache_size', 'custom_engine_cache',
        'use_explicit_typing', 'use_fp32_acc', 'refit_identical_engine_weights', 'strip_engine_weights',
        'immutable_weights', 'enable_weight_streaming', 'tiling_optimization_level', 'l2_limit_for_tiling',
        'offload_module_to_cpu', 'use_distributed_mode_trace', 'decompose_attention', 'attn_bias_is_causal',
    ),
    "v2.12.0": (
        'inputs', 'arg_inputs', 'kwarg_inputs', 'device', 'disable_tf32', 'assume_dynamic_shape_support',
        'sparse_weights', 'enabled_precisions', 'engine_capability', 'num_avg_timing_iters', 'workspace_size',
        'dla_sram_size', 'dla_local_dram_size', 'dla_global_dram_size', 'truncate_double',
        'require_full_compilation', 'min_block_size', 'torch_executed_ops', 'torch_executed_modules',
        'pass_through_build_failures', 'max_aux_streams', 'version_compatible', 'optimization_level',
        'use_python_runtime', 'use_fast_partitioner', 'enable_experimental_decompositions', 'dryrun',
        'hardware_compatible', 'timing_cache_path', 'runtime_cache_path',
        'dynamic_shapes_kernel_specialization_strategy', 'lazy_engine_init', 'cache_built_engines',
        'reuse_cached_engines', 'engine_cache_dir', 'engine_cache_size', 'custom_engine_cache',
        'use_explicit_typing', 'use_fp32_acc', 'refit_identical_engine_weights', 'strip_engine_weights',
        'immutable_weights', 'enable_weight_streaming', 'tiling_optimization_level', 'l2_limit_for_tiling',
        'offload_module_to_cpu', 'use_distributed_mode_trace', 'decompose_attention', 'attn_bias_is_causal',
    ),
    "v2.13.0": (
        'inputs', 'arg_inputs', 'kwarg_inputs', 'device', 'disable_tf32', 'assume_dynamic_shape_support',
        'sparse_weights', 'engine_capability', 'num_avg_timing_iters', 'workspace_size', 'dla_sram_size',
        'dla_local_dram_size', 'dla_global_dram_size', 'truncate_double', 'require_full_compilation',
        'min_block_size', 'torch_executed_ops', 'torch_executed_modules', 'pass_through_build_failures',
        'max_aux_streams', 'version_compatible', 'optimization_level', 'use_python_runtime', 'use_fast_partitioner',
        'enable_experimental_decompositions', 'dryrun', 'hardware_compatible', 'timing_cache_path',
        'lazy_engine_init', 'cache_built_engines', 'reuse_cached_engines', 'engine_cache_dir', 'engine_cache_size',
        'custom_engine_cache', 'use_fp32_acc', 'refit_identical_engine_weights', 'strip_engine_weights',
        'immutable_weights', 'enable_weight_streaming', 'tiling_optimization_level', 'l2_limit_for_tiling',
        'offload_module_to_cpu', 'use_distributed_mode_trace', 'decompose_attention', 'attn_bias_is_causal',
    ),
    "2.14.0a0 (main d7f2062)": (
        'inputs', 'arg_inputs', 'kwarg_inputs', 'device', 'disable_tf32', 'assume_dynamic_shape_support',
        'sparse_weights', 'engine_capability', 'num_avg_timing_iters', 'workspace_size', 'dla_sram_size',
        'dla_local_dram_size', 'dla_global_dram_size', 'truncate_double', 'use_complex_decomposition',
        'require_full_compilation', 'min_block_size', 'torch_executed_ops', 'torch_executed_modules',
        'pass_through_build_failures', 'max_aux_streams', 'version_compatible', 'optimization_level',
        'use_python_runtime', 'use_fast_partitioner', 'enable_experimental_decompositions', 'dryrun',
        'hardware_compatible', 'timing_cache_path', 'lazy_engine_init', 'cache_built_engines',
        'reuse_cached_engines', 'engine_cache_dir', 'engine_cache_size', 'custom_engine_cache', 'use_fp32_acc',
        'refit_identical_engine_weights', 'strip_engine_weights', 'immutable_weights', 'enable_weight_streaming',
        'tiling_optimization_level', 'l2_limit_for_tiling', 'offload_module_to_cpu', 'use_distributed_mode_trace',
        'decompose_attention', 'disabled_constant_fold_exclusions', 'attn_bias_is_causal', 'lift_mutable_buffers',
        'arg_input_binding_names', 'kwarg_input_binding_names', 'output_binding_names',
    ),
}


# --- what the code uses ------------------------------------------------------------------------------------
@dataclass
class Use:
    file: str
    line: int
    cls: str  # "<module>" or a class name
    member: str
    call: bool = False
    npos: int = 0
    keywords: tuple = ()
    optional: bool = False  # behind hasattr / getattr(..., default): a version branch

    def where(self) -> str:
        return f"{self.file}:{self.line} {self.cls}.{self.member}"


def _receiver(node) -> str | None:
    """The TensorRT class an expression stands for: ``trt`` -> module, ``trt.Logger`` -> Logger, ``st.engine`` ->
    ICudaEngine (by the receivers table), else None."""
    if isinstance(node, ast.Name):
        return RECEIVERS.get(node.id)
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "trt":
            return node.attr  # trt.Logger.WARNING, trt.TensorIOMode.INPUT: a member of that class
        if node.attr == "trt":
            return "<module>"  # self.trt / backend.trt
        return RECEIVERS.get(node.attr)
    return None


def tensorrt_uses(source: str, file: str = "<src>") -> list:
    """Every attribute and call on a TensorRT receiver in ``source``."""
    tree = ast.parse(source)
    uses, optional = [], set()
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            calls[id(node.func)] = node
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            cls = _receiver(node.args[0])
            if cls is not None:
                opt = node.func.id == "hasattr" or len(node.args) == 3
                uses.append(Use(file, node.lineno, cls, node.args[1].value, optional=opt))
                if opt:
                    optional.add((cls, node.args[1].value))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        cls = _receiver(node.value)
        if cls is None:
            continue
        call = calls.get(id(node))
        if call is not None:
            uses.append(Use(file, node.lineno, cls, node.attr, True, sum(not isinstance(a, ast.Starred) for a in call.args),
                            tuple(k.arg for k in call.keywords if k.arg)))
        else:
            uses.append(Use(file, node.lineno, cls, node.attr))
    for u in uses:
        if (u.cls, u.member) in optional:
            u.optional = True
    return uses


def uses_in(files) -> list:
    out = []
    for rel in files:
        with open(os.path.join(ROOT, rel)) as f:
            out += tensorrt_uses(f.read(), rel)
    return out


# --- what the library has ----------------------------------------------------------------------------------
@dataclass
class Api:
    """``classes[name][member]`` is ``"attr"`` or a list of signatures ``[(param, has_default), ...]`` (self
    dropped); ``None`` as a signature means "callable, parameters unknown"."""

    version: str
    module: dict = field(default_factory=dict)  # module-level name -> "class" | signatures | "attr"
    classes: dict = field(default_factory=dict)


def _split_params(text: str) -> list:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts]


def pybind_signatures(name: str, doc: str | None) -> list | None:
    """Signatures of a pybind11 function from its docstring (one per overload), or None when there is none."""
    sigs = []
    for m in re.finditer(rf"^\s*(?:\d+\.\s+)?{re.escape(name)}\((.*)\)\s*->", doc or "", re.M):
        params = []
        for p in _split_params(m.group(1)):
            pname = re.split(r"[:=]", p, maxsplit=1)[0].strip()
            if pname in ("*args", "**kwargs"):
                params = None
                break
            params.append((pname, "=" in p))
        if params is not None:
            sigs.append([p for p in params if p[0] != "self"])
    return sigs or None


def api_from_bindings(mod) -> Api:
    api = Api(str(getattr(mod, "__version__", "?")))
    for name in dir(mod):
        if name.startswith("_") and name != "__version__":
            continue
        obj = getattr(mod, name)
        if isinstance(obj, type):
            api.module[name] = "class"
            members = {}
            for m in dir(obj):
                a = inspect.getattr_static(obj, m, None)
                if isinstance(a, property) or not callable(getattr(obj, m, None)):
                    members[m] = "attr"
                else:
                    sigs = pybind_signatures(m, getattr(getattr(obj, m), "__doc__", None))
                    if sigs is None:
                        sigs = _inspect_sigs(getattr(obj, m), drop_self=True)
                    members[m] = sigs
            api.classes[name] = members
        elif callable(obj):
            api.module[name] = pybind_signatures(name, getattr(obj, "__doc__", None)) or _inspect_sigs(obj)
        else:
            api.module[name] = "attr"
    return api


def _inspect_sigs(fn, drop_self: bool = False):
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return [None]
    params = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return [None]
        params.append((p.name, p.default is not p.empty))
    if drop_self and params and params[0][0] == "self":
        params = params[1:]
    return [params]


def stub_source(path: str) -> str:
    """The ``.pyi`` text, parseable: pybind11-stubgen writes a few signatures Python cannot parse (10.13:
    ``INetworkDefinition.add_scale_nd`` has a required parameter after defaulted ones, a plugin method a parameter
    named ``in``); those lines drop their defaults and rename such parameters (builder / runtime calls do not
    touch them)."""
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    for _ in range(50):
        try:
            ast.parse("".join(lines))
            return "".join(lines)
        except SyntaxError as exc:
            i = (exc.lineno or 0) - 1
            if not (0 <= i < len(lines)) or not lines[i].lstrip().startswith("def "):
                raise
            fixed = re.sub(r"\s*=\s*[^,()]+(?=[,)])", "", lines[i])
            # and parameters named after Python keywords (``in: list[PluginTensorDesc]``)
            fixed = re.sub(rf"([(,]\s*)({'|'.join(keyword.kwlist)})(\s*:)", r"\1\2_\3", fixed)
            if fixed == lines[i]:
                raise
            lines[i] = fixed
    raise AssertionError(f"{path}: more than 50 unparseable signatures")


def api_from_stub(path: str, version: str) -> Api:
    """The classes of a pybind11-stubgen ``.pyi`` (tensorrt-stubs): methods (overloads), properties, enum members."""
    tree = ast.parse(stub_source(path))
    api = Api(version)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            api.module[node.name] = "class"
            members = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    decos = {getattr(d, "id", getattr(d, "attr", "")) for d in item.decorator_list}
                    if "property" in decos or "setter" in decos:
                        members[item.name] = "attr"
                        continue
                    a = item.args
                    params = [x.arg for x in a.posonlyargs + a.args]
                    if "staticmethod" not in decos and params and params[0] in ("self", "cls", "this"):
                        params = params[1:]
                    ndef = len(a.defaults)
                    sig = [(p, i >= len(params) - ndef) for i, p in enumerate(params)]
                    sig += [(k.arg, d is not None) for k, d in zip(a.kwonlyargs, a.kw_defaults)]
                    if a.vararg or a.kwarg:
                        sig = None
                    members.setdefault(item.name, [])
                    if members[item.name] != "attr":
                        members[item.name].append(sig)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members[item.target.id] = "attr"
                elif isinstance(item, ast.Assign):
                    for t in item.targets:
                        if isinstance(t, ast.Name):
                            members[t.id] = "attr"
            api.classes[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            api.module[node.name] = [None]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            api.module[node.target.id] = "attr"
    init = os.path.join(os.path.dirname(path), "__init__.pyi")  # the package: nptype, __version__
    if os.path.isfile(init) and os.path.abspath(init) != os.path.abspath(path):
        pkg = api_from_stub(init, version)
        for name, entry in pkg.module.items():
            api.module.setdefault(name, entry)
    return api


def _fits(use: Use, sig) -> bool:
    if sig is None:
        return True
    names = [p for p, _ in sig]
    if use.npos > len(sig) or any(k not in names[use.npos:] for k in use.keywords):
        return False
    return all(i < use.npos or p in use.keywords or has_default for i, (p, has_default) in enumerate(sig))


def check(uses, api: Api) -> list:
    """Problems (one line each) of ``uses`` against ``api``; optional uses may be missing."""
    problems = []
    for u in uses:
        if u.cls == "<module>":
            entry = api.module.get(u.member)
            if entry is None:
                if not u.optional:
                    problems.append(f"{u.where()}: TensorRT {api.version} has no '{u.member}'")
                continue
            if u.call and entry == "class":
                entry = api.classes.get(u.member, {}).get("__init__", [None])
            if u.call and entry != "attr" and not any(_fits(u, s) for s in entry):
                problems.append(f"{u.where()}: no signature of TensorRT {api.version} fits {u.npos} positional "
                                f"argument(s) and keywords {list(u.keywords)}: {entry}")
            continue
        members = api.classes.get(u.cls)
        if members is None:
            if not u.optional:
                problems.append(f"{u.where()}: TensorRT {api.version} has no class '{u.cls}'")
            continue
        entry = members.get(u.member)
        if entry is None:
            if not u.optional:
                problems.append(f"{u.where()}: TensorRT {api.version} {u.cls} has no '{u.member}'")
            continue
        if u.call:
            if entry == "attr":
                problems.append(f"{u.where()}: is a property / value in TensorRT {api.version}, not a method")
            elif not any(_fits(u, s) for s in entry):
                problems.append(f"{u.where()}: no signature of TensorRT {api.version} fits {u.npos} positional "
                                f"argument(s) and keywords {list(u.keywords)}: {entry}")
    return problems


# --- the sources of truth ----------------------------------------------------------------------------------
def _lean():
    if not available("tensorrt_lean_bindings"):
        pytest.skip("tensorrt-lean-cu13-bindings is not installed (pip install -e '.[dev]')")
    import tensorrt_lean_bindings

    return tensorrt_lean_bindings


#: where the tensorrt-stubs wheel is looked for: $DMPO_TRT_STUBS (a .whl or a folder), else .stubs/ (README command)
STUBS_WHEEL = "tensorrt_stubs-10.13.0.35.1-py3-none-any.whl"


@pytest.fixture(scope="module")
def stub_root(tmp_path_factory) -> str:
    """The tensorrt-stubs wheel unpacked into a folder of its own (``tensorrt/``, ``tensorrt_bindings/``).

    Never installed: a stub-only ``tensorrt`` package in site-packages makes ``import tensorrt`` succeed, and third
    parties that probe for TensorRT that way (ModelOpt's ONNX quantizer) then fail on it. The README's test command
    downloads the wheel into ``.stubs/`` (``pip download --no-deps``: the wheel requires the full tensorrt)."""
    import glob
    import zipfile

    where = os.environ.get("DMPO_TRT_STUBS") or os.path.join(ROOT, ".stubs")
    wheels = [where] if where.endswith(".whl") else sorted(glob.glob(os.path.join(where, "tensorrt_stubs-*.whl")))
    if not wheels or not os.path.isfile(wheels[-1]):
        pytest.skip(f"no tensorrt-stubs wheel in {where} (pip download --no-deps -d .stubs tensorrt-stubs==10.13.0.35.1)")
    out = tmp_path_factory.mktemp("trt_stubs")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(out, [n for n in z.namelist() if n.endswith(".pyi")])
    return str(out)


def _stub_path(root: str) -> str:
    p = os.path.join(root, "tensorrt_bindings", "tensorrt.pyi")
    assert os.path.isfile(p), f"{p} missing from the tensorrt-stubs wheel"
    return p


@pytest.fixture(scope="module")
def lean_api():
    return api_from_bindings(_lean())


@pytest.fixture(scope="module")
def stub_api(stub_root):
    return api_from_stub(_stub_path(stub_root), "10.13 (tensorrt-stubs)")


# --- TensorRT ----------------------------------------------------------------------------------------------
def test_the_runtime_calls_exist_in_tensorrt_11_4(lean_api):
    uses = uses_in(RUNTIME_FILES)
    # the extractor sees the calls the backend is built on (a refactor that hides them must update RECEIVERS)
    seen = {(u.cls, u.member) for u in uses}
    for want in (("IExecutionContext", "execute_async_v3"), ("IExecutionContext", "set_tensor_address"),
                 ("IExecutionContext", "set_input_shape"), ("IExecutionContext", "set_optimization_profile_async"),
                 ("IExecutionContext", "set_device_memory"), ("ICudaEngine", "get_tensor_profile_shape"),
                 ("ICudaEngine", "create_execution_context"), ("ICudaEngine", "device_memory_size_v2"),
                 ("Runtime", "deserialize_cuda_engine"), ("TensorIOMode", "INPUT"), ("<module>", "nptype"),
                 ("ExecutionContextAllocationStrategy", "USER_MANAGED")):
        assert want in seen, want
    assert lean_api.version.startswith("11.")
    assert check(uses, lean_api) == []


def test_the_runtime_calls_exist_in_tensorrt_10_13(stub_api):
    assert check(uses_in(RUNTIME_FILES), stub_api) == []


def test_the_builder_calls_exist_in_tensorrt_10_13(stub_api):
    uses = uses_in(BUILDER_FILES)
    seen = {(u.cls, u.member) for u in uses}
    for want in (("Builder", "create_network"), ("Builder", "build_serialized_network"), ("IBuilderConfig", "set_timing_cache"),
                 ("IBuilderConfig", "set_memory_pool_limit"), ("IOptimizationProfile", "set_shape"),
                 ("OnnxParser", "parse_from_file"), ("ITimingCache", "serialize"), ("MemoryPoolType", "WORKSPACE")):
        assert want in seen, want
    assert check(uses, stub_api) == []
    # the legacy builder flags precision_plan may ask for on 10.x (looked up by name with getattr)
    from dmpo_edge.compile.trt_settings import precision_plan

    flags = {f for p in ("fp16", "int8") for f in precision_plan("10.13", p, strongly_typed=False)["builder_flags"]}
    assert flags and all(f in stub_api.classes["BuilderFlag"] for f in flags)


def test_the_checker_catches_a_misspelt_attribute(lean_api):
    good = "def f(st, trt, handle):\n    st.context.set_tensor_address('x', 1)\n    return st.context.execute_async_v3(handle)\n"
    assert check(tensorrt_uses(good), lean_api) == []
    for bad, why in (
        (good.replace("set_tensor_address", "set_tensor_adress"), "IExecutionContext has no 'set_tensor_adress'"),
        (good.replace("execute_async_v3(handle)", "execute_async_v3(handle, None)"), "fits 2 positional"),
        (good.replace("execute_async_v3(handle)", "execute_async_v3(stream=handle)"), "keywords ['stream']"),
        ("def f(trt):\n    return trt.TensorIOMode.INPT\n", "TensorIOMode has no 'INPT'"),
        ("def f(engine):\n    return engine.num_io_tensors()\n", "not a method"),
        ("def f(engine):\n    return engine.device_memory_size\n", "ICudaEngine has no 'device_memory_size'"),  # gone in 11
    ):
        problems = check(tensorrt_uses(bad), lean_api)
        assert len(problems) == 1 and why in problems[0], (bad, problems)
    # a version branch is allowed to be missing
    guarded = "def f(trt, engine):\n    if hasattr(engine, 'device_memory_size'):\n        return engine.device_memory_size\n"
    assert check(tensorrt_uses(guarded), lean_api) == []


def test_pybind_signatures_read_overloads_and_defaults():
    doc = ("create_execution_context(*args, **kwargs)\nOverloaded function.\n\n"
           "1. create_execution_context(self: m.ICudaEngine, strategy: m.Strategy = <Strategy.STATIC: 0>) -> m.Ctx\n\n"
           "2. create_execution_context(self: m.ICudaEngine, runtime_config: m.IRuntimeConfig = None) -> m.Ctx\n")
    assert pybind_signatures("create_execution_context", doc) == [[("strategy", True)], [("runtime_config", True)]]
    assert pybind_signatures("f", "f(self: A, name: str, shape: list[typing.SupportsInt]) -> bool") == [
        [("name", False), ("shape", False)]]


@pytest.mark.slow
def test_the_builder_type_checks_against_tensorrt_stubs(tmp_path, stub_root):
    """mypy over compile/trt_builder.py with the 10.13 stubs: its TensorRT objects are typed (TYPE_CHECKING
    imports), so a wrong method, keyword or argument type is a mypy error."""
    if not available("mypy"):
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    stub = _stub_path(stub_root)
    stubs = tmp_path / "stubs"
    # the stubs ship as bare .pyi folders without py.typed: give mypy a stub path of their own, parseable
    shutil.copytree(stub_root, stubs)
    (stubs / "tensorrt_bindings" / "tensorrt.pyi").write_text(stub_source(stub))
    env = dict(os.environ, MYPYPATH=str(stubs))
    # and, in the same run, a copy with a misspelt method and a misspelt keyword: mypy must flag both
    with open(os.path.join(ROOT, "compile", "trt_builder.py")) as f:
        src = f.read()
    bad = src.replace("config.set_memory_pool_limit(", "config.set_memory_pool_limt(").replace(
        "set_timing_cache(cache, ignore_mismatch=False)", "set_timing_cache(cache, ignore_mismatchx=False)")
    assert bad != src
    (tmp_path / "misspelt_builder.py").write_text(bad)
    cmd = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports", "--no-error-summary",
           "--cache-dir", str(tmp_path / "cache"), "--python-version", "3.10",
           os.path.join(ROOT, "compile", "trt_builder.py"), str(tmp_path / "misspelt_builder.py")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    # the stubs themselves carry stubgen artefacts (``bool`` shadowed, ``capsule``): only our modules' lines count
    ours = [ln for ln in p.stdout.splitlines() if "trt_builder.py" in ln and ": error:" in ln]
    flagged = [ln for ln in p.stdout.splitlines() if "misspelt_builder.py" in ln and ": error:" in ln]
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert ours == [], "\n".join(ours)
    assert any("set_memory_pool_limt" in ln for ln in flagged), p.stdout[-3000:]
    assert any("ignore_mismatchx" in ln for ln in flagged), p.stdout[-3000:]
    # mypy really read the stubs: the builder's TensorRT names resolve to their classes
    assert "Cannot find implementation or library stub" not in p.stdout


# --- cuda-python -------------------------------------------------------------------------------------------
def _cudart():
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        if available(name):
            import importlib

            return importlib.import_module(name)
    pytest.skip("cuda-python is not installed")


def cuda_uses(source: str, file: str = "<src>") -> list:
    """``(file:line, chain, positional args or None)`` of every ``rt.X`` / ``self.rt.X`` / ``cudart.X`` use."""
    tree = ast.parse(source)
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if (isinstance(base, ast.Attribute) and base.attr == "rt") or (isinstance(base, ast.Name) and base.id in ("rt", "cudart")):
            call = calls.get(id(node))
            chain = [node.attr]
            parent = next((p for p in ast.walk(tree) if isinstance(p, ast.Attribute) and p.value is node), None)
            if parent is not None:
                chain.append(parent.attr)
            out.append((f"{file}:{node.lineno}", chain, None if call is None else len(call.args)))
    return out


def check_cuda(uses, rt) -> list:
    problems = []
    for where, chain, nargs in uses:
        obj = getattr(rt, chain[0], None)
        if obj is None:
            problems.append(f"{where}: cuda-python has no {chain[0]}")
            continue
        if len(chain) > 1 and nargs is None and not callable(getattr(obj, chain[1], None)) and not hasattr(obj, chain[1]):
            problems.append(f"{where}: cuda-python {chain[0]} has no {chain[1]}")
        if nargs is not None:
            try:
                sig = inspect.signature(obj)
            except (TypeError, ValueError):
                continue
            try:
                sig.bind(*range(nargs))
            except TypeError as exc:
                problems.append(f"{where}: {chain[0]} does not take {nargs} argument(s): {exc} {sig}")
    return problems


def test_cuda_python_calls_exist_with_the_argument_counts_used():
    rt = _cudart()
    uses = []
    for rel in CUDA_FILES:
        with open(os.path.join(ROOT, rel)) as f:
            uses += cuda_uses(f.read(), rel)
    names = {u[1][0] for u in uses}
    for want in ("cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphLaunch",
                 "cudaGraphExecDestroy", "cudaGetLastError", "cudaStreamDestroy", "cudaEventDestroy", "cudaMemcpyAsync"):
        assert want in names, want
    assert check_cuda(uses, rt) == []
    # and the checker fails on a wrong count or a misspelt name
    bad = cuda_uses("def f(self, s):\n    self.rt.cudaGraphLaunch(1, s, 0)\n    self.rt.cudaStreamBeginCaptur(s)\n")
    problems = check_cuda(bad, rt)
    assert len(problems) == 2 and "cudaGraphLaunch does not take 3" in problems[0] and "cudaStreamBeginCaptur" in problems[1]


# --- torch-tensorrt ----------------------------------------------------------------------------------------
def _params(names):
    return {n: inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names}


@pytest.mark.parametrize("version", list(TORCH_TRT_KEYWORDS))
def test_torch_tensorrt_keywords_exist_in_every_supported_release(version):
    from dmpo_edge.compile.torchtrt import build_kwargs
    from dmpo_edge.errors import DmpoEdgeError

    sig = _params(TORCH_TRT_KEYWORDS[version])
    fp32 = build_kwargs(sig, ["in"], 1 << 20, None, ["input"], ["logits", "confidence", "prediction"])
    assert set(fp32) <= set(sig), set(fp32) - set(sig)
    fp16 = object()
    if "enabled_precisions" in sig:
        kw = build_kwargs(sig, ["in"], 1 << 20, fp16, ["input"], ["logits"])
        assert set(kw) <= set(sig) and kw["enabled_precisions"] == {fp16}
        assert kw.get("use_explicit_typing", False) is False  # explicit typing would ignore enabled_precisions
    else:  # 2.13 on: no way to ask for FP16 from an FP32 model; refused rather than an FP32 engine named fp16
        with pytest.raises(DmpoEdgeError, match="cannot build FP16"):
            build_kwargs(sig, ["in"], 1 << 20, fp16, ["input"], ["logits"])
    if "output_binding_names" in sig:  # engines named after the stage contract at export
        assert fp32["output_binding_names"] == ["logits", "confidence", "prediction"]
        assert fp32["arg_input_binding_names"] == ["input"]


def test_torch_tensorrt_is_called_only_with_checked_keywords():
    """The frontend passes the exported program and build_kwargs' result, nothing else."""
    with open(os.path.join(ROOT, "compile", "torchtrt.py")) as f:
        tree = ast.parse(f.read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "convert_exported_program_to_serialized_trt_engine"]
    assert len(calls) == 1
    c = calls[0]
    assert len(c.args) == 1 and [k.arg for k in c.keywords] == [None]  # (prog, **kwargs)


# --- what the conformance tools must not change ---------------------------------------------------------------
def test_type_stubs_never_count_as_tensorrt(tmp_path):
    """tensorrt-stubs installs a bare ``tensorrt/__init__.pyi``, which imports as an empty namespace package: the
    runtime must still see no TensorRT (else ``--backend auto`` would pick engines it cannot run)."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("def nptype(t): ...\n")
    code = ("import tensorrt, sys\n"  # the namespace import itself succeeds
            "from dmpo_edge._lazy import available, require\n"
            "from dmpo_edge.errors import DmpoEdgeError\n"
            "from dmpo_edge.runtime.backends.trt import trt_ready\n"
            "assert not available('tensorrt')\n"
            "try:\n    require('tensorrt', 'running TensorRT engines')\nexcept DmpoEdgeError as e:\n    print(e)\n"
            "else:\n    sys.exit('require returned the stub namespace')\n"
            "assert available('numpy')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "only type stubs of 'tensorrt' are installed" in p.stdout


def test_a_graph_slot_is_its_own_context_with_the_bucket_profile_shapes_and_buffers(toy_bundle):
    """make_slot on recording stand-ins for TensorRT's engine and context (no GPU here): one new context per
    bucket, on the shared scratch, switched to the bucket's profile, with its shapes and its own buffers of the
    bucket's size bound under the engine's tensor names (io_map applied)."""
    import numpy as np

    from dmpo_edge.runtime.backends.trt import TrtBackend, _Stage
    from dmpo_edge.runtime.backends.trt_graphs import bucket_key, make_slot

    class Ctx:
        def __init__(self, strategy):
            self.strategy, self.calls = strategy, []

        def set_device_memory(self, ptr, size):
            self.calls.append(("memory", ptr, size))

        def set_optimization_profile_async(self, p, stream):
            self.calls.append(("profile", p))
            return True

        def set_input_shape(self, name, shape):
            self.calls.append(("shape", name, tuple(shape)))
            return True

        def set_tensor_address(self, name, ptr):
            self.calls.append(("address", name, ptr))
            return True

    class Engine:
        device_memory_size_v2 = 4096

        def __init__(self):
            self.contexts = []

        def create_execution_context(self, strategy=None):
            self.contexts.append(Ctx(strategy))
            return self.contexts[-1]

    class Trt:
        class ExecutionContextAllocationStrategy:
            USER_MANAGED = "user-managed"

        IExecutionContext = Ctx

    class Dev:
        def __init__(self):
            self.allocs = []

        def malloc(self, n):
            from dmpo_edge.runtime.device import DeviceBuffer

            self.allocs.append(n)
            return DeviceBuffer(1000 * len(self.allocs), n)

        def stream_handle(self, s):
            return 5

    be = TrtBackend(toy_bundle(num_stages=2, seed=21).path)
    be.trt, be.dev = Trt, Dev()
    st = _Stage()
    st.engine, st.stream = Engine(), object()
    st.inputs, st.outputs = ["features_in", "keep_idx"], ["logits", "confidence", "prediction"]
    st.engine_names = {"logits": "output0", "confidence": "output1", "prediction": "output2"}
    st.dtypes = {"features_in": np.dtype(np.float32), "keep_idx": np.dtype(np.int32), "logits": np.dtype(np.float32),
                 "confidence": np.dtype(np.float32), "prediction": np.dtype(np.int64)}
    st.sample_shape = {"features_in": (5, 8), "keep_idx": (), "logits": (10,), "confidence": (), "prediction": ()}
    st.profiles = [{"features_in": (1, 64), "keep_idx": (1, 64)}, {"features_in": (1, 64), "keep_idx": (1, 8)},
                   {"features_in": (1, 64), "keep_idx": (9, 16)}]
    be.stages = [_Stage(), st]  # stage 1: features_in + keep_idx
    s8 = make_slot(be, 1, bucket_key({"features_in": (16, 5, 8), "keep_idx": (8,)}))
    s16 = make_slot(be, 1, bucket_key({"features_in": (16, 5, 8), "keep_idx": (16,)}))
    assert s8.context is not s16.context and len(st.engine.contexts) == 2
    assert all(c.strategy == "user-managed" for c in st.engine.contexts)
    assert s8.context.calls[0] == ("memory", st.scratch.ptr, 4096) == s16.context.calls[0]  # one shared scratch
    assert ("profile", 1) in s8.context.calls and ("profile", 2) in s16.context.calls
    assert ("shape", "keep_idx", (8,)) in s8.context.calls and ("shape", "features_in", (16, 5, 8)) in s8.context.calls
    # buffers of the bucket's size, bound under the engine's names; the two slots share none
    assert s8.bufs["features_in"].nbytes == 16 * 5 * 8 * 4 and s8.bufs["keep_idx"].nbytes == 8 * 4
    assert s8.bufs["logits"].nbytes == 8 * 10 * 4 and s16.bufs["prediction"].nbytes == 16 * 8
    assert ("address", "output0", s8.bufs["logits"].ptr) in s8.context.calls
    assert not {b.ptr for b in s8.bufs.values()} & {b.ptr for b in s16.bufs.values()}
