"""How many threads a model decodes with when its config sets none."""

from __future__ import annotations

import pytest

from mesh.errors import ConfigError
from node.store.hardware import THREADS_VARIABLE, default_threads, physical_cores


def test_the_default_is_every_physical_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    assert default_threads() == physical_cores() >= 1


def test_the_environment_sets_it_for_a_box_shared_with_other_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    assert default_threads() == 3


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5", "2000"])
def test_a_bad_value_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(THREADS_VARIABLE, raw)
    with pytest.raises(ConfigError, match=f"ALLERAC_THREADS = '{raw}': must be an integer"):
        default_threads()
