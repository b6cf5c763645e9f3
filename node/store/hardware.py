"""What this box is (CPU count and model, physical cores, memory, GPU): probed once when
the node starts, then given to the card builder (`mesh.trust.cards.sign_card`) every time
it signs a card, and to the box profile (`mesh.profiles`)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from mesh.errors import ConfigError
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


def probe_hardware(*, profile: str = "") -> HardwareSummary:
    memory = memory_bytes()
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


SYS_CPU = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """The physical cores this process may run on (hyperthread siblings count once).

    llama.cpp decodes fastest with one thread per physical core; llama-cpp-python's own
    default is half the logical CPUs, which on a box without hyperthreads is half the cores.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text(encoding="ascii").strip()
            core = (topology / "core_id").read_text(encoding="ascii").strip()
        except OSError:
            return max(1, len(cpus))  # no topology (not Linux, or hidden): every CPU counts
        cores.add((package, core))
    return max(1, len(cores))


def memory_bytes() -> int:
    """The box's physical memory (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


THREADS_VARIABLE = "ALLERAC_THREADS"
MAX_THREADS = 1024


def default_threads() -> int:
    """Decode threads for a model that sets none: $ALLERAC_THREADS when set (a box or a
    container that shares its cores with other busy work), else the physical cores."""
    raw = os.environ.get(THREADS_VARIABLE)
    if raw is None or raw == "":
        return physical_cores()
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise ConfigError(
            f"environment: {THREADS_VARIABLE} = {raw!r}: must be an integer from 1 to "
            f"{MAX_THREADS}",
            param=THREADS_VARIABLE,
        )
    return value
