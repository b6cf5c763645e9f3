"""Box profiles (issue 17 item 6): what a box is, and the defaults that suit it.

Allerac ships three boxes, and `profile = "lite" | "home" | "pro"` in config names them;
left out (or `"auto"`), the profile is chosen from the hardware the node probed at start:

- lite: fewer than 4 physical cores or less than 12 GiB; context 2,048, half the RAM for
  models;
- home: otherwise; context 4,096, 60 % of the RAM;
- pro: a GPU with 8 GiB or more, or 12+ cores and 48+ GiB; context 8,192, the GPU's memory
  (or 70 % of the RAM) for models.

On every box llama.cpp decodes on the physical cores (the backend's default, or
$ALLERAC_THREADS; llama-cpp-python's own default is half the logical CPUs for generating:
on this 2-core VM one thread decoded 129 tok/s, two 156; issue 14), so a profile leaves a
model's threads to the backend.
These are defaults: a model's own `threads` or `context_length` wins. Parallel slots are
the llama.cpp backend's own default (from the cores and memory), on every profile.
The memory for models bounds how many fit (`models_fit`); the node warns when what it
loads is more.

Pure: the hardware summary in, a `Profile` and a new config out.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.config import PROFILES, NodeConfig
from mesh.errors import ConfigError
from mesh.trust.cards import HardwareSummary

GIB = 1 << 30


class ProfileName(enum.StrEnum):
    LITE = "lite"
    HOME = "home"
    PRO = "pro"


PROFILE_CHOICES = PROFILES  # "auto" and the three names, as the config file takes them


@dataclass(frozen=True, kw_only=True)
class Profile:
    name: ProfileName
    chosen_by: str  # "config", or why the hardware chose it
    threads: int | None  # None: the backend's default (the physical cores)
    context_length: int
    model_memory_bytes: int  # what loaded models may take; 0 when the memory is unknown

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name.value,
            "chosen_by": self.chosen_by,
            "threads": self.threads,
            "context_length": self.context_length,
            "model_memory_bytes": self.model_memory_bytes,
        }


_CONTEXT = {ProfileName.LITE: 2048, ProfileName.HOME: 4096, ProfileName.PRO: 8192}
_MEMORY_SHARE = {ProfileName.LITE: 0.5, ProfileName.HOME: 0.6, ProfileName.PRO: 0.7}


def detect(hardware: HardwareSummary, physical_cores: int) -> tuple[ProfileName, str]:
    """The profile the hardware suggests, and why."""
    memory_gib = hardware.memory_bytes / GIB
    seen = f"{physical_cores} physical cores, {memory_gib:.0f} GiB" + (
        f", GPU {hardware.gpu} ({hardware.gpu_memory_bytes / GIB:.0f} GiB)"
        if hardware.gpu
        else ", no GPU"
    )
    if hardware.gpu_memory_bytes >= 8 * GIB or (physical_cores >= 12 and memory_gib >= 48):
        return ProfileName.PRO, f"detected: {seen}"
    if physical_cores >= 4 and memory_gib >= 12:
        return ProfileName.HOME, f"detected: {seen}"
    return ProfileName.LITE, f"detected: {seen}"


def choose(requested: str, hardware: HardwareSummary, physical_cores: int) -> Profile:
    if requested not in PROFILE_CHOICES:
        raise ConfigError(f"profile = {requested!r}: must be one of {', '.join(PROFILE_CHOICES)}")
    if requested == "auto":
        name, why = detect(hardware, physical_cores)
    else:
        name, why = ProfileName(requested), "config"
    if hardware.gpu_memory_bytes and name is ProfileName.PRO:
        budget = hardware.gpu_memory_bytes
    else:
        budget = int(hardware.memory_bytes * _MEMORY_SHARE[name])
    return Profile(
        name=name,
        chosen_by=why,
        threads=None,  # the backend's default: the physical cores, or $ALLERAC_THREADS
        context_length=_CONTEXT[name],
        model_memory_bytes=budget,
    )


def apply_profile(config: NodeConfig, profile: Profile) -> NodeConfig:
    """The profile's defaults for every llama.cpp model that does not set its own threads
    or context length (a context of 0 in a llama_cpp model means "not set")."""
    models = tuple(
        dataclasses.replace(
            model,
            threads=model.threads if model.threads is not None else profile.threads,
            context_length=model.context_length or profile.context_length,
        )
        if model.backend == "llama_cpp"
        else model
        for model in config.models
    )
    return dataclasses.replace(config, models=models)


def models_fit(sizes: Sequence[int], budget: int) -> int:
    """How many of these models (file sizes, in loading order) fit in `budget`."""
    used = 0
    for count, size in enumerate(sizes):
        used += size
        if budget and used > budget:
            return count
    return len(sizes)
