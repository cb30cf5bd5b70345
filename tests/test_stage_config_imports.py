"""Building a config imports no TensorFlow (only reading data does)."""

import subprocess
import sys

from tests.conftest import REPO_ROOT

# Builds base_config() and every configs/*.py as `--config=FILE` does (a module's get_config).
_SCRIPT = """
import importlib.util
import sys

from maskgit_jax import config_lib

configs = [config_lib.base_config()]
for name in {names!r}:
    spec = importlib.util.spec_from_file_location(name, f"configs/{{name}}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs.append(module.get_config())
for config in configs:
    config.to_json()
loaded = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
assert not loaded, sorted(loaded)[:5]
print("built", len(configs), "configs without TensorFlow")
"""


def test_building_every_config_imports_no_tensorflow():
    names = sorted(path.stem for path in (REPO_ROOT / "configs").glob("*.py"))
    assert {"digits", "imagenet256", "imagenet512", "photos"} <= set(names)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(names=names)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"built {len(names) + 1} configs without TensorFlow" in result.stdout
