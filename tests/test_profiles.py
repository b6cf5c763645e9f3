"""Box profiles (issue 17 item 6): chosen from the hardware or named in config; their
defaults for models that set none (`allerac status` on a real node: tests/test_reload.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.config import Flags, ModelConfig, NodeConfig, UpstreamConfig, node_config, parse_config
from mesh.errors import ConfigError
from mesh.profiles import GIB, ProfileName, apply_profile, choose, models_fit
from mesh.trust.cards import HardwareSummary
from tests.test_config import FakeBox

LITE = HardwareSummary(cpu_count=2, memory_bytes=8 * GIB)
HOME = HardwareSummary(cpu_count=8, memory_bytes=32 * GIB)
PRO = HardwareSummary(
    cpu_count=16, memory_bytes=64 * GIB, gpu="RTX 4090", gpu_memory_bytes=24 * GIB
)


@pytest.mark.parametrize(
    ("hardware", "cores", "name", "context"),
    [(LITE, 2, "lite", 2048), (HOME, 4, "home", 4096), (PRO, 8, "pro", 8192)],
)
def test_the_hardware_chooses_the_profile(
    hardware: HardwareSummary, cores: int, name: str, context: int
) -> None:
    profile = choose("auto", hardware, cores)
    assert profile.name == ProfileName(name)
    assert profile.chosen_by.startswith("detected: ")
    # Threads: left to the backend, whose default is the physical cores (not half the CPUs).
    assert profile.threads is None  # the backend's default: the physical cores
    assert profile.context_length == context


def test_the_config_names_the_profile_and_the_budget_follows() -> None:
    profile = choose("home", LITE, 2)
    assert (profile.name, profile.chosen_by) == (ProfileName.HOME, "config")
    assert profile.model_memory_bytes == int(8 * GIB * 0.6)
    assert choose("pro", PRO, 8).model_memory_bytes == 24 * GIB  # the GPU's memory
    with pytest.raises(ConfigError, match="profile = 'huge'"):
        choose("huge", LITE, 2)


def test_a_models_own_settings_win_over_the_profile() -> None:
    unset = ModelConfig(name="a", path=Path("/m/a.gguf"), context_length=0)
    own = ModelConfig(name="b", path=Path("/m/b.gguf"), context_length=1024, threads=1)
    upstream = ModelConfig(
        name="c",
        backend="openai",
        context_length=0,
        upstream=UpstreamConfig(url="http://u", model="c"),
    )
    config = apply_profile(NodeConfig(models=(unset, own, upstream)), choose("home", HOME, 4))
    a, b, c = config.models
    assert (a.context_length, a.threads) == (4096, None)  # threads: the backend's default
    assert (b.context_length, b.threads) == (1024, 1)
    assert (c.context_length, c.threads) == (0, None)  # the upstream says its own


def test_the_profile_key_and_models_without_a_context() -> None:
    box = FakeBox(files={"/m/a.gguf": True})
    settings = parse_config(
        b'profile = "pro"\n[[models]]\npath = "a.gguf"\n', source="t", base_dir=Path("/m"), box=box
    )
    config = node_config(settings, flags=Flags(), box=box)
    assert config.profile == "pro"
    assert config.models[0].context_length == 0  # the profile's
    with pytest.raises(ConfigError, match="profile = 'big': must be one of auto, lite, home, pro"):
        parse_config(b'profile = "big"\n', source="t", base_dir=Path("/m"), box=box)


def test_how_many_models_fit() -> None:
    assert models_fit([4 * GIB, 4 * GIB, 4 * GIB], 10 * GIB) == 2
    assert models_fit([4 * GIB], 0) == 1  # memory unknown: no bound
