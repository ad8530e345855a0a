"""Keep data tests away from the real lookup roots and the network."""

from __future__ import annotations

from pathlib import Path

import pooch
import pytest

from pfedlora.data import datasets


@pytest.fixture(autouse=True)
def isolated_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point the cache and system roots at empty temporary folders, unset $PFEDLORA_DATA, forbid downloads."""
    roots = {"cache": tmp_path / "roots" / "cache", "system": tmp_path / "roots" / "system"}
    monkeypatch.setattr(datasets, "CACHE_DIR", roots["cache"])
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", roots["system"])
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)

    def no_download(*args: object, **kwargs: object) -> str:
        pytest.fail(f"a test tried to download: {args} {kwargs}")

    monkeypatch.setattr(pooch, "retrieve", no_download)
    return roots
