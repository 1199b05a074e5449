"""Which 8-bit dot-product instructions this CPU has, and how an INT8 graph for ONNX Runtime must be quantized for it.

ONNX Runtime's integer GEMM/Conv kernels (MLAS) multiply U8 activations by S8 weights. On x86 without VNNI they use
``vpmaddubsw``, which adds each pair of 8-bit products into a *saturating* 16-bit sum: 255 x 127 x 2 overflows, so
large activations against large weights give wrong results. VNNI (``vpdpbusd``, AVX512-VNNI or AVX-VNNI) accumulates
in 32 bits, and so do Arm's dot-product (``sdot``/``udot``) and i8mm (``smmla``) kernels and the plain NEON path.
ONNX Runtime's quantization guide therefore asks for 7-bit weights (``reduce_range``) on x86 without VNNI: 255 x 63 x 2
fits in int16.

The ISA *class* recorded in a bundle (``x86-vnni``, ``x86-novnni``, ``arm``...) is what decides whether a CPU form
computes what was measured at compile time; the finer ``isa`` name is for people reading the manifest.

Stdlib only: the runtime imports this to warn when a CPU form runs on a CPU of another class.
"""

from __future__ import annotations

import functools
import platform

__all__ = ["CpuIsa", "detect", "from_flags", "ISA_NAMES", "class_of", "saturates_u8s8", "mismatch_warning"]

#: finest-first names this module reports; their class and whether U8 x S8 pairs saturate at int16 there
ISA_NAMES = {
    "avx512_vnni": ("x86-vnni", False),
    "avx_vnni": ("x86-vnni", False),
    "avx512": ("x86-novnni", True),
    "avx2": ("x86-novnni", True),
    "sse": ("x86-novnni", True),
    "arm_i8mm": ("arm", False),
    "arm_dotprod": ("arm", False),
    "arm_neon": ("arm", False),
    "unknown": ("unknown", True),
}


class CpuIsa(dict):
    """``{"isa", "class", "saturates_u8s8", "machine", "model"}`` (a dict: it goes into the manifest as is)."""

    @property
    def name(self) -> str:
        return self["isa"]

    @property
    def isa_class(self) -> str:
        return self["class"]

    @property
    def saturates(self) -> bool:
        return bool(self["saturates_u8s8"])


def class_of(isa: str) -> str:
    return ISA_NAMES.get(isa, ("unknown", True))[0]


def saturates_u8s8(isa: str) -> bool:
    return ISA_NAMES.get(isa, ("unknown", True))[1]


def _isa_from_flags(machine: str, flags: set) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "i386", "i686", "x86"):
        if "avx512_vnni" in flags or "avx512vnni" in flags:
            return "avx512_vnni"
        if "avx_vnni" in flags or "avxvnni" in flags:
            return "avx_vnni"
        if "avx512f" in flags and "avx512bw" in flags:
            return "avx512"
        if "avx2" in flags:
            return "avx2"
        return "sse"
    if m in ("aarch64", "arm64", "armv8l", "armv8", "arm64e") or m.startswith("arm"):
        if "i8mm" in flags:
            return "arm_i8mm"
        if "asimddp" in flags or "dotprod" in flags:
            return "arm_dotprod"
        return "arm_neon"
    return "unknown"


def from_flags(machine: str, flags, model: str = "") -> CpuIsa:
    """The ISA record for a machine name (``platform.machine()``) and its CPU feature flags."""
    flags = {str(f).lower() for f in flags}
    isa = _isa_from_flags(machine, flags)
    return CpuIsa({"isa": isa, "class": class_of(isa), "saturates_u8s8": saturates_u8s8(isa),
                   "machine": machine, "model": model})


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple:
    flags, model = set(), ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("flags", "features") and not flags:
                    flags = set(val.split())
                elif key in ("model name", "cpu model", "hardware") and not model:
                    model = val.strip()
                if flags and model:
                    break
    except OSError:
        pass
    return flags, model


@functools.lru_cache(maxsize=1)
def detect() -> CpuIsa:
    """This host's ISA (Linux: /proc/cpuinfo; macOS on Apple silicon: every such core has dot-product)."""
    machine = platform.machine() or "unknown"
    flags, model = _cpuinfo()
    if not flags and platform.system() == "Darwin" and machine.lower() in ("arm64", "aarch64"):
        flags = {"asimddp"}
    return from_flags(machine, flags, model or platform.processor() or "")


def mismatch_warning(recorded: dict | None, host: CpuIsa | None = None) -> str | None:
    """One line when a CPU form quantized for ``recorded`` (the manifest's ``target_isa``) runs on another class."""
    if not recorded or not isinstance(recorded, dict) or "class" not in recorded:
        return None
    host = host or detect()
    if recorded["class"] == host.isa_class:
        return None
    why = ""
    if host.saturates and not recorded.get("saturates_u8s8", True):
        why = ("; its full-range 8-bit weights can saturate this CPU's 16-bit integer sums, so accuracy may be "
               "below the compile report")
    elif not host.saturates and recorded.get("saturates_u8s8"):
        why = "; it runs correctly here but with 7-bit weights it was not built for this CPU's faster kernels"
    return (f"WARNING cpu form | quantized for {recorded.get('isa')} ({recorded['class']}), running on "
            f"{host.name} ({host.isa_class}){why}. Recompile the bundle on this kind of CPU for its best INT8 form")
