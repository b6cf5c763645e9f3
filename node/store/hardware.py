"""What this box is (CPU count and model, memory): probed once when the node starts, then
given to the card builder (`mesh.trust.cards.sign_card`) every time it signs a card."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from mesh.trust.cards import HardwareSummary

CPUINFO = Path("/proc/cpuinfo")  # Linux; elsewhere `platform` names the CPU


def probe_hardware() -> HardwareSummary:
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
    return HardwareSummary(cpu_count=os.cpu_count() or 0, cpu_model=cpu_model, memory_bytes=memory)
