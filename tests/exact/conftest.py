import pytest


@pytest.fixture
def small_tiles(monkeypatch):
    """Force the tiled engine into many small steps so grouping and chunking paths run."""
    from effattn.exact import tiled

    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 512)
