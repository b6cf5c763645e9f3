"""What this box is (CPU count and model, physical cores, memory, GPU): probed once when
the node starts, then given to the card builder (`mesh.trust.cards.sign_card`) every time
it signs a card, and to the box profile (`mesh.profiles`)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from mesh.trust.cards import HardwareSummary

CPUINFO = Path("/proc/cpuinfo")  # Linux; elsewhere `platform` names the CPU
NVIDIA_SMI_TIMEOUT_S = 5.0


def _gpu() -> tuple[str, int]:
    """The first NVIDIA GPU and its memory, as nvidia-smi says ("", 0 without one). Other
    GPUs are not detected yet: llama-cpp-python is built for the CPU here."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "", 0
    try:
        out = subprocess.run(  # noqa: S603 (a fixed command line, found on PATH)
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        ).stdout
        name, memory_mib = out.splitlines()[0].rsplit(",", 1)
        return name.strip(), int(memory_mib.strip()) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return "", 0


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; the CPU count elsewhere."""
    cores: set[tuple[str, str]] = set()
    package = core = ""
    try:
        with CPUINFO.open(encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    package = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((package, core))
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


def probe_hardware(*, profile: str = "") -> HardwareSummary:
    memory = 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    cpu_model = platform.processor() or platform.machine()
    try:
        with CPUINFO.open(encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu, gpu_memory = _gpu()
    return HardwareSummary(
        cpu_count=os.cpu_count() or 0,
        cpu_model=cpu_model,
        memory_bytes=memory,
        gpu=gpu,
        gpu_memory_bytes=gpu_memory,
        profile=profile,
    )
