"""Run from the repository root, the project's kernels/ folder is on sys.path as `kernels`, the
name of Hugging Face's optional package that transformers probes for. Importing misa_compile keeps
the folder from answering that name, so any transformers model loads there, while a real
`kernels` package elsewhere on sys.path is still found."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_transformers_model_class_loads_from_the_repository_root():
    done = python("""
        import misa_compile, transformers
        transformers.DeepseekV32ForCausalLM
        import importlib.util
        assert importlib.util.find_spec("kernels") is None, importlib.util.find_spec("kernels")
        """, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def test_without_misa_compile_the_folder_still_shadows_the_name():
    # The reason for the guard: if this ever passes, transformers fixed it and the guard can go.
    done = python("import importlib.util; print(importlib.util.find_spec('kernels').origin)",
                  cwd=REPO)
    assert done.returncode == 0 and str(REPO / "kernels") in done.stdout, done.stderr


def test_a_real_kernels_package_later_on_sys_path_is_still_found(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("__version__ = '0.9'\n")
    done = python(f"""
        import sys
        import misa_compile
        sys.path.append({str(site)!r})
        import kernels
        assert kernels.__file__.startswith({str(site)!r}), kernels.__file__
        assert kernels.__version__ == "0.9"
        """, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_root_added_to_sys_path_after_the_import_is_guarded_too(tmp_path):
    done = python(f"""
        import importlib, importlib.util, sys
        import misa_compile
        sys.path.insert(0, {str(REPO)!r})
        importlib.invalidate_caches()
        assert importlib.util.find_spec("kernels") is None
        import misa_compile.eval  # every other name in the root still imports
        """, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_misa_export_of_a_factory_file_kept_in_the_repository(tmp_path):
    out = tmp_path / "hf.pt2"
    done = subprocess.run(
        [sys.executable, "-m", "misa_compile.cli", "export", "tests.export.factories:hf_deepseek_v32",
         "--active-heads", "2", "--block-size", "4", "--out", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 indexer site(s): 1 rewritten, 0 refused" in done.stdout
    assert out.exists()
